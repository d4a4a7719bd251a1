"""Every packet, once, whatever its layout and however many flows: packets and octets at
the collector equal what crossed the pods' veths, read from the veths' own counters."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from conftest import agent, tcx_programs, wait_for
from test_collector import RunningCollector
from test_metering import pin_neighbours, quiet, send_udp


def mac_of(node, ifname: str) -> str:
    return subprocess.run(node.exec(f"cat /sys/class/net/{ifname}/address").split(),
                          capture_output=True, text=True, check=True).stdout.strip()


def tx_ring(node, txring, pod: int, dst: str, flows: int, count: int, payload: int) -> float:
    """Send count UDP frames from a pod through an AF_PACKET TX ring; returns frames/s."""
    p = node.pods[pod]
    out = subprocess.run(node.in_pod(pod, f"{txring} eth0 {mac_of(node, p.host_if)} {p.ipv4} "
                                          f"{dst} {flows} {count} {payload}"),
                         shell=True, capture_output=True, text=True, check=True).stdout.split()
    assert int(out[0]) == count
    return count / float(out[2])


def ingress_totals(rows: list[dict], ifindex: int) -> tuple[int, int]:
    mine = [r for r in rows if r.get("ingressInterface") == ifindex and r.get("flowDirection") == 0]
    return sum(r["packetDeltaCount"] for r in mine), sum(r["octetDeltaCount"] for r in mine)


def ifindex_of(node, ifname: str) -> int:
    return int(subprocess.run(node.exec(f"cat /sys/class/net/{ifname}/ifindex").split(),
                              capture_output=True, text=True, check=True).stdout)


def settled(collector: RunningCollector) -> list[dict]:
    """Wait until the collector has taken everything, then stop it and read its lines."""
    def count() -> float:
        return sum(v for k, v in collector.metrics().items()
                   if k.startswith("cniflow_collector_records_total"))
    last = -1.0
    while (now := count()) != last:
        last = now
        time.sleep(1)
    collector.proc.send_signal(15)
    assert collector.proc.wait(30) == 0
    with collector.out.open() as f:
        return [json.loads(line) for line in f]


def test_frames_from_an_af_packet_tx_ring_are_all_counted(node, txring):
    """A TX ring's skbs carry only the Ethernet header in their linear part: the program
    pulls the rest on its slow path. At the highest rate the ring reaches here, packets
    and octets equal the veth's own counters, and nothing is called malformed."""
    a, b = node.pods
    pin_neighbours(node, 0)
    quiet(node, a.host_if)
    collector = RunningCollector(node.netns, 4739, "tcp")
    before = node.link_stats(a.host_if)
    with agent(node, "--transport", "tcp", "--idle-timeout", "1") as running:
        rate = tx_ring(node, txring, 0, b.ipv4, flows=64, count=200_000, payload=18)
        time.sleep(1.5)
        m = running.metrics()
    after = node.link_stats(a.host_if)
    rows = settled(collector)
    packets = after["rx_packets"] - before["rx_packets"]
    octets = after["rx_bytes"] - before["rx_bytes"] - 14 * packets
    print(f"TX ring: {rate:,.0f} frames/s")
    assert packets >= 200_000
    assert ingress_totals(rows, ifindex_of(node, a.host_if)) == (packets, octets)
    assert m["cniflow_packets_malformed_total"] == 0
    # the flows kept their ports: 64 of them, each with its share
    ring = [r for r in rows if r.get("sourceTransportPort") == 1024 and r.get("flowDirection") == 0]
    assert {r["destinationTransportPort"] for r in ring} == set(range(1, 65))


