"""The CNIs people run, each a lab layout: Calico (cali-like veths, /32 routes), flannel
and the bridge plugin (one bridge), Cilium (lxc veths, the pod CIDR routed through
cilium_host, no per-pod routes, Cilium's datapath on the veths and the uplink with TCX,
traffic from the uplink and from pods redirected to the peer, past the veths). In each,
with a pod in a namespace only a process holds, a pod with a second interface and a pod
not opted in: every packet at the collector once, with the right pods, interfaces and
flowType; and the CNI's programs still see every packet."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from collections import Counter
from pathlib import Path

import cnilab  # also registers the Cilium datapath stand-in for netlab.up
import netlab
import oracles
import pytest
from conftest import CNIFLOW, agent, own_bpffs, tcx_programs, wait_for
from fakeapi import FakeApiServer
from test_collector import RunningCollector
from test_counting import ifindex_of
from test_metering import pin_neighbours, ping

NODE = "node-a"
DB_RECEIVED = 'cniflow_pod_packets_total{direction="received",namespace="shop",pod="db"}'
PAST_HOOK = "cniflow_packets_past_hook_total"
PY = "/usr/bin/python3"


def send(cmd_prefix: str, dst: str, port: int, count: int, size: int) -> None:
    """count UDP datagrams of size octets, from a socket bound to port 40000 + port % 1000."""
    family = 10 if ":" in dst else 2
    code = (f"import socket;s=socket.socket({family},2);s.bind(('',{40000 + port % 1000}));"
            f"[s.sendto(b'x'*{size},('{dst}',{port})) for _ in range({count})]")
    subprocess.run(f"{cmd_prefix} {PY} -c \"{code}\"", shell=True, check=True)


def quiet_all(node, still: float = 2.0, timeout: float = 20) -> None:
    """Wait until no pod has sent anything for `still` seconds (a new pod's MLD reports
    and the like), so the veths' counters hold only what the test sends."""
    deadline = time.monotonic() + timeout
    def snapshot():
        return [node.link_stats(p.host_if)["rx_packets"] for p in node.pods]
    last, since = snapshot(), time.monotonic()
    while time.monotonic() - since < still:
        assert time.monotonic() < deadline, "the pods never went quiet"
        time.sleep(0.1)
        if (now := snapshot()) != last:
            last, since = now, time.monotonic()


def pod_rx(node, i: int) -> int:
    """Packets pod i's own end of the veth received (whatever way: through the veth, or
    redirected past it)."""
    out = subprocess.run(node.in_pod(i, "ip -j -s link show dev eth0"), shell=True,
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)[0]["stats64"]["rx"]["packets"]


def flows(rows: list[dict], **match) -> list[dict]:
    return [r for r in rows if all(r.get(k) == v for k, v in match.items())]


def total(rows: list[dict]) -> tuple[int, int]:
    return sum(r["packetDeltaCount"] for r in rows), sum(r["octetDeltaCount"] for r in rows)


