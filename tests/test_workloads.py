"""Stories of workloads: pods owned by a Deployment (through its ReplicaSet), a
StatefulSet, a CronJob (through its Job) and a bare pod send real traffic, one of
them to a Service (kube-proxy-like DNAT in the lab node). Records name each side's
workload under the user's enterprise number (RFC 5610 tells `cniflow collector`
their names; tshark reads the raw elements) and, with --pod-labels, the selected
labels; Prometheus counts per workload and per Service exactly, and the series go
with the workload's last pod (and the Service)."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path
from xml.etree import ElementTree

import netlab
import pytest
from conftest import k8s_agent, wait_for
from fakeapi import FakeApiServer
from oracles import Tshark
from test_collector import RunningCollector
from test_metering import pin_neighbours
from test_services import ask, echo, kube_proxy

NODE = "node-a"
PY = "/usr/bin/python3"
PEN = 32473  # RFC 5612: the enterprise number for documentation and examples
DB_IP = "10.96.0.10"
WORKLOADS = {"web": ("Deployment", "web"), "db": ("StatefulSet", "db"),
             "backup": ("CronJob", "backup"), "bare": ("Pod", "debug")}
LONG = "x" * 64  # one more than a label value may have: left out, never cut


def send(node, i: int, dst: str, dport: int, sport: int, count: int) -> None:
    """count datagrams of 100 octets from pod i, none answered."""
    netlab.sh(node.in_pod(i, f"{PY} -c \"import socket;s=socket.socket(2,2);"
                             f"s.bind(('',{sport}));[s.sendto(b'x'*100,('{dst}',{dport}))"
                             f" for _ in range({count})]\""))


def quiet(node) -> None:
    """Only the test's packets cross the veths: permanent neighbours between pods and
    node (no ARP, no neighbour discovery), no ICMP port unreachable for the datagrams
    nobody listens to, no MLD reports (the kernel repeats them after an interface
    comes up)."""
    netlab.sh(node.exec("ip6tables -I OUTPUT -p icmpv6 --icmpv6-type 143 -j DROP"))
    for i in range(len(node.pods)):
        pin_neighbours(node, i)
        netlab.sh(node.in_pod(i, "ip6tables -I OUTPUT -p icmpv6 --icmpv6-type 143 -j DROP"))
        netlab.sh(node.in_pod(i, "iptables -I OUTPUT -p icmp --icmp-type port-unreachable "
                                 "-j DROP"))


def raw_records(pcap: Path, decode: list[str]) -> list[dict]:
    """Flow records from tshark's PDML (whole values; its tree cuts long ones): every
    enterprise element by (enterprise as tshark names it, id), as bytes, and the
    addresses and counts."""
    out = subprocess.run(["tshark", "-r", str(pcap), *decode, "-T", "pdml"],
                         capture_output=True, text=True, check=True).stdout
    records = []
    for flow in ElementTree.fromstring(out).iter("field"):
        if not re.fullmatch(r"Flow \d+", flow.get("show", "")):
            continue
        rec: dict = {}
        for f in flow.iter("field"):
            name = f.get("name")
            if name == "cflow.enterprise_private_entry":
                m = re.match(r"Enterprise Private entry: \((.*)\) Type (\d+)", f.get("showname"))
                rec[(m.group(1), int(m.group(2)))] = bytes.fromhex(f.get("value", ""))
            elif name in ("cflow.srcaddr", "cflow.dstaddr", "cflow.packets"):
                rec[name.removeprefix("cflow.")] = f.get("show")
        if "srcaddr" in rec:
            records.append(rec)
    return records


ORDER = ("namespace", "workload_kind", "workload", "service", "port", "direction", "flow_type")


def series(metrics: dict[str, float], name: str) -> dict[tuple, float]:
    """A labelled family's samples, by their label values in ORDER."""
    out = {}
    for key, value in metrics.items():
        if key.startswith(name + "{"):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', key))
            out[tuple(labels[k] for k in ORDER if k in labels)] = value
    return out


def workload_packets(metrics: dict[str, float]) -> dict[tuple, float]:
    return {k: v for k, v in series(metrics, "cniflow_workload_packets_total").items() if v}