def test_a_flood_of_new_flows_keeps_the_totals_exact(node, txring):
    """A million datagrams, each opening a new flow, as fast as the TX ring sends them
    (400,000 to 700,000 a second on session 14's machine): the map is drained early when
    it fills, and what still finds no room leaves in per-interface overflow records.
    Summed over all records, packets and octets equal the veth's counters; the flow-level
    share is reported. The map holds 4,096 flows, so it fills however fast this machine
    floods (with the default 65,536, a slower machine's run saw no overflow, and the
    unbounded wait for one hung the suite)."""
    a, b = node.pods
    pin_neighbours(node, 0)
    quiet(node, a.host_if)
    collector = RunningCollector(node.netns, 4739, "tcp", 9478, "--rotate-bytes", "0")
    before = node.link_stats(a.host_if)
    count = 1_000_000
    with agent(node, "--transport", "tcp", "--idle-timeout", "1",
               "--map-size", "4096") as running:
        rate = tx_ring(node, txring, 0, b.ipv4, flows=count, count=count, payload=18)
        key = f'cniflow_overflow_packets_total{{direction="in",interface="{a.host_if}"}}'
        seen: tuple = ()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # until every drained count is out, and the
            m = running.metrics()           # collector has it all
            received = sum(v for k, v in collector.metrics().items()
                           if k.startswith("cniflow_collector_records_total"))
            now = (m.get(key), m["cniflow_records_exported_total"], m["cniflow_flows_active"],
                   received)
            if now == seen:
                break
            seen = now
            time.sleep(1.5)
    after = node.link_stats(a.host_if)
    rows = settled(collector)
    packets = after["rx_packets"] - before["rx_packets"]
    octets = after["rx_bytes"] - before["rx_bytes"] - 14 * packets
    # no speed asserted (a busy machine floods slower; bench/accuracy.py measures): what
    # proves the flood is that the map filled, below: overflow records and early drains
    assert packets >= count, rate
    ifindex = ifindex_of(node, a.host_if)
    assert ingress_totals(rows, ifindex) == (packets, octets)
    over = [r for r in rows if r.get("ingressInterface") == ifindex
            and r.get("protocolIdentifier") == 0
            and r.get("sourceIPv4Address", r.get("sourceIPv6Address")) in ("0.0.0.0", "::")]
    in_overflow = sum(r["packetDeltaCount"] for r in over)
    assert in_overflow == m.get(key, 0) > 0, (in_overflow, rate)
    # (pod1 answers some datagrams with ICMP port unreachable: overflow on its veth too)
    assert sum(v for k, v in m.items() if k.startswith("cniflow_overflow_packets_total")) == \
        m["cniflow_map_failed_inserts_total"]
    assert m["cniflow_packets_lost_total"] == 0 and m["cniflow_early_drains_total"] > 0
    print(f"flood: {rate:,.0f} new flows/s; {1 - in_overflow / packets:.1%} of packets in "
          f"flow records, {in_overflow:,} in {len(over)} overflow records")


def test_gro_super_packets_count_the_segments_the_veth_counted(node):
    """The pod sends MSS-sized segments (TSO and GSO off), the host-side veth merges them
    with GRO (NAPI): the program sees fewer, larger skbs than the veth counted. Packets
    and octets (each segment's IP and TCP headers included) still equal the veth's own
    counters, and a capture on the veth shows the super-packets were there."""
    a, b = node.pods
    pin_neighbours(node, 0)
    subprocess.run(node.in_pod(0, "ethtool -K eth0 tso off gso off"), shell=True, check=True)
    subprocess.run(node.exec(f"ethtool -K {a.host_if} gro on"), shell=True, check=True)
    quiet(node, a.host_if)
    collector = RunningCollector(node.netns, 4739, "tcp")
    wire = Path(tempfile.mkdtemp()) / "veth.pcap"  # what the host side's ingress saw
    cap = subprocess.Popen(["ip", "netns", "exec", node.netns, "tshark", "-i", a.host_if,
                            "-s", "96", "-B", "64", "-f", "tcp port 5201", "-F", "pcap",
                            "-w", str(wire), "-q"], stderr=subprocess.PIPE, text=True)
    while "Capturing on" not in (cap.stderr.readline() or "Capturing on"):
        pass
    before = node.link_stats(a.host_if)
    with agent(node, "--transport", "tcp", "--idle-timeout", "1"):
        assert node.tcp_transfer(0, 1, 4 << 20) == 4 << 20
        time.sleep(2)
    after = node.link_stats(a.host_if)
    cap.send_signal(signal.SIGINT)
    cap.wait(15)
    sizes = [int(x) for x in subprocess.run(
        ["tshark", "-r", str(wire), "-T", "fields", "-e", "ip.len"], capture_output=True,
        text=True, check=True).stdout.split()]
    rows = settled(collector)
    packets = after["rx_packets"] - before["rx_packets"]
    # On its NAPI path the veth counts bytes after the Ethernet header was pulled
    # (__dev_forward_skb, then veth_xdp_rcv): the IP octets, as records count them.
    octets = after["rx_bytes"] - before["rx_bytes"]
    assert max(sizes) > 1500 and len(sizes) < packets, (max(sizes), len(sizes), packets)
    assert ingress_totals(rows, ifindex_of(node, a.host_if)) == (packets, octets)