def run_layout(layout: str, dedup: bool, entry: str = "auto", pod_side: bool = False,
               nodeport: bool = False) -> tuple[netlab.Node, list[dict], dict]:
    """nodeport (Cilium): the remote also sends 7 datagrams of 80 octets to the node's
    uplink address, port 30080, which Cilium DNATs to db, port 9007, the node itself
    2 of 90 to db, port 9008 (as kubelet's probes: through db's veth), and web 4 of 60
    to the node's port 30081, which iptables DNATs to db and masquerades (a hairpin)."""
    prefix = f"cn{layout[0]}{int(dedup)}{entry[1]}{'p' if pod_side else ''}"
    node = netlab.up(prefix, 4, layout=layout, unnamed=(2,), net1=(0,), remote=True)
    server = FakeApiServer(node.netns)
    uplink = f"{prefix}up"
    try:
        server.namespace("shop", {"cniflow.io/export": "true"})
        server.namespace("free", {})
        for name, pod in zip(("web", "db", "job"), node.pods, strict=False):
            server.pod("shop", name, NODE, [pod.ipv4, pod.ipv6])  # podIPs: the primary only
        loner = node.pods[3]
        server.pod("free", "loner", NODE, [loner.ipv4, loner.ipv6])  # not opted in
        collector = RunningCollector(node.netns, 4739)
        tshark = oracles.Tshark(node.netns, 4739)
        kubeconfig = server.kubeconfig(Path(f"/tmp/{prefix}-kubeconfig"))
        args = ["--kubernetes", "--node-name", NODE, "--kubeconfig", str(kubeconfig),
                "--idle-timeout", "1", "--dedup", str(dedup).lower(), "--entry-points", entry,
                "--cluster-cidr", f"10.{node.subnet}.0.0/20"]
        if layout == "cilium":
            args += ["--cilium-endpoints", node.lxc_map]
        if pod_side:
            args += ["--pod-side", "true"]
        if layout != "cilium":  # no ARP or NUD frames: the veths carry only the test's
            for i in range(len(node.pods)):
                pin_neighbours(node, i)
        quiet_all(node)  # nothing in flight when the counters are read
        before = {i: node.link_stats(i) for i in [p.host_if for p in node.pods] + [uplink]}
        pod_rx0 = [pod_rx(node, i) for i in range(len(node.pods))]
        seen0 = {i: node.datapath.seen(i) for i in [p.host_if for p in node.pods] + [uplink]} \
            if node.datapath else {}
        with agent(node, *args, interfaces=(), metered=3) as running:
            web, db, job, _ = node.pods
            if layout == "cilium" and entry == "auto":  # the uplink, loner's lxc
                assert wait_for(lambda: running.metrics().get("cniflow_entry_points") == 2, 10)
            send(node.in_pod(0, ""), db.ipv4, 9000, 10, 200)       # pod to pod, one node
            send(node.in_pod(0, ""), db.ipv6, 9001, 5, 1000)       # the same, IPv6
            send(node.in_pod(2, ""), web.ipv4, 9002, 3, 50)        # from the unnamed pod
            send(node.in_pod(0, ""), node.remote_ip, 9003, 4, 100)  # to another host
            send(node.in_remote(""), db.ipv4, 9004, 6, 60)         # from another host
            send(node.in_pod(3, ""), db.ipv4, 9005, 8, 70)         # from a pod not opted in
            if nodeport:
                node.datapath.nodeport(f"10.{node.subnet}.200.1", 30080, db.ipv4, 9007)
                send(node.in_remote(""), f"10.{node.subnet}.200.1", 30080, 7, 80)
                send(node.exec(""), db.ipv4, 9008, 2, 90)  # from the node: through the veth
                # web to the node's 30081, DNAT'ed to db and masqueraded by iptables (a
                # hairpin): counted at web's veth only, as db's ICMP errors back to web
                sub = node.subnet
                for rule in (f"PREROUTING -d 10.{sub}.200.1 -p udp --dport 30081 -j DNAT "
                             f"--to-destination {db.ipv4}:9009",
                             f"POSTROUTING -d {db.ipv4} -p udp --dport 9009 -j MASQUERADE"):
                    subprocess.run(node.exec(f"iptables -t nat -A {rule}").split(), check=True)
                subprocess.run(node.in_pod(1, "iptables -A OUTPUT -p icmp --icmp-type "
                                              "port-unreachable -j DROP").split(), check=True)
                send(node.in_pod(0, ""), f"10.{sub}.200.1", 30081, 4, 60)
            ping(node, 1, web.ipv4, 3)                              # both ways
            time.sleep(2.5)
            if layout == "cilium" and entry == "off":  # what came from the remote and the
                # unmetered pod, redirected past the veths: said within a check (5 s) and
                # the drain after it, and stays said once
                assert wait_for(lambda: running.metrics().get(PAST_HOOK, 0) >= 18, 20)
            if layout == "cilium":  # a check (every 5 s) after it all: anything unseen
                time.sleep(6)  # is said, and nothing more than once
            metrics = running.metrics()
        after = {i: node.link_stats(i) for i in [p.host_if for p in node.pods] + [uplink]}
        pod_rx1 = [pod_rx(node, i) for i in range(len(node.pods))]
        tshark.stop()
        assert tshark.expert() == []
        rows = collector.stop()
        extra = {"metrics": metrics, "before": before,
                 "after": after,
                 "seen": {i: node.datapath.seen(i) - seen0[i] for i in seen0},
                 "cni_attached": all(node.datapath.attached(i) for i in seen0)
                 if node.datapath else True, "uplink": uplink,
                 "ifindex": {p.host_if: ifindex_of(node, p.host_if) for p in node.pods},
                 "pod_rx": [b - a for a, b in zip(pod_rx0, pod_rx1, strict=True)]}
        return node, rows, extra
    finally:
        server.stop()
        netlab.down(prefix)


