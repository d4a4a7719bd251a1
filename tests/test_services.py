"""Stories of Service traffic: kube-proxy-like DNAT rules (iptables-nft, KUBE-SERVICES
chains) in the lab node, a ClusterIP whose backend is a pod of the node and one whose
backend runs elsewhere (the remote host, a pod of node-b by its EndpointSlice). Every
record of it names the Service port and the backend, read back by tshark and by
`cniflow collector`, and every packet is counted once."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import netlab
import pytest
from conftest import agent
from fakeapi import FakeApiServer
from oracles import Tshark, tshark_tree
from test_collector import RunningCollector
from test_counting import ifindex_of
from test_metering import pin_neighbours

NODE = "node-a"
PY = "/usr/bin/python3"
DB_IP, CACHE_IP = "10.96.0.10", "10.96.0.20"  # ClusterIPs
ECHO = ("import socket,sys;s=socket.socket(2,2);s.bind(('',int(sys.argv[1])));"
        "print('ready',flush=True)\nwhile 1:\n d,a=s.recvfrom(9999);s.sendto(d,a)")
CLIENT = ("import socket,sys;s=socket.socket(2,2);s.bind(('',int(sys.argv[3])));"
          "s.settimeout(3);s.connect((sys.argv[1],int(sys.argv[2])))\n"
          "for _ in range(int(sys.argv[4])):\n s.send(b'q'*100);s.recv(9999)")


def kube_proxy(node, service: str, cluster_ip: str, port: int, backend: str, target: int) -> None:
    """What kube-proxy's iptables mode writes for one UDP Service port and one endpoint."""
    chain = f"KUBE-SVC-{service.upper()}"
    sep = f"KUBE-SEP-{service.upper()}"
    for rule in ("-N KUBE-SERVICES", "-I PREROUTING -j KUBE-SERVICES",
                 "-I OUTPUT -j KUBE-SERVICES"):
        subprocess.run(node.exec(f"iptables -t nat {rule}").split(), capture_output=True)
    for rule in (f"-N {chain}", f"-N {sep}",
                 f"-A KUBE-SERVICES -d {cluster_ip}/32 -p udp --dport {port} -j {chain}",
                 f"-A {chain} -j {sep}",
                 f"-A {sep} -p udp -j DNAT --to-destination {backend}:{target}"):
        netlab.sh(node.exec(f"iptables -t nat {rule}"))