@pytest.mark.parametrize("cni", ["pass", "redirect"])
def test_a_cni_attached_with_tcx_that_ends_the_hook_hides_nothing(node, cni):
    """A CNI program on the veth's TCX ingress that ends the hook (TCX_PASS), or redirects
    to the receiving pod's peer, as Cilium's do. cniflow's link goes to the head of the
    chain: it counts every packet, the CNI's program still sees every one, and is still
    attached after cniflow exits. With --attach tc, cls_bpf runs after every TCX program
    and sees nothing: what the issue measured (0 of 150)."""
    import cnilab

    a, b = node.pods
    pin_neighbours(node, 0)
    targets = {b.ipv4: b.host_if} if cni == "redirect" else {}
    standin = cnilab.StandIn(node.netns, [a.host_if], mode=cni, targets=targets)
    try:
        counted = {}
        for mode in ("tcx", "tc"):
            quiet(node, a.host_if, still=1)
            collector = RunningCollector(node.netns, 4739, "tcp")
            seen0, rx0 = standin.seen(a.host_if), node.link_stats(a.host_if)["rx_packets"]
            with agent(node, "--transport", "tcp", "--idle-timeout", "1", "--attach", mode):
                if mode == "tcx":
                    assert tcx_programs(node.netns, a.host_if) == ["cniflow_ingress",
                                                                   "standin_ingress"]
                send_udp(node, 0, b.ipv4, 9900, count=150, size=50)
                time.sleep(2)
            rx = node.link_stats(a.host_if)["rx_packets"] - rx0
            rows = settled(collector)
            counted[mode] = ingress_totals(rows, ifindex_of(node, a.host_if))
            assert rx == 150 and standin.seen(a.host_if) - seen0 == 150
            assert standin.attached(a.host_if)
    finally:
        standin.close()
    assert counted == {"tcx": (150, 150 * 78), "tc": (0, 0)}


def tc_filters(netns: str, ifname: str) -> list[str]:
    """Names of the cls_bpf filters on an interface's ingress, in the order they run
    (tc lists a hook's filters so)."""
    out = subprocess.run(["tc", "-n", netns, "filter", "show", "dev", ifname, "ingress"],
                         capture_output=True, text=True, check=True).stdout
    return [line.split(" name ")[1].split()[0] for line in out.splitlines()
            if " name " in line]


@pytest.mark.parametrize("cni", ["pass", "redirect"])
def test_a_cni_filter_on_cls_bpf_hides_nothing(node, cni):
    """Before TCX (kernels before 6.6: Debian 12's, Ubuntu 22.04's) Cilium attached its
    programs as cls_bpf filters, priority 1, handle 1, that pass or redirect. cniflow's
    filter, added at priority 1 after the CNI's, runs before it (the kernel puts a
    newer filter at the head of its priority's list); with TCX cniflow's link runs
    before every filter. A CNI that deletes and adds its filter again, now in front, is
    put behind cniflow's again at the next reconcile. Throughout: every packet counted
    once, the CNI's filter sees every one and is still there after cniflow exits."""
    import cnilab

    a, b = node.pods
    pin_neighbours(node, 0)
    targets = {b.ipv4: b.host_if} if cni == "redirect" else {}
    standin = cnilab.StandIn(node.netns, [a.host_if], mode=cni, targets=targets,
                             attach="tc")
    try:
        counted = {}
        for mode, port in (("tc", 9902), ("tcx", 9903)):
            quiet(node, a.host_if, still=1)
            collector = RunningCollector(node.netns, 4739, "tcp")
            seen0, rx0 = standin.seen(a.host_if), node.link_stats(a.host_if)["rx_packets"]
            with agent(node, "--transport", "tcp", "--idle-timeout", "1",
                       "--attach", mode) as running:
                if mode == "tc":
                    assert tc_filters(node.netns, a.host_if) == ["cniflow_ingress",
                                                                 "standin_ingress"]
                send_udp(node, 0, b.ipv4, port, count=150, size=50)
                time.sleep(1)
                if mode == "tc":  # the CNI's filter again, in front of cniflow's
                    standin.to_head(a.host_if)
                    assert wait_for(lambda: running.metrics().get(
                        "cniflow_tc_moved_to_head_total") == 1, 10), running.log.read_text()
                    assert tc_filters(node.netns, a.host_if) == ["cniflow_ingress",
                                                                 "standin_ingress"]
                    send_udp(node, 0, b.ipv4, port, count=150, size=50)
                time.sleep(2)
            sent = 300 if mode == "tc" else 150
            rx = node.link_stats(a.host_if)["rx_packets"] - rx0
            rows = settled(collector)
            counted[mode] = ingress_totals(rows, ifindex_of(node, a.host_if))
            assert rx == sent and standin.seen(a.host_if) - seen0 == sent
            assert standin.attached(a.host_if)
            assert tc_filters(node.netns, a.host_if) == ["standin_ingress"]
    finally:
        standin.close()
    assert counted == {"tc": (300, 300 * 78), "tcx": (150, 150 * 78)}


