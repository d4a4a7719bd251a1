"""Stories of the plain-host agent: real packets through real veths, IPFIX read back
by tshark, nfcapd/nfdump and pmacct's nfacctd."""

from __future__ import annotations

import signal
import socket
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path

import netlab
import oracles
from conftest import agent, filters, wait_for
from fakeapi import in_netns

PY = "/usr/bin/python3"


def send_udp(node, pod: int, dst: str, port: int, count: int, size: int, sport: int = 0) -> None:
    family = 10 if ":" in dst else 2
    code = (f"import socket;s=socket.socket({family},2);s.bind(('',{sport}));"
            f"[s.sendto(b'x'*{size},('{dst}',{port})) for _ in range({count})]")
    subprocess.run(node.in_pod(pod, f"{PY} -c \"{code}\""), shell=True, check=True)


def ping(node, pod: int, dst: str, count: int, interval: float = 0.05) -> None:
    v6 = "-6 " if ":" in dst else ""
    subprocess.run(node.in_pod(pod, f"ping {v6}-c {count} -i {interval} -q {dst}").split(),
                   check=True, stdout=subprocess.DEVNULL)


def totals(records, **match) -> tuple[int, int]:
    sel = [r for r in records if all(r.get(k) == v for k, v in match.items())]
    return sum(r["packets"] for r in sel), sum(r["octets"] for r in sel)


def by_key(records) -> dict:
    out: Counter = Counter()
    for r in records:
        icmp = r["proto"] in (1, 58)
        key = (r["src"], r["dst"], r["proto"], 0 if icmp else r["sport"], 0 if icmp else r["dport"])
        out[key + ("packets",)] += r["packets"]
        out[key + ("octets",)] += r["octets"]
    return dict(out)


def pin_neighbours(node, pod: int) -> None:
    """Permanent neighbour entries between a pod and its node, and on a bridge between
    the pod and every other pod: no ARP, no NUD (a probe's timing would decide whether
    it falls in a test's counts)."""
    p = node.pods[pod]

    def mac(cmd: str) -> str:
        out = subprocess.run(cmd, shell=True, capture_output=True, text=True, check=True).stdout
        return out.split("link/ether ")[1].split()[0]

    def link_local(cmd: str) -> str:
        out = subprocess.run(cmd, shell=True, capture_output=True, text=True, check=True).stdout
        return out.split("inet6 ")[1].split("/")[0]

    pod_mac = mac(node.in_pod(pod, "ip -o link show eth0"))
    if node.layout == "bridged":  # the bridge's addresses are the gateway's
        gateway = node.bridge
        bridge_ll = link_local(node.exec(f"ip -o -6 addr show dev {gateway} scope link"))
        gateways = (f"10.{node.subnet}.0.1", f"fd00:{node.subnet}::1", bridge_ll)
        pod_ll = link_local(node.in_pod(pod, "ip -o -6 addr show dev eth0 scope link"))
        mine = (p.ipv4, p.ipv6, pod_ll)
    else:
        gateway, gateways, mine = p.host_if, ("169.254.1.1", "fe80::1"), (p.ipv4, p.ipv6)
    host_mac = mac(node.exec(f"ip -o link show {gateway}"))
    for addr in mine:
        subprocess.run(node.exec(f"ip neigh replace {addr} lladdr {pod_mac} dev {gateway} "
                                 "nud permanent"), shell=True, check=True)
    peers = [(addr, host_mac) for addr in gateways]
    if node.layout == "bridged":
        for i, other in enumerate(node.pods):
            if i != pod:
                other_mac = mac(node.in_pod(i, "ip -o link show eth0"))
                peers += [(other.ipv4, other_mac), (other.ipv6, other_mac)]
    for addr, lladdr in peers:
        subprocess.run(node.in_pod(pod, f"ip neigh replace {addr} lladdr {lladdr} dev eth0 "
                                        "nud permanent"), shell=True, check=True)


def quiet(node, ifname: str, still: float = 2.5, timeout: float = 15) -> None:
    """Wait until the interface has received nothing for `still` seconds."""
    deadline = time.monotonic() + timeout
    last, since = node.link_stats(ifname)["rx_packets"], time.monotonic()
    while time.monotonic() - since < still:
        assert time.monotonic() < deadline, f"{ifname} never went quiet"
        time.sleep(0.1)
        now = node.link_stats(ifname)["rx_packets"]
        if now != last:
            last, since = now, time.monotonic()