@pytest.mark.parametrize("layout", ["routed", "bridged", "cilium"])
def test_every_packet_once_with_the_right_pods_on_each_cni(layout):
    node, rows, x = run_layout(layout, dedup=True)
    web, db, job, loner = node.pods
    idx = x["ifindex"]
    ip_len = {9000: 228, 9001: 1048, 9002: 78, 9003: 128, 9004: 88, 9005: 98}
    count = {9000: 10, 9001: 5, 9002: 3, 9003: 4, 9004: 6, 9005: 8}
    # Cilium's BPF host routing delivers what comes from a physical device (another node,
    # outside) and from a pod with bpf_redirect_peer, past the receiving pod's veth: the
    # entry points (the uplink, the unmetered pod's lxc) count it where it comes in, so
    # nothing is left past the hook
    assert x["metrics"].get(PAST_HOOK, 0) == 0
    entry = 6 + 4 + 8 if layout == "cilium" else 0  # the remote's datagrams and ICMP
    assert x["metrics"].get("cniflow_entry_packets_total", 0) == entry  # errors, loner's
    assert x["metrics"]["cniflow_entry_points"] == (2 if layout == "cilium" else 0)
    for port, n in count.items():  # once, whatever layout
        assert total(flows(rows, destinationTransportPort=port)) == (n, n * ip_len[port]), port
    # pod to pod on this node: one record, from the sender's veth, naming both pods and
    # both interfaces, intra-node
    (r,) = flows(rows, destinationTransportPort=9000)
    assert (r["flowDirection"], r["ingressInterface"], r["egressInterface"]) == (
        0, idx[web.host_if], idx[db.host_if])
    assert (r["sourcePodName"], r["destinationPodName"], r["flowType"]) == ("web", "db", 1)
    (r,) = flows(rows, destinationTransportPort=9002)
    assert (r["sourcePodName"], r["destinationPodName"], r["ingressInterface"]) == (
        "job", "web", idx[job.host_if])  # the pod whose namespace has no name
    (r,) = flows(rows, destinationTransportPort=9003)
    assert (r["sourcePodName"], r["destinationPodName"], r["flowType"]) == ("web", "", 3)
    for r in flows(rows, destinationTransportPort=9004):  # as where it enters the pod
        assert (r["flowDirection"], r["egressInterface"], r["destinationPodName"],
                r["flowType"]) == (1, idx[db.host_if], "db", 4)
    for r in flows(rows, destinationTransportPort=9005):  # from the pod not opted in
        assert (r["flowDirection"], r["egressInterface"], r["sourcePodName"],
                r["destinationPodName"], r["flowType"]) == (1, idx[db.host_if], "loner", "db", 1)
    unreachable = flows(rows, protocolIdentifier=1, icmpTypeCodeIPv4=3 << 8 | 3,
                        sourceIPv4Address=node.remote_ip)
    assert [(r["destinationPodName"], r["packetDeltaCount"]) for r in unreachable] == [
        ("web", 4)]  # answering web's datagrams to the remote
    echo = Counter((r["sourcePodName"], r["icmpTypeCodeIPv4"], r["packetDeltaCount"])
                   for r in flows(rows, protocolIdentifier=1) if r["icmpTypeCodeIPv4"] in
                   (0, 8 << 8))
    assert echo == {("db", 8 << 8, 3): 1, ("web", 0, 3): 1}, echo
    # what each pod's veth received from its pod, every packet, in the records (with
    # dedup every packet a pod sent is counted at its own veth's ingress)
    for p in node.pods[:3]:
        sent = x["after"][p.host_if]["rx_packets"] - x["before"][p.host_if]["rx_packets"]
        mine = flows(rows, ingressInterface=idx[p.host_if], flowDirection=0)
        assert sum(r["packetDeltaCount"] for r in mine) == sent, p.host_if
    # Prometheus: db received web's datagrams (counted at web's veth), the remote's, and
    # the replies to its pings: once each
    m = x["metrics"]
    assert m[DB_RECEIVED] == 10 + 5 + 6 + 8 + 3
    assert m["cniflow_pods_attached"] == 3
    if layout == "cilium":  # Cilium's programs still saw every packet that came in through
        for i in x["seen"]:  # the lxcs and the uplink, and are still there
            assert x["seen"][i] == x["after"][i]["rx_packets"] - x["before"][i]["rx_packets"], i
        assert x["cni_attached"]


def test_cilium_without_entry_points_says_what_it_misses():
    """--entry-points off: what Cilium delivered past the veths is not counted, and
    cniflow says how much, exactly: the remote's 6 datagrams to db, its 4 ICMP port
    unreachables answering web's 4 datagrams and the unmetered pod's 8 datagrams to db
    (the pod-to-pod packets between metered pods, also redirected past the receivers'
    veths, were counted at the senders': not in it)."""
    node, rows, x = run_layout("cilium", dedup=True, entry="off")
    assert x["metrics"][PAST_HOOK] == 6 + 4 + 8
    assert total(flows(rows, destinationTransportPort=9004)) == (0, 0)
    assert total(flows(rows, destinationTransportPort=9005)) == (0, 0)
    assert total(flows(rows, destinationTransportPort=9000)) == (10, 2280)
    assert x["metrics"][DB_RECEIVED] == 10 + 5 + 3
    assert x["metrics"]["cniflow_entry_points"] == 0


