"""A million malformed IPFIX messages through the collector's decoder: no crash,
memory bounded.

    .venv/bin/python bench/fuzz.py [--messages 1000000]

Messages are real captures (../shared/captures) with random octets changed, cut
short or extended with noise, and the hand-made kinds of tests/test_collector.py
(lengths that lie, reserved set ids, empty or huge templates, variable lengths
past the end). Exporters rotate over 64 addresses and 4 domains, so template
state for many sessions is exercised too.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "scripts")]

from test_collector import PCAPS, exporter_payloads, garbage  # noqa: E402

from agent.ipfix.decoder import Decoder, records  # noqa: E402


def rss_mb() -> int:
    return next(int(line.split()[1]) // 1024 for line in open("/proc/self/status")
                if line.startswith("VmRSS"))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--messages", type=int, default=1_000_000)
    p.add_argument("--stateful", action="store_true",
                   help="tests/statefuzz.py's hostile exporters (state across messages), "
                   "through the collector's decoder and JSON lines, beside a good exporter")
    args = p.parse_args()
    if args.stateful:
        return stateful(args.messages)
    seeds = [m for pcap in PCAPS for m, _ in exporter_payloads(pcap)]
    rng = random.Random(1)
    d = Decoder(hold_bytes=1 << 16)
    samples, decoded = [], 0
    t0 = time.perf_counter()
    for i in range(args.messages):
        if i % 4 == 0:
            blob = garbage(rng)
        else:
            m = bytearray(rng.choice(seeds))
            for _ in range(rng.randrange(1, 6)):
                m[rng.randrange(len(m))] = rng.randrange(256)
            if rng.random() < 0.3:
                m = m[: rng.randrange(len(m))]
            if rng.random() < 0.2:
                m += rng.randbytes(rng.randrange(64))
            blob = bytes(m)
        for rs in d.message(blob, f"10.0.0.{i % 64}:4739"):
            decoded += len(records(rs))
        if i % 100_000 == 0:
            samples.append(rss_mb())
    elapsed = time.perf_counter() - t0
    held = sum(s.held_bytes for s in d.sessions.values())
    print(json.dumps({
        "messages": args.messages, "seconds": round(elapsed, 1), "records_decoded": decoded,
        "errors_by_kind": len(d.errors), "errors_total": sum(d.errors.values()),
        "sessions": len(d.sessions), "templates": d.templates_total, "held_bytes": held,
        "rss_mb_every_100k": samples + [rss_mb()]}, indent=2))
    return 0


def stateful(count: int) -> int:
    """Hostile exporters (64 of them, each its own state across messages) and a good one
    through the collector as it runs: every good record must arrive, memory flat."""
    import tempfile

    import statefuzz

    from agent.collector import Collector
    from agent.config import CollectorConfig
    from agent.outputs import FileOutput

    out = Path(tempfile.mkdtemp()) / "out.jsonl"
    collector = Collector(CollectorConfig(), [FileOutput(str(out), 50_000_000, 1)])
    rng = random.Random(1)
    hostile = [statefuzz.Hostile(random.Random(i)) for i in range(64)]
    samples, sent, t0 = [], 0, time.perf_counter()
    for i in range(0, count, 64):
        batch = [(h.next(), f"10.0.{k}.1:4739") for k, h in enumerate(hostile)]
        sent += 1
        batch.insert(rng.randrange(65), (statefuzz.good(0, sent), "10.9.9.9:4739"))
        collector.handle(batch)
        if i % 1_000_000 < 64:
            samples.append(rss_mb())
    elapsed = time.perf_counter() - t0
    collector.outputs[0].close()
    d = collector.decoder
    good = sum(m._value.get() for k, m in collector.metrics.records._metrics.items()
               if k == ("10.9.9.9",))  # the collector labels exporters by address
    print(json.dumps({
        "messages": count + sent, "seconds": round(elapsed, 1),
        "good_records_sent": sent, "good_records_decoded": int(good),
        "errors_by_kind": len(d.errors), "errors_total": sum(d.errors.values()),
        "sessions": len(d.sessions), "templates": d.templates_total,
        "names": sum(len(n) for n in d.names.values()),
        "rss_mb_every_1m": samples + [rss_mb()]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