def lab(prefix: str):
    """Four pods of four workloads in namespace shop, and db's Service (ClusterIP
    DB_IP, port sql 80 -> 8080, kube-proxy's DNAT in the node)."""
    node = netlab.up(prefix, 4)
    api = FakeApiServer(node.netns)
    web, db, backup, bare = node.pods
    api.namespace("shop", {"cniflow.io/export": "true"})
    api.node(NODE, ["10.99.200.1"])
    rs = api.replica_set("shop", "web", "7d9f5c")
    api.owned_pod("shop", "web-7d9f5c-x2x4q", NODE, [web.ipv4],
                  ("apps/v1", "ReplicaSet", rs), {"app": "web", "tier": "front",
                                                  "pod-template-hash": "7d9f5c"})
    sts = {"metadata": {"name": "db", "uid": "0b5f6f3e-1d2c-4f7e-9a55-5a1f3b2c9d10"}}
    api.owned_pod("shop", "db-0", NODE, [db.ipv4], ("apps/v1", "StatefulSet", sts),
                  {"app": "db", "tier": LONG})
    job = api.job("shop", "backup-29012400", cronjob="backup")
    api.owned_pod("shop", "backup-29012400-7xk2p", NODE, [backup.ipv4],
                  ("batch/v1", "Job", job), {"app": "backup"})
    api.pod("shop", "debug", NODE, [bare.ipv4])  # no controller: its own workload
    api.service("shop", "db", DB_IP, [("sql", "UDP", 80, 8080)])
    api.endpoint_slice("shop", "db", [("sql", "UDP", 8080)], [(db.ipv4, "db-0", NODE)])
    kube_proxy(node, "db", DB_IP, 80, db.ipv4, 8080)
    quiet(node)  # pinned neighbours: the ClusterIP, routed nowhere, goes to the node
    return node, api


def traffic(node) -> None:
    """web asks db's Service 7 times (7 answers), backup sends bare 4, bare sends web 3."""
    web, db, backup, bare = node.pods
    ask(node, DB_IP, 80, 41080, 7)
    send(node, 2, bare.ipv4, 9002, 41002, 4)
    send(node, 3, web.ipv4, 9003, 41003, 3)


# (namespace, kind, workload, direction, flow_type) -> packets, for traffic()
EXPECTED = {
    ("shop", "Deployment", "web", "sent", "intra-node"): 7,
    ("shop", "Deployment", "web", "received", "intra-node"): 7 + 3,
    ("shop", "StatefulSet", "db", "received", "intra-node"): 7,
    ("shop", "StatefulSet", "db", "sent", "intra-node"): 7,
    ("shop", "CronJob", "backup", "sent", "intra-node"): 4,
    ("shop", "Pod", "debug", "received", "intra-node"): 4,
    ("shop", "Pod", "debug", "sent", "intra-node"): 3,
}