@pytest.mark.parametrize("layout", ["routed", "cilium"])
def test_without_dedup_every_observation_point_is_kept(layout):
    """--dedup false: a packet between two pods of the node is reported by each veth that
    saw it, told apart by flowDirection; the sender's side alone still sums to once.
    Cilium's redirect to the peer skips the receiver's veth: there, once either way."""
    node, rows, x = run_layout(layout, dedup=False)
    both = flows(rows, destinationTransportPort=9000)
    assert total(flows(both, flowDirection=0)) == (10, 2280)
    assert total(flows(both, flowDirection=1)) == ((10, 2280) if layout == "routed" else (0, 0))
    assert x["metrics"]["cniflow_packets_deduplicated_total"] == 0
    # the per-pod counters count each packet once all the same
    assert x["metrics"][DB_RECEIVED] == 10 + 5 + 6 + 8 + 3


@contextlib.contextmanager
def passing_uplink(prefix: str, on: str = "up", attach: str = "tcx", setup=None):
    """A routed node with pods web and db opted in (neighbours pinned), a remote host
    behind its uplink, and a stand-in CNI program that passes packets on to the stack on
    the interfaces `on` names (space-separated suffixes of the prefix), made by setup(node)
    first if given: (node, standin, the agent's Kubernetes arguments)."""
    node = netlab.up(prefix, 2, layout="routed", remote=True)
    server, standin = FakeApiServer(node.netns), None
    try:
        server.namespace("shop", {"cniflow.io/export": "true"})
        for name, pod in zip(("web", "db"), node.pods, strict=True):
            server.pod("shop", name, NODE, [pod.ipv4, pod.ipv6])
        for i in range(2):
            pin_neighbours(node, i)
        if setup is not None:
            setup(node)
        standin = cnilab.StandIn(node.netns, [prefix + s for s in on.split()], mode="pass",
                                 attach=attach)
        kubeconfig = server.kubeconfig(Path(f"/tmp/{prefix}-kubeconfig"))
        yield node, standin, ["--kubernetes", "--node-name", NODE, "--kubeconfig",
                              str(kubeconfig), "--idle-timeout", "1"]
    finally:
        if standin is not None:
            standin.close()
        server.stop()
        netlab.down(prefix)


def nodeport(node) -> None:
    """A NodePort as kube-proxy makes it: UDP to the node's uplink address, port 30080,
    DNAT'ed by iptables to db (the second pod), port 9007."""
    subprocess.run(node.exec(
        f"iptables -t nat -A PREROUTING -d 10.{node.subnet}.200.1 -p udp --dport 30080 "
        f"-j DNAT --to-destination {node.pods[1].ipv4}:9007").split(), check=True)


def macvlan(node) -> None:
    """A macvlan over the uplink (PREFIXmv, 10.S.201.1; a VLAN or a bond is the same to
    the kernel's adjacency lists, and this kernel has neither), through which the remote
    host reaches web (the first pod)."""
    p, sub, web = node.prefix, node.subnet, node.pods[0]
    netlab.batch(node.netns, [f"link add link {p}up name {p}mv type macvlan mode bridge",
                              f"addr add 10.{sub}.201.1/24 dev {p}mv", f"link set {p}mv up"])
    netlab.batch(node.remote_netns, [f"addr add 10.{sub}.201.2/24 dev eth0",
                                     f"route add {web.ipv4}/32 via 10.{sub}.201.1"])
    subprocess.run(node.in_remote(f"ping -c 1 -W 5 {web.ipv4}").split(), check=True,
                   stdout=subprocess.DEVNULL)  # the neighbours on the way, resolved