def test_a_pods_traffic_is_counted_exactly_and_every_collector_agrees(node):
    """UDP of known sizes, pings, IPv6: the export matches what was sent, the veths'
    own counters, and what tshark, nfdump and nfacctd decode."""
    a, b = node.pods
    nfcapd = oracles.Nfcapd(node.netns, 4739)
    tshark = oracles.Tshark(node.netns, 4739)
    # The veth counters also count frames sent while no filter is on: a new pod's MLD
    # reports, and the NA it answers the node's NUD probe with seconds after traffic.
    # So pin the neighbours both ways, start from a quiet pod, and read the counters
    # before the filters go on and after they come off.
    pin_neighbours(node, 0)
    quiet(node, a.host_if)
    before = node.link_stats(a.host_if)
    with agent(node, "--idle-timeout", "1") as running:
        send_udp(node, 0, b.ipv4, 9000, count=10, size=200)
        ping(node, 0, b.ipv4, 4)
        ping(node, 0, b.ipv6, 3)
        send_udp(node, 0, b.ipv6, 9001, count=5, size=1000)
        time.sleep(3)
    after = node.link_stats(a.host_if)
    assert running.proc.returncode == 0
    pcap = tshark.stop()
    pcap_records = tshark.records()
    assert tshark.expert() == []
    nfacctd = oracles.Nfacctd(node.netns, 4740)  # fed the very datagrams the agent sent
    assert oracles.replay(pcap, node.netns, 4740, decode_port=4739) > 1
    by_tool = {"tshark": pcap_records, "nfdump": nfcapd.stop(), "nfacctd": nfacctd.stop()}

    expected = {  # (src, dst, proto, dport): (packets, octets); IP header + payload
        (a.ipv4, b.ipv4, 17, 9000): (10, 10 * (20 + 8 + 200)),
        (a.ipv4, b.ipv4, 1, 8 << 8): (4, 4 * 84),
        (b.ipv4, a.ipv4, 1, 0): (4, 4 * 84),
        (a.ipv6, b.ipv6, 58, 128 << 8): (3, 3 * 104),
        (b.ipv6, a.ipv6, 58, 129 << 8): (3, 3 * 104),
        (a.ipv6, b.ipv6, 17, 9001): (5, 5 * (40 + 8 + 1000)),
    }
    for tool in ("tshark", "nfdump"):
        for (src, dst, proto, dport), want in expected.items():
            # each packet once, from the sender's veth (both pods are metered)
            got = totals(by_tool[tool], src=src, dst=dst, proto=proto, dport=dport)
            assert got == want, (tool, src, dst, proto, got, want)
    # nfacctd keeps no ICMP type/code: it must agree with tshark on every key it keeps
    assert by_key(by_tool["nfacctd"]) == by_key(pcap_records)

    # the veth's own counters: every frame pod0 sent, each an IP packet and metered
    ingress = [r for r in pcap_records if r["interface"] == a.host_if and r["direction"] == 0]
    packets = after["rx_packets"] - before["rx_packets"]
    octets = after["rx_bytes"] - before["rx_bytes"]
    metered = [(r["src"], r["dst"], r["proto"], r["packets"], r["octets"]) for r in ingress]
    assert sum(r["packets"] for r in ingress) == packets, metered
    assert sum(r["octets"] for r in ingress) == octets - 14 * packets, metered