def test_a_program_put_before_cniflows_link_is_moved_behind_it(node):
    """A program attached at the head of the TCX chain after cniflow (BPF_F_BEFORE) that
    ends the hook would hide every packet: at the next reconcile cniflow's link is in
    front again (pinned in place of the old one), the other program untouched, still
    seeing every packet, and every packet counted once. One that keeps taking the head
    is left there after three moves, said once."""
    import cnilab

    a, b = node.pods
    pin_neighbours(node, 0)
    fs = Path(f"/run/cniflow-lab/{node.prefix}-pins")
    fs.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "bpf", "bpf", str(fs)], check=True)
    collector = RunningCollector(node.netns, 4739, "tcp")
    standin = None
    try:
        with agent(node, "--transport", "tcp", "--idle-timeout", "1", "--pin-path",
                   str(fs / "cniflow")) as running:
            def moved() -> float:
                return running.metrics().get("cniflow_tcx_moved_to_head_total", 0)
            standin = cnilab.StandIn(node.netns, [a.host_if], mode="pass", head=True)
            assert wait_for(lambda: moved() == 1, 10), running.log.read_text()
            assert tcx_programs(node.netns, a.host_if) == ["cniflow_ingress", "standin_ingress"]
            pins = sorted(os.listdir(fs / "cniflow" / "links"))
            assert len(pins) == 4, pins  # one pin per interface and hook, the moved one too
            quiet(node, a.host_if, still=1)
            seen0, rx0 = standin.seen(a.host_if), node.link_stats(a.host_if)["rx_packets"]
            send_udp(node, 0, b.ipv4, 9901, count=150, size=50)
            time.sleep(2)
            assert node.link_stats(a.host_if)["rx_packets"] - rx0 == 150
            assert standin.seen(a.host_if) - seen0 == 150 and standin.attached(a.host_if)
            for n in (2, 3):
                standin.to_head(a.host_if)
                assert wait_for(lambda n=n: moved() == n, 10)
            standin.to_head(a.host_if)  # a fourth time within ten minutes: left there
            assert wait_for(lambda: "keeps taking the head" in running.log.read_text(), 10)
            assert moved() == 3
            assert tcx_programs(node.netns, a.host_if)[0] == "standin_ingress"
        rows = settled(collector)
        assert tcx_programs(node.netns, a.host_if) == ["standin_ingress"]
    finally:
        if standin is not None:
            standin.close()
        subprocess.run(["umount", str(fs)], check=False)
        fs.rmdir()
    mine = [r for r in rows if r.get("destinationTransportPort") == 9901]
    assert sum(r["packetDeltaCount"] for r in mine) == 150


BIG = 185_000  # BIG TCP's usual size (Cilium's default), far above IP's 65,535


def big_tcp(netns: str, ifname: str, size: int = BIG) -> None:
    """BIG TCP on one device: gso_max_size and gro_max_size (IPv6), gso_ipv4_max_size and
    gro_ipv4_max_size (IPv4, kernel 6.3+). Over raw RTM_NEWLINK: Debian's iproute2 6.1
    and pyroute2 know no IPv4 attributes (IFLA_GSO_IPV4_MAX_SIZE 63, _GRO_ 64)."""
    import socket
    import struct

    import netlab

    def setlink() -> None:
        attrs = b"".join(struct.pack("=HHI", 8, kind, size) for kind in (41, 58, 63, 64))
        body = struct.pack("=BxHiII", 0, 0, socket.if_nametoindex(ifname), 0, 0) + attrs
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as s:
            s.sendto(struct.pack("=IHHII", 16 + len(body), 16, 0x5, 1, 0) + body, (0, 0))
            err = struct.unpack_from("=i", s.recv(4096), 16)[0]  # NLMSG_ERROR, acked
        if err:
            raise OSError(-err, f"BIG TCP on {ifname} in {netns}")

    netlab.in_netns(netns, setlink)