@pytest.mark.parametrize("mode", ["tcx", "tc"])
def test_an_entry_point_before_a_cni_that_passes_to_the_stack_counts_once(mode):
    """A CNI program on the uplink that passes packets on to the stack (Calico's eBPF
    dataplane, Cilium with legacy host routing) makes the uplink an entry point all the
    same (--entry-points auto). What the remote host sends a pod is counted there and
    not again at the pod's veth, which it still crosses; what iptables DNATs to a pod
    after the entry point (a NodePort) is for the node's address there, and is counted
    at the veth. A macvlan stacked on the uplink with the CNI's program too is not an
    entry point (a packet crosses both ingresses), and what comes through it is counted
    once, at the uplink, though it reaches the pod's veth from the macvlan. Once each,
    with TCX and with cls_bpf; the CNI's program still sees every packet and is still
    there after cniflow exits."""
    prefix = f"cne{mode[1]}"
    uplink = f"{prefix}up"

    def setup(node):
        nodeport(node)
        macvlan(node)

    with passing_uplink(prefix, on="up mv", attach=mode, setup=setup) as (node, standin, k8s):
        web, db = node.pods
        collector = RunningCollector(node.netns, 4739)
        quiet_all(node)
        web_if, db_if = ifindex_of(node, web.host_if), ifindex_of(node, db.host_if)
        seen0, rx0 = standin.seen(uplink), node.link_stats(uplink)["rx_packets"]
        mv0 = standin.seen(f"{prefix}mv")
        with agent(node, *k8s, "--attach", mode, interfaces=()) as running:
            time.sleep(1.5)  # a reconcile or two: every interface looked at
            assert running.metrics()["cniflow_entry_points"] == 1
            send(node.in_remote(""), db.ipv4, 9006, 7, 60)
            send(node.in_remote(""), f"10.{node.subnet}.200.1", 30080, 5, 40)  # a NodePort
            send(node.in_remote(""), web.ipv4, 9008, 9, 60)  # through the macvlan
            time.sleep(2.5)
            metrics = running.metrics()
        rows = collector.stop()
        seen, rx = standin.seen(uplink) - seen0, node.link_stats(uplink)["rx_packets"] - rx0
        seen_mv = standin.seen(f"{prefix}mv") - mv0
        still = standin.attached()
    into_db = flows(rows, egressInterface=db_if, flowDirection=1)
    assert total(flows(into_db, destinationTransportPort=9006)) == (7, 7 * 88)
    assert total(flows(into_db, destinationTransportPort=9007)) == (5, 5 * 68)
    into_web = flows(rows, egressInterface=web_if, flowDirection=1)
    assert total(flows(into_web, destinationTransportPort=9008)) == (9, 9 * 88)
    assert total(flows(rows, protocolIdentifier=17)) == (21, 16 * 88 + 5 * 68)
    assert metrics["cniflow_entry_packets_total"] == 7 + 9
    # crossed the veths all the same: skipped at their egress, as counted where they came in
    assert metrics["cniflow_packets_deduplicated_total"] == 7 + 9
    assert metrics.get(PAST_HOOK, 0) == 0
    assert seen == rx >= 21 and seen_mv >= 9 and still


def test_a_flood_through_an_entry_point_keeps_the_totals_exact():
    """The remote host floods a pod with new flows through an entry point whose CNI
    program passes them on to the stack, with a map far too small, and sends to a
    NodePort DNAT'ed to the pod meanwhile: what the entry point counted in its overflow
    entry is not counted again at the veth it still crosses, and the NodePort's
    datagrams, not counted at the entry point, are counted at the veth. Summed over
    every record into the pod (flows and overflow), packets equal what the veth
    transmitted, once."""
    from bench.accuracy import build

    flood, n = build("udpflood"), 300
    with passing_uplink("cnfl", setup=nodeport) as (node, _, k8s):
        db = node.pods[1]
        collector = RunningCollector(node.netns, 4739, "tcp", 9478, "--rotate-bytes", "0")
        quiet_all(node)
        db_if = ifindex_of(node, db.host_if)
        before = node.link_stats(db.host_if)
        with agent(node, *k8s, "--transport", "tcp", "--map-size", "512",
                   interfaces=()) as running:
            assert wait_for(lambda: running.metrics().get("cniflow_entry_points") == 1, 10)
            code = (f"import socket,time;s=socket.socket(2,2)\nfor i in range({n}):\n"
                    f" s.sendto(b'x'*40,('10.{node.subnet}.200.1',30080));time.sleep(0.004)")
            trickle = subprocess.Popen(node.in_remote(f'{PY} -c "{code}"'), shell=True)
            sent = int(subprocess.run(node.in_remote(f"{flood} {db.ipv4} 40000 1.5 18"),
                                      shell=True, check=True, capture_output=True,
                                      text=True).stdout.split()[0])
            assert trickle.wait(30) == 0
            time.sleep(3)
            metrics = running.metrics()
        after = node.link_stats(db.host_if)
        rows = collector.stop()
    crossed = after["tx_packets"] - before["tx_packets"]
    into_db = flows(rows, egressInterface=db_if, flowDirection=1)
    assert sum(r["packetDeltaCount"] for r in into_db) == crossed == sent + n
    assert metrics["cniflow_entry_packets_total"] == sent
    over = f'cniflow_overflow_packets_total{{direction="out",interface="{db.host_if}"}}'
    assert metrics[over] > 0  # the map was full: overflow records carried the rest