@pytest.mark.parametrize("named", [True, False])
def test_records_and_metrics_name_each_pods_workload_and_the_service(named):
    """named: --enterprise-number and --pod-labels set (workloads and labels in the
    records), or neither (no such element sent); the metrics are the same."""
    prefix = f"wkl{int(named)}"
    node, api = lab(prefix)
    servers: list[subprocess.Popen] = []
    try:
        web, db, backup, bare = node.pods
        servers = [echo(node.in_pod(1, ""), 8080)]
        collector = RunningCollector(node.netns, 4739)
        tshark = Tshark(node.netns, 4739)
        extra = ["--enterprise-number", str(PEN), "--pod-labels", "app,tier"] if named else []
        with k8s_agent(node, api, "--idle-timeout", "1", *extra, wait_attached=True) as running:
            traffic(node)
            time.sleep(2.5)
            m = running.metrics()
            assert m["cniflow_poll_errors_total"] == 0
            assert workload_packets(m) == EXPECTED
            octets = series(m, "cniflow_workload_bytes_total")
            assert octets[("shop", "CronJob", "backup", "sent", "intra-node")] == 4 * 128
            assert series(m, "cniflow_service_packets_total") == {("shop", "db", "sql"): 14}
            assert m["cniflow_pod_labels_left_out"] == (1 if named else 0)  # db's LONG tier
            # the Deployment's and the CronJob's pods go: their series with them
            api.delete_pod("shop", "web-7d9f5c-x2x4q")
            api.delete_pod("shop", "backup-29012400-7xk2p")
            api.state.delete("services", "shop", "db")
            assert wait_for(lambda: not any(k[1] in ("Deployment", "CronJob") for k in series(
                running.metrics(), "cniflow_workload_packets_total")), 10), running.metrics()
            m = running.metrics()
            assert {k[:3] for k in series(m, "cniflow_workload_packets_total")} == {
                ("shop", "StatefulSet", "db"), ("shop", "Pod", "debug")}
            assert series(m, "cniflow_service_packets_total") == {}
        tshark.stop()
        assert tshark.expert() == []
        rows = collector.stop()
        raw = raw_records(tshark.pcap, tshark.decode_args())
    finally:
        for s in servers:
            s.kill()
        api.stop()
        netlab.down(prefix)

    def one(src: str, dst: str, at: str) -> dict:
        rs = [r for r in rows if r.get("sourceIPv4Address") == src
              and r.get("destinationIPv4Address") == dst and r.get("interfaceName") == at
              and r.get("protocolIdentifier") == 17]
        assert rs, rows
        out = dict(rs[0])
        out["packetDeltaCount"] = sum(r["packetDeltaCount"] for r in rs)
        return out

    to_service = one(web.ipv4, DB_IP, web.host_if)
    answers = one(db.ipv4, web.ipv4, db.host_if)
    to_bare = one(backup.ipv4, bare.ipv4, backup.host_if)
    to_web = one(bare.ipv4, web.ipv4, bare.host_if)
    for r, packets, src, dst in ((to_service, 7, "web", "db"), (answers, 7, "db", "web"),
                                 (to_bare, 4, "backup", "bare"), (to_web, 3, "bare", "web")):
        assert r["packetDeltaCount"] == packets, r
        if named:  # the names RFC 5610 taught the collector
            assert (r["sourceWorkloadKind"], r["sourceWorkloadName"]) == WORKLOADS[src], r
            assert (r["destinationWorkloadKind"], r["destinationWorkloadName"]) == \
                WORKLOADS[dst], r
        else:
            assert not any(k.endswith(("WorkloadKind", "WorkloadName", "PodLabels"))
                           for k in r), r
    assert to_service["destinationServicePortName"] == "shop/db:sql"
    assert answers["destinationServicePortName"] == "shop/db:sql"
    if named:
        assert json.loads(to_service["sourcePodLabels"]) == {"app": "web", "tier": "front"}
        assert json.loads(to_service["destinationPodLabels"]) == {"app": "db"}  # LONG left out
        assert json.loads(to_bare["destinationPodLabels"]) == {}
        assert json.loads(to_bare["sourcePodLabels"]) == {"app": "backup"}
    # tshark, from the wire: our elements under PEN, Antrea's labels as 56506/143, 144
    by_tshark = {(r["srcaddr"], r["dstaddr"]): r for r in raw}
    t = by_tshark[(web.ipv4, DB_IP)]
    ours = {k[1]: v for k, v in t.items() if isinstance(k, tuple) and "Antrea" not in k[0]}
    antrea = {k[1]: v for k, v in t.items() if isinstance(k, tuple) and "Antrea" in k[0]}
    if named:
        assert ours == {1: b"Deployment", 2: b"web", 3: b"StatefulSet", 4: b"db"}, t
        assert json.loads(antrea[143]) == {"app": "web", "tier": "front"}
        assert json.loads(antrea[144]) == {"app": "db"}
        assert antrea[109] == b"shop/db:sql"
        t = by_tshark[(backup.ipv4, bare.ipv4)]
        assert {k[1]: v for k, v in t.items() if isinstance(k, tuple)
                and "Antrea" not in k[0]} == {1: b"CronJob", 2: b"backup", 3: b"Pod",
                                              4: b"debug"}
    else:
        assert ours == {} and 143 not in antrea and 144 not in antrea, t


def test_a_hostile_namespace_owner_gets_a_bounded_number_of_workload_series():
    """Every pod its own controller of any kind (ownerReferences are the namespace
    owner's to write): at most --workload-series-limit workloads get series, the
    traffic of the rest is counted apart, and a custom kind never passes for a
    built-in one (Deployment.example.com is not a Deployment)."""
    prefix = "wklh"
    node = netlab.up(prefix, 4)
    quiet(node)
    api = FakeApiServer(node.netns)
    try:
        api.namespace("evil", {"cniflow.io/export": "true"})
        for i, p in enumerate(node.pods):
            uid = f"0000000{i}-0000-0000-0000-000000000000"
            owner = {"metadata": {"name": f"w{i}", "uid": uid}}
            api.owned_pod("evil", f"p{i}", NODE, [p.ipv4],
                          ("example.com/v1", "Deployment", owner))
        with k8s_agent(node, api, "--idle-timeout", "1", "--workload-series-limit", "2",
                       wait_attached=True) as running:
            for i in range(4):  # each pod sends the next 5 + i datagrams
                send(node, i, node.pods[(i + 1) % 4].ipv4, 9000, 42000, 5 + i)
            time.sleep(2.5)
            m = running.metrics()
    finally:
        api.stop()
        netlab.down(prefix)
    got = workload_packets(m)
    assert len({k[:3] for k in got}) == 2, got
    assert {k[1] for k in got} == {"Deployment.example.com"}
    sent = {f"w{i}": 5 + i for i in range(4)}
    received = {f"w{(i + 1) % 4}": 5 + i for i in range(4)}
    for (_, _, name, direction, _), packets in got.items():
        assert packets == (sent if direction == "sent" else received)[name], got
    kept = {k[2] for k in got}
    dropped = sum(sent[w] + received[w] for w in sent if w not in kept)
    assert m['cniflow_series_limited_packets_total{by="workload"}'] == dropped
