"""VPP mediation benchmark: flowprobe IPFIX in, pod-annotated IPFIX out, one core.

    sudo .venv/bin/python bench/vpp.py [--records N]

The simulator (tests/vppsim.py) builds the datagrams exactly as flowprobe does
(current template: 56-octet IPv4 records, 25 per 1450-octet datagram); they are
replayed over loopback UDP in bursts that fit the socket buffer, and only the
agent's side is timed: receive, decode, convert, fold into the flow table, flush,
encode with pod metadata, send; in wall time and in the process's CPU time (the
figure that holds on a shared, busy machine). Side by side in the same run: the decoder alone
on the same datagrams, so the ratio says what mediation adds to decoding.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "scripts")]

from agent.exporter import Exporter  # noqa: E402
from agent.flowtable import FlowTable  # noqa: E402
from agent.ipfix.decoder import Decoder  # noqa: E402
from agent.kube import Pod  # noqa: E402
from agent.metrics import Metrics  # noqa: E402
from agent.podmeta import PodTable  # noqa: E402
from agent.transport import UdpTransport  # noqa: E402
from vpp_plugin.mediate import Mediator  # noqa: E402

PODS = 100
BURST = 2000  # datagrams per burst: 2.9 MB, inside the 8 MB receive buffer


class Capture:
    """The simulator's socket stand-in: keeps the datagrams instead of sending."""

    def __init__(self) -> None:
        self.datagrams: list[bytes] = []

    def sendto(self, data: bytes, addr) -> None:
        self.datagrams.append(data)


def flowprobe_datagrams(records: int, distinct: int) -> list[bytes]:
    from vppsim import BOTH, IP4, TX, VppSim

    sim = VppSim("/tmp/cniflow-bench-vpp.sock", "24.10.0-release")
    sim.stop()
    sim.state.record_flags = 6
    sim.state.exporter.collector, sim.state.exporter.src = "127.0.0.1", "127.0.0.1"
    sim.state.exporter.mtu, sim.state.exporter.interval = 1450, 3600
    cap = Capture()
    sim._udp = cap
    sim._udp_socket = lambda: cap  # noqa: SLF001 - the bench keeps the bytes
    for sw in range(1, PODS + 1):
        sim.state.enabled[sw] = (IP4, BOTH)
    per_pod = distinct // PODS
    rounds = records // distinct
    t0 = time.time() - rounds * (sim.state.active + 1) - sim.state.passive - 5
    for r in range(rounds):  # VPP re-reports every flow at each active timer
        for sw in range(1, PODS + 1):
            flows = [{"src": f"10.{sw}.{i >> 8 & 255}.{i & 255}", "dst": f"10.200.0.{sw}",
                      "proto": 6, "sport": 1024 + i % 60000, "dport": 443, "packets": 3,
                      "octets": 1800} for i in range(per_pod)]
            sim.traffic(sw, flows, TX, when=t0 + r * (sim.state.active + 1))
    sim.tick()  # the first round created the entries; the walker exports the last
    return cap.datagrams


def decode_only(datagrams: list[bytes]) -> tuple[int, float]:
    d = Decoder()
    t0 = time.perf_counter()
    n = 0
    for dg in datagrams:
        for rs in d.message(dg, "127.0.0.1:4739"):
            n += len(rs)
    return n, time.perf_counter() - t0


def mediate(datagrams: list[bytes]) -> tuple[int, float, float]:
    med = Mediator("127.0.0.1", 0)
    port = med.sock.getsockname()[1]
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    metrics = Metrics()
    exporter = Exporter(UdpTransport(*sink.getsockname()), 1001, metrics,
                        backlog_limit=1 << 24, with_pods=True)
    table = FlowTable(60, 15, max_flows=4_000_000)
    pods = {sw: Pod(f"uid{sw}", "shop", f"web-{sw}", (f"10.200.0.{sw}",), False, "true")
            for sw in range(1, PODS + 1)}
    meta = PodTable("node-a", pods, pods.values())
    names = {sw: f"tun{sw}" for sw in pods}
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    busy = cpu = 0.0
    mediated = 0
    for i in range(0, len(datagrams), BURST):
        for dg in datagrams[i:i + BURST]:
            tx.sendto(dg, ("127.0.0.1", port))
        t0, c0 = time.perf_counter(), time.process_time()
        batch = med.drain()
        table.update(batch, reports=True)
        busy += time.perf_counter() - t0
        cpu += time.process_time() - c0
        mediated += len(batch)
    t0, c0 = time.perf_counter(), time.process_time()
    out = table.flush()
    exporter.export(out, names, meta)
    busy += time.perf_counter() - t0
    cpu += time.process_time() - c0
    med.close()
    return mediated, busy, cpu


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--records", type=int, default=1_000_000)
    p.add_argument("--distinct", type=int, default=200_000)
    a = p.parse_args()
    datagrams = flowprobe_datagrams(a.records, a.distinct)
    n_dec, t_dec = decode_only(datagrams)
    n_med, t_med, cpu_med = mediate(datagrams)
    lost = n_dec - n_med
    result = {
        "datagrams": len(datagrams),
        "records": n_dec,
        "decode_only_records_per_s": round(n_dec / t_dec),
        "mediated_records_per_s": round(n_med / t_med),
        "mediated_records_per_cpu_s": round(n_med / cpu_med),
        "mediated_over_decode": round((n_med / t_med) / (n_dec / t_dec), 2),
        "records_lost_in_socket": lost,
        "target_mediated_records_per_s": 500_000,
    }
    print(json.dumps(result, indent=1))
    return 0 if lost == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