ECHO = ("import socket;s=socket.socket(2,2);s.bind(('',9010));print('ready',flush=True);"
        "peers=set()\nfor _ in range({n}):\n d,a=s.recvfrom(2048);peers.add(a);s.sendto(d,a)\n"
        "print(*['%s:%d' % p for p in peers])")
ASK = ("import socket;s=socket.socket(2,2);s.bind(('',20010));s.settimeout(5)\n"
       "for _ in range({n}):\n s.sendto(b'x'*{size},('{ip}',9010));s.recv(2048)\nprint('ok')")


def test_replies_to_a_masqueraded_pod_are_counted_where_they_come_in():
    """Cilium's BPF masquerade: a pod's datagrams leave with the node's address and
    another port (the pod's is below Cilium's NAT range), the replies come back to it,
    and Cilium rewrites them back to the pod and delivers them past its veth. The entry
    point finds the pod in Cilium's SNAT map (its real layout) and counts each reply for
    it, as the pod receives it (its address and port); nothing is left past the hook."""
    prefix = "cnms"
    node = netlab.up(prefix, 2, layout="cilium", remote=True)
    server = FakeApiServer(node.netns)
    web, n = node.pods[0], 5
    try:
        server.namespace("shop", {"cniflow.io/export": "true"})
        for name, pod in zip(("web", "db"), node.pods, strict=True):
            server.pod("shop", name, NODE, [pod.ipv4, pod.ipv6])
        node.datapath.masquerade(f"10.{node.subnet}.200.1")
        collector = RunningCollector(node.netns, 4739)
        kubeconfig = server.kubeconfig(Path(f"/tmp/{prefix}-kubeconfig"))
        echo = subprocess.Popen(node.in_remote(f'{PY} -c "{ECHO.format(n=n)}"'), shell=True,
                                stdout=subprocess.PIPE, text=True)
        assert echo.stdout.readline().strip() == "ready"
        web_if = ifindex_of(node, web.host_if)
        with agent(node, "--kubernetes", "--node-name", NODE, "--kubeconfig",
                   str(kubeconfig), "--idle-timeout", "1", "--cilium-endpoints",
                   node.lxc_map, interfaces=()) as running:
            assert wait_for(lambda: running.metrics().get("cniflow_entry_points") == 1, 10)
            ask = ASK.format(n=n, size=100, ip=node.remote_ip)
            out = subprocess.run(node.in_pod(0, f'{PY} -c "{ask}"'), shell=True,
                                 capture_output=True, text=True, timeout=60)
            assert out.stdout.strip() == "ok", out.stderr
            peers = echo.communicate(timeout=10)[0].split()
            time.sleep(6)  # a past-hook check (every 5 s) after it all: anything unseen
            metrics = running.metrics()
        rows = collector.stop()
    finally:
        server.stop()
        netlab.down(prefix)
    # masqueraded: the remote saw the node, and the port clamped into Cilium's range
    assert peers == [f"10.{node.subnet}.200.1:{20010 % 32767 + 32768}"]
    sent = flows(rows, ingressInterface=web_if, flowDirection=0, destinationTransportPort=9010)
    assert total(sent) == (n, n * 128)
    replies = flows(rows, egressInterface=web_if, flowDirection=1, sourceTransportPort=9010)
    assert total(replies) == (n, n * 128)
    assert {(r["destinationIPv4Address"], r["destinationTransportPort"],
             r["destinationPodName"]) for r in replies} == {(web.ipv4, 20010, "web")}
    assert metrics["cniflow_entry_packets_total"] == n
    assert metrics.get(PAST_HOOK, 0) == 0


