"""Counting accuracy, measured side by side in one run (figures in the README).

    sudo .venv/bin/python bench/accuracy.py [--quick]

1. Every packet at the highest rate: UDP frames from a pod through an AF_PACKET TX
   ring (bench/txring.c: paged skbs, 64 flows), metered at once by cniflow, softflowd
   and pmacctd (nfprobe) on the same veth, each exporting to its own nfcapd: packets
   counted / the veth's rx counter.
2. A flood of new flows (every frame a new flow, from the TX ring): the share of
   packets in flow-level records (the rest in overflow records, counts exact), at two
   map sizes.
3. Same-node pod pairs: records and octets at the collector per packet sent, with and
   without --dedup.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

import netlab  # noqa: E402
import oracles  # noqa: E402

CNIFLOW = Path(sys.executable).with_name("cniflow")


def build(name: str) -> Path:
    out = Path(tempfile.mkdtemp()) / name
    subprocess.run(["gcc", "-O2", "-o", str(out), str(ROOT / "bench" / f"{name}.c")], check=True)
    return out


def pin(node: netlab.Node, i: int) -> None:
    """Permanent neighbours between a routed pod and its node: no ARP or NUD frames."""
    p = node.pods[i]
    pod_mac = netlab.link_info(p.netns, "eth0")[1]
    host_mac = netlab.link_info(node.netns, p.host_if)[1]
    for addr in (p.ipv4, p.ipv6):
        netlab.sh(node.exec(f"ip neigh replace {addr} lladdr {pod_mac} dev {p.host_if} "
                            "nud permanent"))
    for addr in ("169.254.1.1", "fe80::1"):
        netlab.sh(node.in_pod(i, f"ip neigh replace {addr} lladdr {host_mac} dev eth0 "
                                 "nud permanent"))


def agent(node: netlab.Node, *args: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        ["ip", "netns", "exec", node.netns, str(CNIFLOW), "agent", "--interface",
         f"{node.prefix}v*", "--poll-interval", "0.5", "--idle-timeout", "1",
         "--metrics-address", "127.0.0.1:9477", "--log-level", "warning", *args],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(300):  # until its filters are on
        time.sleep(0.1)
        if "cniflow_interfaces_attached 2.0" in netlab.sh(
                node.exec("curl -s 127.0.0.1:9477/metrics"), check=False).stdout:
            return proc
    raise RuntimeError("agent did not attach")


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    proc.send_signal(sig)
    proc.wait(30)


def metrics(node: netlab.Node) -> dict[str, float]:
    out = netlab.sh(node.exec("curl -s 127.0.0.1:9477/metrics")).stdout
    return {k: float(v) for k, _, v in (line.rpartition(" ") for line in out.splitlines()
                                        if line and not line.startswith("#"))}


def tx(node: netlab.Node, txring: Path, flows: int, count: int) -> float:
    a, b = node.pods
    mac = netlab.link_info(node.netns, a.host_if)[1]
    out = netlab.sh(node.in_pod(0, f"{txring} eth0 {mac} {a.ipv4} {b.ipv4} {flows} {count} 18"))
    return count / float(out.stdout.split()[2])


def sent_by(records: list[dict], src: str) -> int:
    return sum(r["packets"] for r in records if r["src"] == src)


def accuracy(txring: Path, count: int) -> dict:
    node = netlab.up("cfacc", 2)
    lab = Path(tempfile.mkdtemp(prefix="cniflow-acc-"))
    try:
        pin(node, 0)
        a = node.pods[0]
        nf = {name: oracles.Nfcapd(node.netns, port)
              for name, port in (("cniflow", 4739), ("softflowd", 4740), ("pmacctd", 4741))}
        (lab / "pm.conf").write_text(
            f"daemonize: false\npidfile: {lab}/pm.pid\nlogfile: {lab}/pm.log\n"
            f"pcap_interface: {a.host_if}\npcap_interface_wait: true\n"
            "aggregate: src_host, dst_host, src_port, dst_port, proto\nplugins: nfprobe\n"
            "nfprobe_receiver: 127.0.0.1:4741\nnfprobe_version: 10\nnfprobe_engine: 7\n"
            "nfprobe_timeouts: udp=2:general=2:maxlife=10:expint=1\n")
        peers = [
            subprocess.Popen(node.exec(f"softflowd -i {a.host_if} -n 127.0.0.1:4740 -v 10 -d "
                                       f"-t maxlife=5 -t expint=1 -c {lab}/sf.ctl").split(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
            subprocess.Popen(node.exec(f"pmacctd -f {lab}/pm.conf").split(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
        ]
        cniflow = agent(node)
        time.sleep(3)  # the pcap probes open their sockets
        before = node.link_stats(a.host_if)
        rate = tx(node, txring, 64, count)
        time.sleep(1)
        after = node.link_stats(a.host_if)
        netlab.sh(f"softflowctl -c {lab}/sf.ctl expire-all", check=False)
        time.sleep(4)
        stop(cniflow)
        netlab.sh(f"softflowctl -c {lab}/sf.ctl shutdown", check=False)
        stop(peers[1], signal.SIGINT)
        peers[0].wait(10)
        time.sleep(1)
        rx = after["rx_packets"] - before["rx_packets"]
        got = {name: sent_by(n.stop(), a.ipv4) for name, n in nf.items()}
        return {"frames_per_s": round(rate), "veth_rx_packets": rx,
                "counted_over_veth_rx": {k: round(v / rx, 4) for k, v in got.items()},
                "counted": got}
    finally:
        netlab.down("cfacc")


def flood(txring: Path, count: int, map_sizes: tuple[int, ...]) -> dict:
    out = {}
    for size in map_sizes:
        node = netlab.up("cffld", 2)
        try:
            pin(node, 0)
            a = node.pods[0]
            proc = agent(node, "--map-size", str(size), "--collector", "127.0.0.1:9")
            before = node.link_stats(a.host_if)
            rate = tx(node, txring, count, count)
            time.sleep(3)
            m = metrics(node)
            stop(proc)
            rx = node.link_stats(a.host_if)["rx_packets"] - before["rx_packets"]
            over = m["cniflow_map_failed_inserts_total"]
            out[size] = {"new_flows_per_s": round(rate), "packets": rx,
                         "in_overflow_records": int(over),
                         "share_in_flow_records": round(1 - over / rx, 3),
                         "early_drains": int(m["cniflow_early_drains_total"]),
                         "lost": int(m["cniflow_packets_lost_total"])}
        finally:
            netlab.down("cffld")
    return out


def same_node(datagrams: int) -> dict:
    out = {}
    for dedup in ("true", "false"):
        node = netlab.up("cfsn", 2)
        try:
            a, b = node.pods
            collector = oracles.Nfcapd(node.netns, 4739)
            proc = agent(node, "--dedup", dedup)
            code = (f"import socket;s=socket.socket(2,2);"
                    f"[s.sendto(bytes(100),('{b.ipv4}',9000+i%10)) for i in range({datagrams})]")
            netlab.sh(node.in_pod(0, f"/usr/bin/python3 -c \"{code}\""))
            time.sleep(2.5)
            stop(proc)
            rows = [r for r in collector.stop() if r["proto"] == 17 and r["src"] == a.ipv4]
            out[f"dedup_{dedup}"] = {
                "records": len(rows),
                "records_per_flow": len(rows) / 10,
                "octets_per_packet_sent": sum(r["octets"] for r in rows) / datagrams / 128}
        finally:
            netlab.down("cfsn")
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer frames")
    args = p.parse_args()
    txring = build("txring")
    results = {
        "tx_ring_accuracy": accuracy(txring, 300_000 if args.quick else 2_000_000),
        "flood": flood(txring, 500_000 if args.quick else 2_000_000, (65536, 262144)),
        "same_node": same_node(1000),
    }
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