def test_tcp_transfers_are_counted_as_the_veth_carries_them_and_end_with_fin(node):
    """A capture on the host-side veth sees the same skbs as the TC hook (a GSO
    super-packet is one frame there too): per connection and direction, the records'
    packets and octets equal the captured frames and their IP lengths. Two transfers:
    iperf3's (control and data connections) and one of known size closed gracefully."""
    a, b = node.pods
    subprocess.run(node.in_pod(1, f"iperf3 -s -D -1 -B {b.ipv4} -p 5202").split(), check=True)
    time.sleep(0.5)
    tshark = oracles.Tshark(node.netns, 4739)
    wire = Path(tempfile.mkdtemp()) / "veth.pcap"
    with agent(node, "--idle-timeout", "3", "--dedup", "false"):  # both ways on one veth
        # headers only (ip.len is in them) and a large buffer: no frame dropped in a burst
        cap = subprocess.Popen(["ip", "netns", "exec", node.netns, "tshark", "-i", a.host_if,
                                "-s", "128", "-B", "64", "-f", "tcp portrange 5201-5202",
                                "-F", "pcap", "-w", str(wire), "-q"],
                               stderr=subprocess.PIPE, text=True)
        while "Capturing on" not in (cap.stderr.readline() or "Capturing on"):
            pass
        time.sleep(0.5)
        subprocess.run(node.in_pod(0, f"iperf3 -c {b.ipv4} -p 5202 -n 2M").split(), check=True,
                       stdout=subprocess.DEVNULL)
        assert node.tcp_transfer(0, 1, 4 << 20, port=5201) == 4 << 20
        # FIN seen, then one quiet poll: end of flow (3). Waiting past the idle timeout
        # means a connection whose end went unnoticed would show as idle (1) instead.
        time.sleep(4)
        cap.send_signal(signal.SIGINT)
        cap.wait(10)
    tshark.stop()
    records = tshark.records()
    assert tshark.expert() == []
    tcp = [r for r in records if r["proto"] == 6 and r["interface"] == a.host_if]
    shown = [(r["sport"], r["dport"], r["direction"], r["end_reason"], r["packets"]) for r in tcp]
    # The graceful connection: each direction carried a FIN and ends as end of flow (3).
    graceful = [r for r in tcp if 5201 in (r["sport"], r["dport"])]
    assert sorted((r["direction"], r["end_reason"]) for r in graceful) == [(0, 3), (1, 3)], shown
    # iperf3's two connections end (3) in the direction that carried a FIN or RST (its
    # server may reset the data connection: the client's side of it may then end idle).
    iperf = [r for r in tcp if 5202 in (r["sport"], r["dport"])]
    ends = {frozenset((r["sport"], r["dport"])) for r in iperf if r["end_reason"] == 3}
    connections = {frozenset((r["sport"], r["dport"])) for r in iperf}
    assert ends == connections and len(connections) == 2, shown
    frames = subprocess.run(["tshark", "-r", str(wire), "-T", "fields", "-e", "tcp.srcport",
                             "-e", "tcp.dstport", "-e", "ip.len"],
                            capture_output=True, text=True, check=True).stdout
    on_wire: Counter = Counter()
    for line in frames.splitlines():
        sport, dport, length = line.split("\t")
        on_wire[(int(sport), int(dport), "packets")] += 1
        on_wire[(int(sport), int(dport), "octets")] += int(length)
    metered: Counter = Counter()
    for r in tcp:
        metered[(r["sport"], r["dport"], "packets")] += r["packets"]
        metered[(r["sport"], r["dport"], "octets")] += r["octets"]
    assert metered == on_wire
    sent = sum(r["octets"] for r in graceful if r["direction"] == 0)
    assert sent > 4 << 20  # the payload plus its headers


def test_each_end_reason_appears_when_it_should(node):
    a, b = node.pods
    tshark = oracles.Tshark(node.netns, 4739)
    with agent(node, "--active-timeout", "2", "--idle-timeout", "1"):
        ping(node, 0, b.ipv4, 15, interval=0.2)  # 3 s: an active timeout, then idle
        send_udp(node, 0, b.ipv4, 9100, count=3, size=10)  # then silence: idle
        ping_forever = subprocess.Popen(node.in_pod(0, f"ping -i 0.1 {b.ipv6}").split(),
                                        stdout=subprocess.DEVNULL)
        time.sleep(3)
    ping_forever.terminate()  # the agent stopped while this flow was running: forced end
    tshark.stop()
    records = tshark.records()
    assert tshark.expert() == []
    echo = [r for r in records if r["dst"] == b.ipv4 and r["proto"] == 1
            and r["interface"] == a.host_if]
    assert Counter(r["end_reason"] for r in echo)[2] >= 1
    assert echo[-1]["end_reason"] == 1
    assert sum(r["packets"] for r in echo) == 15  # deltas add up to what was sent
    udp = [r for r in records if r["dport"] == 9100 and r["interface"] == a.host_if]
    assert [(r["end_reason"], r["packets"]) for r in udp] == [(1, 3)]
    forced = [r for r in records if r["dst"] == b.ipv6 and r["proto"] == 58]
    assert forced and forced[-1]["end_reason"] == 4