def test_a_snat_map_cilium_makes_anew_or_removes_is_followed():
    """Cilium makes its SNAT map anew when it restarts or resizes it: the new one goes
    into the program at the next check; one removed, or made with other flags (which a
    map-in-map cannot hold), is taken out, and the program looks nothing up."""
    import os
    import struct

    from bpf import masquerade, syscall
    from bpf.program import FlowProgram

    fs = Path(f"/run/cniflow-lab/snat{os.getpid() % 1000}")
    fs.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "bpf", "bpf", str(fs)], check=True)
    program = None
    try:
        (fs / "tc/globals").mkdir(parents=True)
        pin = str(fs / "tc/globals" / masquerade.NAT_MAP)

        def cilium_makes(flags: int = 0) -> int:
            if os.path.exists(pin):
                os.unlink(pin)
            fd = syscall.map_create(syscall.MAP_LRU_HASH, 14, 40, 4096, flags, "snat")
            syscall.obj_pin(fd, pin)
            ident = syscall.map_id(fd)
            os.close(fd)
            return ident

        def in_program() -> int:  # the id of the map the program looks replies up in
            try:
                raw = syscall.lookup(program.nat_fd, struct.pack("<I", 0), 4)
            except OSError:
                return 0
            return struct.unpack("<I", raw)[0]

        first = cilium_makes()
        nat = masquerade.Masquerade(str(fs / "tc/globals/cilium_lxc"))
        assert nat.template == "lru_hash,0"
        program = FlowProgram(1024, nat=nat.template)
        nat.refresh(program)
        assert in_program() == first
        second = cilium_makes()  # restarted: a new map at the same pin
        nat.refresh(program)
        assert in_program() == first  # not before the next check
        nat.next_check = 0
        nat.refresh(program)
        assert in_program() == second != first
        cilium_makes(flags=2)  # BPF_F_NO_COMMON_LRU: not what the program was built for
        nat.next_check = 0
        nat.refresh(program)
        assert in_program() == 0
        third = cilium_makes()
        nat.next_check = 0
        nat.refresh(program)
        assert in_program() == third
        os.unlink(pin)  # masquerading turned off
        nat.next_check = 0
        nat.refresh(program)
        assert in_program() == 0
    finally:
        if program is not None:
            program.close()
        subprocess.run(["umount", str(fs)], check=False)
        fs.rmdir()


@pytest.mark.parametrize("pod_side", [False, True])
def test_a_nodeport_to_a_local_pod_is_counted_at_the_pods_end(pod_side):
    """Cilium DNATs a NodePort's datagrams to db after the uplink's entry point and
    delivers them past db's veth. Without --pod-side they are only said (past the hook);
    with it they are counted at db's own end of the veth, and every other packet is
    still counted once: each metered pod's end received exactly what the records say."""
    node, rows, x = run_layout("cilium", dedup=True, pod_side=pod_side, nodeport=True)
    web, db, job, _ = node.pods
    idx, m = x["ifindex"], x["metrics"]
    nodeport = flows(rows, destinationTransportPort=9007)
    if not pod_side:
        assert m[PAST_HOOK] == 7
        assert total(nodeport) == (0, 0)
        assert total(flows(rows, destinationTransportPort=9008)) == (2, 2 * 118)
        return
    assert total(nodeport) == (7, 7 * 108)
    for r in nodeport:  # as the pod received it: from the remote, to db, at db's veth
        assert (r["flowDirection"], r["egressInterface"], r["destinationPodName"],
                r["sourceIPv4Address"], r["destinationIPv4Address"]) == (
            1, idx[db.host_if], "db", node.remote_ip, db.ipv4)
    assert m["cniflow_pod_ends"] == 3
    assert m.get("cniflow_entry_packets_total", 0) == 0  # the pods' ends counted those
    ip_len = {9000: 228, 9001: 1048, 9002: 78, 9003: 128, 9004: 88, 9005: 98, 9008: 118}
    count = {9000: 10, 9001: 5, 9002: 3, 9003: 4, 9004: 6, 9005: 8, 9008: 2}
    for port, n in count.items():
        assert total(flows(rows, destinationTransportPort=port)) == (n, n * ip_len[port]), port
    (r,) = flows(rows, destinationTransportPort=9000)  # pod to pod: once, at the sender's
    assert (r["flowDirection"], r["ingressInterface"], r["egressInterface"]) == (
        0, idx[web.host_if], idx[db.host_if])
    # the hairpin: once, at web's veth, as web sent it, though db got it from the node's
    # address (db answers with no port unreachables here: their number is rate-limited)
    assert total(flows(rows, destinationTransportPort=30081)) == (4, 4 * 88)
    assert total(flows(rows, destinationTransportPort=9009)) == (0, 0)
    hairpin = {db.ipv4: 4}  # db received web's datagrams from the node's address
    for i, p in enumerate((web, db, job)):  # what each pod's end received, once
        got = [r for r in rows if p.ipv4 == r.get("destinationIPv4Address") or
               p.ipv6 == r.get("destinationIPv6Address")]
        assert sum(r["packetDeltaCount"] for r in got) + hairpin.get(p.ipv4, 0) == \
            x["pod_rx"][i], p.host_if
    assert m[DB_RECEIVED] == 10 + 5 + 6 + 8 + 3 + 7 + 2