def echo(cmd_prefix: str, port: int) -> subprocess.Popen:
    p = subprocess.Popen(f"{cmd_prefix} {PY} -c \"{ECHO}\" {port}", shell=True,
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    return p


def ask(node, ip: str, port: int, sport: int, count: int) -> None:
    """count datagrams of 100 octets from web, each answered before the next."""
    netlab.sh(node.in_pod(0, f"{PY} -c \"{CLIENT}\" {ip} {port} {sport} {count}"))


def antrea_records(pcap: Path, decode: list[str]) -> list[dict]:
    """Flow records from tshark's tree that carry pod names (Antrea 101 or 103)."""
    return [r for r in tshark_tree(pcap, decode) if 101 in r or 103 in r]


@pytest.mark.parametrize("dedup", [True, False])
def test_service_traffic_names_the_service_and_its_backend_here_and_elsewhere(dedup):
    prefix = f"svc{int(dedup)}"
    node = netlab.up(prefix, 2, remote=True)
    api = FakeApiServer(node.netns)
    servers: list[subprocess.Popen] = []
    try:
        web, db = node.pods
        api.namespace("shop", {"cniflow.io/export": "true"})
        api.node(NODE, ["10.99.200.1"])
        api.pod("shop", "web", NODE, [web.ipv4])
        api.pod("shop", "db", NODE, [db.ipv4])
        api.service("shop", "db", DB_IP, [("sql", "UDP", 80, 8080)])
        api.endpoint_slice("shop", "db", [("sql", "UDP", 8080)], [(db.ipv4, "db", NODE)])
        api.service("shop", "cache", CACHE_IP, [("", "UDP", 53, 5353)])  # its only port
        api.endpoint_slice("shop", "cache", [("", "UDP", 5353)],
                           [(node.remote_ip, "cache-0", "node-b")])
        kube_proxy(node, "db", DB_IP, 80, db.ipv4, 8080)
        kube_proxy(node, "cache", CACHE_IP, 53, node.remote_ip, 5353)
        # ClusterIPs are routed nowhere: the pods send them to their gateway, the node
        for i in range(2):
            pin_neighbours(node, i)
        servers = [echo(node.in_pod(1, ""), 8080), echo(node.in_remote(""), 5353)]
        collector = RunningCollector(node.netns, 4739)
        tshark = Tshark(node.netns, 4739)
        kubeconfig = api.kubeconfig(Path(f"/tmp/{prefix}-kubeconfig"))
        with agent(node, "--kubernetes", "--node-name", NODE, "--kubeconfig", str(kubeconfig),
                   "--idle-timeout", "1", "--dedup", str(dedup).lower(),
                   "--cluster-cidr", "10.99.0.0/16", interfaces=()) as running:
            time.sleep(1.5)
            ask(node, DB_IP, 80, 41080, 7)       # to a backend on this node
            ask(node, CACHE_IP, 53, 41053, 5)    # to a backend elsewhere
            netlab.sh(node.in_pod(0, f"{PY} -c \"import socket;s=socket.socket(2,2);"
                                     f"s.bind(('',41009));[s.sendto(b'x',('{db.ipv4}',9009))"
                                     " for _ in range(3)]\""))  # no Service: no names
            time.sleep(3)
            assert running.metrics()["cniflow_poll_errors_total"] == 0
        tshark.stop()
        assert tshark.expert() == []
        rows = collector.stop()
        ifindex = {p.host_if: ifindex_of(node, p.host_if) for p in node.pods}
        raw = antrea_records(tshark.pcap, tshark.decode_args())
    finally:
        for s in servers:
            s.kill()
        api.stop()
        netlab.down(prefix)
    web_if, db_if = ifindex[web.host_if], ifindex[db.host_if]

    def named(src, sport, dst, dport, at: str) -> list[dict]:
        """The records of one flow as the veth `at` saw it."""
        return [r for r in rows if r.get("interfaceName") == at
                and r.get("sourceIPv4Address") == src
                and r.get("sourceTransportPort") == sport
                and r.get("destinationIPv4Address") == dst
                and r.get("destinationTransportPort") == dport]

    def one(rs: list[dict]) -> dict:
        assert rs, rows
        out = dict(rs[0])
        out["packetDeltaCount"] = sum(r["packetDeltaCount"] for r in rs)
        keys = ("destinationServicePortName", "sourcePodName", "destinationPodName",
                "sourceNodeName", "destinationNodeName", "flowType")
        assert len({tuple(r.get(k) for k in keys) for r in rs}) == 1, rs
        return out

    def check(r, packets, svc, port, cluster_ip, src_pod, dst_pod, src_node, dst_node, ftype):
        assert (r["packetDeltaCount"], r["destinationServicePortName"],
                r["destinationServicePort"], r["destinationClusterIPv4"], r["sourcePodName"],
                r["destinationPodName"], r["sourceNodeName"], r["destinationNodeName"],
                r["flowType"]) == (packets, svc, port, cluster_ip, src_pod, dst_pod, src_node,
                                   dst_node, ftype), r

    # web -> db's ClusterIP, at web's veth ingress: the Service, and conntrack's backend,
    # db of this node, whose veth is the egress interface; one packet counted once
    to_db = one(named(web.ipv4, 41080, DB_IP, 80, web.host_if))
    check(to_db, 7, "shop/db:sql", 80, DB_IP, "web", "db", NODE, NODE, 1)
    assert (to_db["ingressInterface"], to_db["egressInterface"]) == (web_if, db_if)
    # db's answers, at db's veth ingress (before un-DNAT): the Service named too
    check(one(named(db.ipv4, 8080, web.ipv4, 41080, db.host_if)), 7, "shop/db:sql", 80, DB_IP, "db",
          "web", NODE, NODE, 1)
    # web -> cache's ClusterIP: the backend is cache-0 on node-b (its EndpointSlice)
    check(one(named(web.ipv4, 41053, CACHE_IP, 53, web.host_if)), 5, "shop/cache", 53,
          CACHE_IP, "web", "cache-0", NODE, "node-b", 2)
    # its answers reach web's egress un-DNATed, from the ClusterIP: cache-0 named as source
    check(one(named(CACHE_IP, 53, web.ipv4, 41053, web.host_if)), 5, "shop/cache", 53, CACHE_IP,
          "cache-0", "web", "node-b", NODE, 2)
    # no Service: nothing named
    check(one(named(web.ipv4, 41009, db.ipv4, 9009, web.host_if)), 3, "", 0, "0.0.0.0", "web", "db",
          NODE, NODE, 1)
    if dedup:  # every packet once: the receivers' copies were skipped in the kernel
        assert named(web.ipv4, 41080, db.ipv4, 8080, db.host_if) == []
        assert named(DB_IP, 80, web.ipv4, 41080, web.host_if) == []
        svc_rows = [r for r in rows if r.get("destinationServicePortName")]
        assert sum(r["packetDeltaCount"] for r in svc_rows) == 7 + 7 + 5 + 5
    else:  # the other two forms: after DNAT at db's egress, after un-DNAT at web's egress
        check(one(named(web.ipv4, 41080, db.ipv4, 8080, db.host_if)), 7, "shop/db:sql", 80,
              DB_IP, "web", "db", NODE, NODE, 1)
        check(one(named(DB_IP, 80, web.ipv4, 41080, web.host_if)), 7, "shop/db:sql", 80,
              DB_IP, "db", "web", NODE, NODE, 1)
    # tshark reads the same elements from the wire (56506/106, 108, 109)
    by_tshark = {(r["src"], r["dport"]): r for r in raw}
    t = by_tshark[(web.ipv4, "80")]
    assert (t[109], t[108], t[106], t[103]) == (b"shop/db:sql", (80).to_bytes(2, "big"),
                                                bytes([10, 96, 0, 10]), b"db")
    t = by_tshark[(web.ipv4, "53")]
    assert (t[109], t[103], t[105]) == (b"shop/cache", b"cache-0", b"node-b")
    assert by_tshark[(web.ipv4, "9009")].get(109, b"") == b""