def bulk(node, dst_exec: str, ip: str, nbytes: int, port: int = 5201) -> int:
    """nbytes over one TCP connection from pod 0 to a sink run with dst_exec (a pod's or
    the node's `ip netns exec`); returns what the sink read."""
    import netlab

    sink = subprocess.Popen(f"{dst_exec} /usr/bin/python3 -c \"{netlab._SINK.format(port=port)}\"",
                            shell=True, stdout=subprocess.PIPE, text=True)
    try:
        assert sink.stdout.readline().strip() == "ready"
        code = netlab._SOURCE.format(ip=ip, port=port, n=nbytes)
        subprocess.run(node.in_pod(0, f"/usr/bin/python3 -c \"{code}\""), shell=True,
                       check=True)
        return int(sink.communicate(timeout=60)[0])
    finally:
        if sink.poll() is None:
            sink.kill()


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("side", ["tso", "gro", "tso+gro"])
def test_big_tcp_super_packets_count_what_the_veth_counted(node, family, side):
    """BIG TCP on the pod's veth pair, both ends. "tso": the pod's TCP hands its veth
    super-packets of up to 185,000 octets (TSO on, the host side's GRO off): the veth
    counts each one once. "gro": the pod sends MSS-sized segments, the host side's GRO
    (NAPI) builds the super-packets, the veth counted the segments. "tso+gro": both on;
    the veth keeps a TSO sender's skbs off its NAPI path (veth_skb_is_eligible_for_gro),
    so it counts as "tso" does. The IP length field is 0 (IPv4 tot_len; IPv6 payload
    length, behind the hop-by-hop jumbo option 6.18 still adds, which the segments do
    not carry): octets come from the skb. A capture on the veth
    proves frames above 65,535 octets crossed it; packets and octets at the collector
    equal the veth's own counters, and nothing is called malformed.
    IPv6 goes to the node itself: the node's ip6_forward refuses such packets (each
    segment with the jumbo option would exceed the route's MTU: Packet Too Big)."""
    a, b = node.pods
    pin_neighbours(node, 0)
    for p in node.pods:
        big_tcp(node.netns, p.host_if)
        big_tcp(p.netns, "eth0")
    if side == "gro":
        subprocess.run(node.in_pod(0, "ethtool -K eth0 tso off gso off"), shell=True,
                       check=True)
    subprocess.run(node.exec(f"ethtool -K {a.host_if} gro {'off' if side == 'tso' else 'on'}"),
                   shell=True, check=True)
    if family == 6:
        subprocess.run(node.exec("ip addr add fd00:ffff::1/128 dev lo"), shell=True,
                       check=True)
        dst, dst_exec, src = "fd00:ffff::1", node.exec(""), a.ipv6
    else:
        dst, dst_exec, src = b.ipv4, node.in_pod(1, ""), a.ipv4
    quiet(node, a.host_if)
    collector = RunningCollector(node.netns, 4739, "tcp")
    wire = Path(tempfile.mkdtemp()) / "veth.pcap"  # what crossed the host side
    cap = subprocess.Popen(["ip", "netns", "exec", node.netns, "tshark", "-i", a.host_if,
                            "-s", "128", "-B", "64", "-f", f"src host {src}", "-F", "pcap",
                            "-w", str(wire), "-q"], stderr=subprocess.PIPE, text=True)
    while "Capturing on" not in (cap.stderr.readline() or "Capturing on"):
        pass
    before = node.link_stats(a.host_if)
    with agent(node, "--transport", "tcp", "--idle-timeout", "1") as running:
        assert bulk(node, dst_exec, dst, 64 << 20) == 64 << 20
        time.sleep(2)
        m = running.metrics()
    after = node.link_stats(a.host_if)
    cap.send_signal(signal.SIGINT)
    cap.wait(15)
    sizes = [int(x) for x in subprocess.run(
        ["tshark", "-r", str(wire), "-T", "fields", "-e", "frame.len"], capture_output=True,
        text=True, check=True).stdout.split()]
    rows = settled(collector)
    packets = after["rx_packets"] - before["rx_packets"]
    octets = after["rx_bytes"] - before["rx_bytes"]
    if side != "gro":  # veth_xmit counts the frame; the NAPI path (gro) counts from IP on
        octets -= 14 * packets
    big = sum(s > 65_535 + 14 for s in sizes)
    print(f"IPv{family} {side}: {len(sizes)} frames captured, {big} above 65,535 octets, "
          f"largest {max(sizes)}; veth {packets} packets {octets} octets")
    assert big > 10 and max(sizes) <= BIG + 14, (big, max(sizes))
    assert ingress_totals(rows, ifindex_of(node, a.host_if)) == (packets, octets)
    assert m["cniflow_packets_malformed_total"] == 0