@contextlib.contextmanager
def cilium_with_nodeport(prefix: str):
    """A Cilium node with pods web and db opted in, a remote host, a NodePort (30080,
    UDP) to db and a bpffs of its own: (node, the agent's arguments, pin path)."""
    node = netlab.up(prefix, 2, layout="cilium", remote=True)
    server = FakeApiServer(node.netns)
    try:
        server.namespace("shop", {"cniflow.io/export": "true"})
        for name, pod in zip(("web", "db"), node.pods, strict=True):
            server.pod("shop", name, NODE, [pod.ipv4, pod.ipv6])
        node.datapath.nodeport(f"10.{node.subnet}.200.1", 30080, node.pods[1].ipv4, 9007)
        kubeconfig = server.kubeconfig(Path(f"/tmp/{prefix}-kubeconfig"))
        with own_bpffs(f"{prefix}-pins") as fs:
            yield node, ["--kubernetes", "--node-name", NODE, "--kubeconfig",
                         str(kubeconfig), "--idle-timeout", "1", "--cilium-endpoints",
                         node.lxc_map], str(fs / "cniflow")
    finally:
        server.stop()
        netlab.down(prefix)


def pod_end_programs(node) -> list[list[str]]:
    """The programs on each pod's own end of its veth (TCX ingress, in its namespace)."""
    return [tcx_programs(p.netns, "eth0") for p in node.pods]


def test_pod_ends_are_handed_over_adopted_and_removed():
    """--pod-side with pins: a handover leaves each pod end's link, the next agent adopts
    it (one link, never two) and counts the NodePort's datagrams at db's end; an agent
    without --pod-side takes the links off and its host sides count again (the node's
    datagrams to db once, the NodePort's said past the hook); at its exit nothing is left."""
    with cilium_with_nodeport("cnpe") as (node, args, pins):
        db = node.pods[1]
        collector = RunningCollector(node.netns, 4739)
        common = [*args, "--pin-path", pins]
        for _ in range(2):
            with agent(node, *common, "--pod-side", "true", "--handover", "true",
                       interfaces=()) as running:
                assert wait_for(lambda r=running: r.metrics().get("cniflow_pod_ends") == 2,
                                15), running.log.read_text()
                assert pod_end_programs(node) == [["cniflow_pod"]] * 2
                send(node.in_remote(""), f"10.{node.subnet}.200.1", 30080, 7, 80)
                time.sleep(1.5)
        assert pod_end_programs(node) == [["cniflow_pod"]] * 2  # handed over again
        assert "adopted pinned pod-end links" in running.log.read_text()
        with agent(node, *common, interfaces=()) as running:
            # the host sides' links were adopted: attached already when it starts
            assert wait_for(lambda: running.metrics().get("cniflow_pods_attached") == 2, 15)
            assert pod_end_programs(node) == [[], []]
            time.sleep(0.5)  # the veths' counters read once after the attach (the baseline)
            send(node.exec(""), db.ipv4, 9008, 2, 90)
            send(node.in_remote(""), f"10.{node.subnet}.200.1", 30080, 5, 80)
            assert wait_for(lambda: running.metrics().get(PAST_HOOK, 0) == 5, 20)
        assert pod_end_programs(node) == [[], []]
        assert not os.path.exists(pins)
        rows = collector.stop()
        assert total(flows(rows, destinationTransportPort=9007)) == (14, 14 * 108)
        assert total(flows(rows, destinationTransportPort=9008)) == (2, 2 * 118)


def test_pod_side_says_what_it_needs():
    """--pod-side without what it needs is refused at start, naming it (exit 2)."""
    with cilium_with_nodeport("cnpn") as (node, args, _):
        no_sys_admin = ["setpriv", "--bounding-set", "-sys_admin", "--inh-caps",
                        "-sys_admin", "--"]
        for wrap, extra, said in (
                ([], ["--pod-side", "true"], "needs --kubernetes"),
                ([], [*args, "--pod-side", "true", "--attach", "tc"], "needs TCX"),
                (no_sys_admin, [*args, "--pod-side", "true"], "needs CAP_SYS_ADMIN")):
            r = subprocess.run(["ip", "netns", "exec", node.netns, *wrap, str(CNIFLOW), "agent",
                                "--pin-path", "off", *extra], capture_output=True,
                               text=True, timeout=60)
            assert r.returncode == 2, r.stderr
            assert said in r.stderr, r.stderr