def test_flow_times_are_wall_clock_milliseconds(node):
    """The program stamps packets in jiffies; records carry wall-clock milliseconds
    accurate to a tick either way (at most 10 ms, HZ >= 100), as nfdump reads them.
    Two datagrams 1 s apart, each sent between two readings of the wall clock."""
    a, b = node.pods
    nfcapd = oracles.Nfcapd(node.netns, 4739)
    sock = in_netns(a.netns, lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
    stamps = []
    with sock, agent(node, "--idle-timeout", "1"):
        time.sleep(0.5)
        for _ in range(2):
            before = time.time() * 1000
            sock.sendto(b"x" * 10, (b.ipv4, 9400))
            stamps.append((before, time.time() * 1000))
            time.sleep(1)
        time.sleep(2)
    (flow,) = [r for r in nfcapd.stop() if r["src"] == a.ipv4 and r["dport"] == 9400
               and r["input"]]
    slack = 2 * 10 + 5  # a tick each way (the stamp's and the drain's reading), and the softirq
    for t, (before, after) in zip((flow["first_ms"], flow["last_ms"]), stamps):
        assert before - slack <= t <= after + slack, (stamps, flow)


def test_each_map_call_site_in_the_program_has_one_map():
    """A call site reached with either flow map (how LLVM compiles `b ? flows_b.lookup(k)
    : flows_a.lookup(k)`) makes the verifier give up inlining the hash lookup: the
    program would cost a quarter more per packet. Checked on the compiled bytecode."""
    from bcc import BPF

    from bpf.compile import SOURCE, cflags

    for shared, nat in ((True, ""), (False, ""), (True, "lru_hash,0")):
        b = BPF(src_file=str(SOURCE).encode(), cflags=cflags(1024, shared, nat=nat))
        for fn in (b"cniflow_ingress", b"cniflow_egress", b"cniflow_entry"):
            raw = b.dump_func(fn)
            loaded, calls = set(), 0
            for i in range(0, len(raw), 8):
                op, regs, imm = raw[i], raw[i + 1], int.from_bytes(raw[i + 4:i + 8], "little")
                if op == 0x18 and regs >> 4 == 1 and regs & 0xF == 1:  # r1 = map
                    loaded.add(imm)
                elif op == 0x85:  # call
                    assert len(loaded) <= 1, f"{fn}: one call site, maps {loaded}"
                    calls += bool(loaded)
                    loaded = set()
            assert calls >= 5, (fn, calls)  # slot, two lookups, two inserts at least
        b.cleanup()


def test_a_full_flow_table_ends_the_oldest_flows_and_loses_no_count(node):
    a, b = node.pods
    tshark = oracles.Tshark(node.netns, 4739)
    with agent(node, "--max-flows", "4", "--idle-timeout", "30"):
        for port in range(20):
            send_udp(node, 0, b.ipv4, 9200 + port, count=2, size=10)
            time.sleep(0.05)
        time.sleep(1.5)
    tshark.stop()
    every = tshark.records()
    assert Counter(r["end_reason"] for r in every)[4] > 0  # what was left at shutdown
    records = [r for r in every if 9200 <= r["dport"] < 9220]
    assert Counter(r["end_reason"] for r in records)[5] > 0
    assert sum(r["packets"] for r in records) == 2 * 20  # once, at the sender's veth


def test_a_full_kernel_map_never_harms_traffic_and_loses_no_count(node):
    """A map of 4 flows and a burst of 300 datagrams to 30 ports: traffic passes, the
    packets with no room are counted in the interface's overflow record, and the sum of
    all records is still every packet."""
    a, b = node.pods
    tshark = oracles.Tshark(node.netns, 4739)
    with agent(node, "--map-size", "4", "--poll-interval", "5", "--idle-timeout", "1") \
            as running:
        code = (f"import socket;s=socket.socket(2,2);"
                f"[s.sendto(b'x'*10,('{b.ipv4}',9300+i%30)) for i in range(300)]")
        subprocess.run(node.in_pod(0, f"{PY} -c \"{code}\""), shell=True, check=True)
        ping(node, 0, b.ipv4, 2)  # traffic still flows
        failed = wait_for(lambda: running.metrics().get("cniflow_map_failed_inserts_total"), 8)
        assert failed and failed > 0
        time.sleep(1.5)
    tshark.stop()
    records = tshark.records()
    mine = [r for r in records if r["interface"] == a.host_if and r["direction"] == 0]
    overflow = totals(mine, proto=0, src="0.0.0.0")[0]  # addresses unknown, counts exact
    udp = sum(r["packets"] for r in mine if r["proto"] == 17 and 9300 <= r["dport"] < 9330)
    echo = totals(mine, proto=1, dport=8 << 8)[0]
    assert overflow > 0 and udp + echo + overflow == 300 + 2, (udp, echo, overflow)


def test_garbage_and_truncated_frames_pass_untouched_and_do_not_skew_counts(node):
    a, b = node.pods
    mac = subprocess.run(node.exec(f"cat /sys/class/net/{a.host_if}/address").split(),
                         capture_output=True, text=True).stdout.strip()
    tshark = oracles.Tshark(node.netns, 4739)
    with agent(node, "--idle-timeout", "1") as running:
        code = (GARBAGE.replace("DSTMAC", mac).replace("SRC6", a.ipv6).replace("DST6", b.ipv6)
                .replace("SRC", a.ipv4).replace("DST", b.ipv4))
        subprocess.run(node.in_pod(0, f"{PY} -c '{code}'"), shell=True, check=True)
        send_udp(node, 0, b.ipv4, 9400, count=7, size=50)
        ping(node, 0, b.ipv4, 2)
        time.sleep(2.5)
        m = running.metrics()
        assert running.proc.poll() is None
    tshark.stop()
    records = tshark.records()
    assert totals(records, dport=9400) == (7, 7 * 78)  # once, at the sender's veth
    assert m["cniflow_packets_malformed_total"] >= 3
    assert m["cniflow_packets_not_ip_total"] >= 1
    # a VLAN-tagged datagram and a non-first fragment are still IP: counted, with and
    # without ports
    assert totals(records, dport=7777, interface=a.host_if)[0] == 2
    assert totals(records, proto=17, sport=0, dport=0, interface=a.host_if)[0] == 1
    assert totals(records, proto=132, sport=6666, dport=8888, interface=a.host_if)[0] == 1
    # ports found behind three IPv6 extension headers; octets = IPv6 header + payload
    assert totals(records, src=a.ipv6, dport=7778, interface=a.host_if) == (1, 40 + 36)


def test_an_interface_that_appears_later_and_matches_the_glob_is_metered(node):
    a, b = node.pods
    tshark = oracles.Tshark(node.netns, 4739)
    with agent(node, "--idle-timeout", "1") as running:
        late = netlab.Pod(f"{node.prefix}-pod9", f"{node.prefix}v9", "10.99.9.2",
                          "fd00:99:9::2")
        netlab.add_pod(node, late)
        node.pods.append(late)
        assert wait_for(lambda: "cniflow_ingress" in filters(node, late.host_if), 10)
        assert running.metrics()["cniflow_interfaces_attached"] == 3
        send_udp(node, 2, b.ipv4, 9600, count=4, size=100)
        time.sleep(2)
    tshark.stop()
    assert totals(tshark.records(), dport=9600, interface=late.host_if) == (4, 4 * 128)


GARBAGE = r"""
import os, socket, struct
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind(("eth0", 0))
dst = bytes.fromhex("DSTMAC".replace(":", ""))
src = open("/sys/class/net/eth0/address").read().strip().replace(":", "")
eth = lambda t: dst + bytes.fromhex(src) + struct.pack("!H", t)
ip = lambda proto, payload, frag=0x4000, ihl=5: struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0,
    20 + len(payload), 1, frag, 64, proto, 0, socket.inet_aton("SRC"),
    socket.inet_aton("DST")) + payload
udp = struct.pack("!HHHH", 5555, 7777, 12, 0) + b"abcd"
frames = [
    os.urandom(8),                                        # shorter than Ethernet
    eth(0x88b5) + os.urandom(40),                         # not IP
    eth(0x0800) + b"\x45\x00\x00",                        # truncated IPv4 header
    eth(0x0800) + ip(17, udp, ihl=3)[:20],                # IHL below 5
    eth(0x86dd) + b"\x60" + os.urandom(10),               # truncated IPv6 header
    eth(0x0800) + ip(6, b"\x01\x02"),                     # TCP header cut short
    eth(0x8100) + struct.pack("!HH", 5, 0x0800) + ip(17, udp),             # 802.1Q
    eth(0x88a8) + struct.pack("!HH", 7, 0x8100) + struct.pack("!HH", 5, 0x0800) + ip(17, udp),
    eth(0x0800) + ip(17, b"\x00" * 16, frag=0x0010),      # non-first fragment
    eth(0x0800) + ip(132, struct.pack("!HHII", 6666, 8888, 0, 0)),         # SCTP
    # IPv6: hop-by-hop, destination options, routing, then UDP to port 7778
    eth(0x86dd) + struct.pack("!IHBB", 0x60000000, 8 + 8 + 8 + 12, 0, 64)
    + socket.inet_pton(socket.AF_INET6, "SRC6") + socket.inet_pton(socket.AF_INET6, "DST6")
    + bytes([60, 0]) + b"\x01\x04" + b"\x00" * 4       # hop-by-hop -> dest options
    + bytes([43, 0]) + b"\x01\x04" + b"\x00" * 4       # dest options -> routing
    + bytes([17, 0, 0, 0]) + b"\x00" * 4                 # routing (segments left 0) -> UDP
    + struct.pack("!HHHH", 5555, 7778, 12, 0) + b"abcd",
]
for f in frames:
    try:
        s.send(f)
    except OSError:
        pass  # the kernel refuses frames shorter than an Ethernet header
"""
