"""Collector benchmarks: decode, JSON and Kafka speed in process, a replay received
by cniflow collector and nfcapd side by side, and the collector with 1 and 2 workers.

    sudo .venv/bin/python bench/collector.py [--records 1000000] [--only replay]

1. Decode: messages of a fixed-length flow template (what cniflow's exporter
   sends without interface names, and what most routers send), decoded on one core.
2. JSON lines: the same records decoded and turned into JSON lines (what the
   collector does between socket and file), one core (POLARS_MAX_THREADS=1), CPU time;
   records of cniflow's own template, with interface names (variable length); and a
   router's template (ROUTER: octet arrays, a NUL-padded VRF name) by the C formatter
   and, side by side, by polars (the path such tables took before); an exporter
   that does not group its records by their strings' lengths (Antrea-like: pod names
   of many lengths, labels), written by C and, side by side, read into dicts by
   Python; and when runs of strings' lengths become layouts (layouts(): as admitted,
   at once, never).
3. Kafka: the same, plus flow keys and one produce() a record to a local broker
   (Tansu), librdkafka's queue bounded as the collector runs it (the batches wait
   while it is over half full: the steady state, where the broker keeps up); CPU
   time of this process only (the broker runs beside it), and the records the
   broker acknowledged.
4. Replay: the same messages sent at a paced rate to cniflow collector and to
   nfcapd at once (each datagram to both); CPU seconds each spends per million
   records, from /proc, and the ratio: "steady", each in a memory cgroup limited as
   the DaemonSet limits the collector and filled with page cache first, as a node's
   collector lives; and "cold", fresh processes on this VM (replay's docstring).
5. Workers: 8 exporters at paced rising rates to `cniflow collector --workers N`
   for N = 1 and 2: the highest rate with at least 99 % of records written (marked
   sender-limited when the Python sender itself could not go faster).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("POLARS_MAX_THREADS", "1")  # one core, as the collector runs
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

import netlab  # noqa: E402

from agent.ipfix import flows as flowmap  # noqa: E402
from agent.ipfix.message import Template, encode_records, message, pack, template_sets  # noqa: E402
from agent.records import FLOW_DTYPE  # noqa: E402

FIXED = Template.of(400, flowmap.V4 + flowmap.COMMON)


def messages(n: int, template: Template = FIXED) -> list[bytes]:
    """The fixed template, or one with strings: cniflow's own (interface names)."""
    f = np.zeros(n, FLOW_DTYPE)
    k = f["key"]
    idx = np.arange(n, dtype=np.uint32)
    k["ip_version"], k["proto"], k["direction"] = 4, 17, 0
    k["ifindex"] = 7 + idx % 3
    k["src"][:, 0], k["src"][:, 1] = 10, 1
    k["src"][:, 2], k["src"][:, 3] = idx >> 8 & 255, idx & 255
    k["dst"][:, :4] = [10, 2, 0, 1]
    k["sport"], k["dport"] = idx & 0xFFFF, 53
    f["packets"], f["octets"] = 3, 300
    f["first_ms"], f["last_ms"], f["end_reason"] = 1_795_000_000_000, 1_795_000_001_000, 1
    names = {7: "cali1a2b3c4d5e6", 8: "lxc0123456789ab", 9: "veth12ab34cd"}
    groups = encode_records(template, flowmap.columns(f, names), n)
    msgs = pack(template.id, groups, 1400, 1_795_000_000, 9, 0)
    out = [message(template_sets([template]), 1_795_000_000, 0, 9)]
    buf = msgs.buf.tobytes()
    out += [buf[o : o + ln] for o, ln in zip(msgs.offsets.tolist(), msgs.lengths.tolist(),
                                             strict=True)]
    return out


# A router's flow template (Cisco IOS-XR's, Huawei's): MPLS label stack entries and a
# route distinguisher (octet arrays), a VRF name padded with NULs, the usual 5-tuple
# and counters. (element id, length)
ROUTER = ((70, 3), (71, 3), (72, 3), (8, 4), (12, 4), (4, 1), (7, 2), (11, 2), (10, 4),
          (14, 4), (1, 8), (2, 8), (90, 8), (236, 32), (210, 3))


def router_messages(n: int) -> list[bytes]:
    """n records of ROUTER in messages of 15 (about 1,400 octets), template first."""
    import struct

    rng = np.random.default_rng(5)
    size = sum(length for _, length in ROUTER)
    data = rng.integers(0, 256, (n, size), np.uint8)
    vrf = sum(length for _, length in ROUTER[:13])
    data[:, vrf : vrf + 32] = 0
    data[:, vrf : vrf + 8] = np.frombuffer(b"vrf-blue", np.uint8)

    def header(body: bytes, seq: int) -> bytes:
        return struct.pack("!HHIII", 10, 16 + len(body), 1_795_000_000, seq, 9) + body

    fields = b"".join(struct.pack("!HH", i, length) for i, length in ROUTER)
    template = struct.pack("!HHHH", 2, 8 + len(fields), 256, len(ROUTER)) + fields
    out = [header(template, 0)]
    for first in range(0, n, 15):
        rows = data[first : first + 15].tobytes()
        out.append(header(struct.pack("!HH", 256, 4 + len(rows)) + rows, first))
    return out


def ungrouped_messages(n: int, labels: bool, run: int = 1, per: int = 10) -> list[bytes]:
    """n records of an Antrea-like template (the 5-tuple, counters, times, then pod
    names, namespaces and, with labels, the source pod's labels as JSON: variable-length
    strings) in messages of `per`, records not grouped by their strings' lengths, as an
    exporter that does not sort them sends them: pods of 60 names of 8 to 40 octets.
    run: records of one pair of pods in a row (a run of string lengths, as an exporter
    that groups them sends them, of many combinations)."""
    import struct

    rng = np.random.default_rng(3)
    fixed = ((8, 4), (12, 4), (7, 2), (11, 2), (4, 1), (1, 8), (2, 8), (150, 4), (151, 4))
    strings = (101, 100, 103, 102) + ((143,) if labels else ())
    fields = b"".join(struct.pack("!HH", i, length) for i, length in fixed) + b"".join(
        struct.pack("!HHI", i | 0x8000, 65535, 56506) for i in strings)
    template = struct.pack("!HHHH", 2, 8 + len(fields), 300, len(fixed) + len(strings))
    apps = ("web", "api", "db", "cache", "frontend", "payments-service", "auth")
    pods = []
    for i in range(60):
        app = apps[i % len(apps)]
        name = f"{app}-{i:09x}-{i * 7919 % 99999:05d}"[: 8 + i * 13 % 33].encode()
        ns = (b"default", b"prod", b"kube-system", b"team-a")[i % 4]
        pods.append((name, ns, b'{"app":"%s","tier":"fe"}' % app.encode()))
    out = []
    for first in range(0, n, per):
        body = b""
        for k in range(min(per, n - first)):
            if k % run == 0:
                src, dst = pods[rng.integers(60)], pods[rng.integers(60)]
            body += rng.integers(0, 256, 37, np.uint8).tobytes()
            for text in (src[0], src[1], dst[0], dst[1]) + ((src[2],) if labels else ()):
                body += bytes([len(text)]) + text
        msg = template + fields + struct.pack("!HH", 300, 4 + len(body)) + body
        out.append(struct.pack("!HHIII", 10, 16 + len(msg), 1_795_000_000, first, 1) + msg)
    return out


def ungrouped() -> dict:
    """ungrouped_messages() to JSON lines: records in no run written by format_records()
    (C, from the wire) and, side by side, each read into a dict and json.dumps() (the
    path before it, which it still takes for a value C does not print)."""
    from agent import jsonlines

    out, plan = {}, jsonlines._plan
    for labels, n in ((False, 20_000), (True, 10_000)):
        msgs = ungrouped_messages(n, labels)
        for name, planned in (("c", plan), ("python", lambda spec: None), ("c_again", plan)):
            jsonlines._plan = planned
            try:
                rate = lines_per_s(msgs, n)
            finally:
                jsonlines._plan = plan
            out[f"antrea_like_{'with_labels_' if labels else ''}{name}_per_s"] = rate
    return out


def layouts(n: int) -> dict:
    """Records whose strings have a few lengths (cniflow's interface names) and many
    (runs of 16 and 32 of 3,600 pod pairs; runs of one), to JSON lines: layouts made once
    a combination recurs (ADMIT), side by side with made at once (ADMIT 0) and never
    (every record read as it came)."""
    from agent.ipfix import decoder

    inputs = {"interface_names": messages(n, flowmap.TEMPLATE_V4),
              "pod_runs_of_16": ungrouped_messages(n, False, 16, 32),
              "pod_runs_of_32": ungrouped_messages(n, False, 32, 32),
              "pod_runs_of_1": ungrouped_messages(n, False, 1, 32)}
    out, admit, min_run = {}, decoder.ADMIT, decoder.MIN_RUN
    for name, msgs in inputs.items():
        for policy, a, m in (("admitted", admit, min_run), ("at_once", 0, min_run),
                             ("never", admit, 1 << 30), ("admitted_again", admit, min_run)):
            decoder.ADMIT, decoder.MIN_RUN = a, m
            try:
                out[f"{name}_{policy}_per_s"] = lines_per_s(msgs, n)
            finally:
                decoder.ADMIT, decoder.MIN_RUN = admit, min_run
    return out


def batches(msgs: list[bytes]):
    """The collector's batches: up to 512 datagrams, decoded together."""
    for i in range(0, len(msgs), 512):
        yield [(m, "10.0.0.1:4739") for m in msgs[i : i + 512]]


def in_process(msgs: list[bytes], n: int) -> dict:
    from agent.ipfix.decoder import Decoder
    from agent.jsonlines import encode

    d = Decoder()
    t0 = time.process_time()
    sets = [rs for b in batches(msgs) for rs in d.messages(b)[0]]
    t1 = time.process_time()
    assert sum(len(rs) for rs in sets) == n
    out = {"records": n, "decode_records_per_s": round(n / (t1 - t0))}
    for name, batch in (("decode_and_json_lines_per_s", msgs),
                        ("the_same_with_interface_names_per_s",
                         messages(n, flowmap.TEMPLATE_V4))):
        d = Decoder()
        t2 = time.process_time()
        count = 0
        for b in batches(batch):  # as the collector does: each piece to a sink
            count += encode(d.messages(b)[0], sink=_discard).count
        t3 = time.process_time()
        assert count == n
        out[name] = round(n / (t3 - t2))
    out.update(router(n))
    out.update(ungrouped())
    out.update(layouts(min(n, 64_000)))
    return out


def router(n: int) -> dict:
    """ROUTER's records to JSON lines by the C formatter, and side by side by polars'
    NDJSON writer: the path such tables took before octet arrays were printed in C."""
    from agent import jsonlines

    msgs, out = router_messages(n), {}
    formatted = jsonlines._formatted
    for name, c in (("a_routers_template_json_lines_per_s", True),
                    ("the_same_by_polars_per_s", False), ("again_c_per_s", True),
                    ("again_polars_per_s", False)):
        jsonlines._formatted = formatted if c else (lambda *_: False)
        try:
            out[name] = lines_per_s(msgs, n)
        finally:
            jsonlines._formatted = formatted
    return out


def lines_per_s(msgs: list[bytes], n: int) -> int:
    """The n records of msgs decoded and turned into JSON lines, in the collector's
    batches, by a fresh decoder: records per CPU second."""
    from agent.ipfix.decoder import Decoder
    from agent.jsonlines import encode

    d, count = Decoder(), 0
    t0 = time.process_time()
    for b in batches(msgs):
        count += encode(d.messages(b)[0], sink=_discard).count
    t1 = time.process_time()
    assert count == n and not d.errors, d.errors
    return round(n / (t1 - t0))


def _discard(lines) -> None:
    pass


def kafka(msgs: list[bytes], n: int) -> dict:
    """Decode, JSON lines with flow keys, produce: one core's CPU time for it all."""
    from broker import Broker

    from agent.collector import CollectorMetrics
    from agent.config import CollectorConfig
    from agent.ipfix.decoder import Decoder
    from agent.jsonlines import encode
    from agent.outputs import KafkaOutput

    b = Broker().start()
    try:
        b.topic("flows", 3)
        metrics = CollectorMetrics()
        cfg = CollectorConfig()
        out = KafkaOutput(f"kafka://{b.address}/flows", cfg.kafka_settings(), 60, metrics)
        d = Decoder()
        t0, c0 = time.perf_counter(), time.process_time()
        for batch in batches(msgs):
            while len(out.producer) > cfg.kafka_queue // 2:  # the steady state: the
                out.producer.poll(0.002)  # broker keeps up, the queue stays bounded
            encode(d.messages(batch)[0], keys=True, sink=out.write)
        c1 = time.process_time()
        out.close()
        t2 = time.perf_counter()
        delivered = out.delivered
    finally:
        b.stop()
    return {"records": n, "delivered": delivered,
            "records_per_cpu_s_to_produce": round(n / (c1 - c0)),
            "records_per_s_until_all_acknowledged": round(n / (t2 - t0))}


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _collector(node, out: Path, port: int, checkout: Path | None,
               enter=None) -> subprocess.Popen:
    """cniflow collector in the node's namespace: this checkout's, or another's (a git
    worktree of an older commit) imported first from its directory."""
    args = ["collector", "--listen", f"127.0.0.1:{port}", "--output", str(out),
            "--rotate-bytes", "0", "--metrics-address", "off"]
    if checkout is None:
        cmd = [str(Path(sys.executable).with_name("cniflow")), *args]
    else:
        cmd = ["env", f"PYTHONPATH={checkout}", sys.executable, "-c",
               "import sys; from agent.cli import main; sys.exit(main())", *args]
    return subprocess.Popen(["ip", "netns", "exec", node.netns, *cmd],
                            stderr=subprocess.DEVNULL, cwd=checkout or ROOT, preexec_fn=enter)


REPLAY_SENDER = """
import socket, sys
import time
data = open(sys.argv[1], "rb").read()
rate, ports = float(sys.argv[2]), [int(p) for p in sys.argv[3:]]
msgs, o = [], 0
while o < len(data):
    n = int.from_bytes(data[o:o + 2], "big"); msgs.append(data[o + 2:o + 2 + n]); o += 2 + n
s = socket.socket(2, 2)
t0 = time.time()
for i, m in enumerate(msgs):
    for p in ports:
        s.sendto(m, ("127.0.0.1", p))
    if i % 100 == 0:
        ahead = t0 + i / rate - time.time()
        if ahead > 0:
            time.sleep(ahead)
"""


def replay(msgs: list[bytes], n: int, rate: float, baseline: Path | None = None,
           memcg_mib: int = 256) -> dict:
    """Each datagram to cniflow collector and nfcapd (and, with `baseline`, to the
    collector of another checkout), all under the same load at once, twice over: each
    receiver "steady" in a memory cgroup of its own, limited as the DaemonSet limits the
    collector (memcg_mib) and filled with clean page cache first, and each "cold", as
    a fresh process on this VM (see steady_memcg)."""
    node = netlab.up("cfcb", 0)
    work = Path(tempfile.mkdtemp(dir="/var/tmp"))  # on disk: tmpfs pages are not reclaimed
    groups: list[Path] = []
    procs: dict[str, tuple[subprocess.Popen, int]] = {}
    try:
        warm_page_cache(work, 1 << 30)
        port = 4739
        names = ("cniflow", "nfcapd") if baseline is None else ("cniflow", "baseline", "nfcapd")
        for state in ("steady", "cold"):
            for name in names:
                enter = None
                if state == "steady":  # a cgroup each, as each container has
                    enter = _enter(steady_memcg(f"cniflow-bench-{name}", memcg_mib, work,
                                                groups))
                out = work / f"{name}-{state}"
                if name == "nfcapd":
                    out.mkdir()
                    proc = subprocess.Popen(
                        ["ip", "netns", "exec", node.netns, "nfcapd", "-w", str(out), "-b",
                         "127.0.0.1", "-p", str(port), "-t", "3600", "-B", str(8 << 20)],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=enter)
                else:
                    proc = _collector(node, out, port, baseline if name == "baseline" else None,
                                      enter)
                procs[f"{name}_{state}"] = (proc, port)
                port += 1
        time.sleep(2)
        before = {k: cpu_seconds(p.pid) for k, (p, _) in procs.items()}
        (work / "msgs").write_bytes(b"".join(len(m).to_bytes(2, "big") + m for m in msgs))
        t0 = time.time()
        subprocess.run(["ip", "netns", "exec", node.netns, "/usr/bin/python3", "-c",
                        REPLAY_SENDER, str(work / "msgs"), str(rate),
                        *(str(port) for _, port in procs.values())], check=True)
        sent_s = time.time() - t0
        time.sleep(3)
        used = {k: cpu_seconds(p.pid) - before[k] for k, (p, _) in procs.items()}
        for p, _ in procs.values():
            p.send_signal(signal.SIGTERM)
        for p, _ in procs.values():
            p.wait(20)
        out: dict = {"messages": len(msgs), "records": n, "send_seconds": round(sent_s, 1),
                     "memcg_mib": memcg_mib,
                     "cpu_s_per_million": {k: round(v / n * 1e6, 2) for k, v in used.items()}}
        for key in procs:
            name, state = key.rsplit("_", 1)
            path = work / f"{name}-{state}"
            out[f"{key}_records"] = _nfdump_records(path) if name == "nfcapd" else \
                _written(path)
            if name != "nfcapd":
                out[f"cpu_ratio_{name}_to_nfcapd_{state}"] = round(
                    used[key] / max(used[f"nfcapd_{state}"], 1e-9), 2)
        return out
    finally:
        for p, _ in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()  # out of its cgroup before the rmdir below
        netlab.down("cfcb")
        shutil.rmtree(work, ignore_errors=True)  # some 200 MB a run otherwise
        for group in groups:
            with contextlib.suppress(OSError):
                group.rmdir()


def steady_memcg(name: str, mib: int, work: Path, made: list[Path]) -> Path:
    """A memory cgroup limited to `mib` and filled to its limit with clean page cache
    (written by a process inside it, then synced), as a collector's container finds it
    after a day: its own writes then recycle its own pages. A fresh process writing on
    this VM instead takes free pages, which the guest's free page reporting
    (virtio-balloon) has handed back to the host: every new page of page cache costs a
    fault in the host, 3 to 4 times the copy (measured: appending 224 MB with 0.1 s
    gaps, 0.15 to 0.2 s of system time; rewriting the same pages 0.05 s; appending in a
    filled 256 MiB cgroup 0.07 to 0.11 s), and the collector, which writes ten times
    nfcapd's octets, pays ten times more. Warming the page cache once does not last:
    the pages freed after it are reported back within seconds."""
    v2 = Path("/sys/fs/cgroup/cgroup.controllers").exists()
    root = Path("/sys/fs/cgroup" if v2 else "/sys/fs/cgroup/memory")
    if v2 and "memory" not in (root / "cgroup.subtree_control").read_text().split():
        (root / "cgroup.subtree_control").write_text("+memory")
    group = root / name
    group.mkdir(exist_ok=True)
    made.append(group)  # removed by the caller, whatever happens next
    (group / ("memory.max" if v2 else "memory.limit_in_bytes")).write_text(str(mib << 20))
    fill = work / f"fill-{name}"
    subprocess.run([sys.executable, "-c", "import os, sys\n"
                    "with open(sys.argv[1], 'wb') as f:\n"
                    "    for _ in range(int(sys.argv[2])): f.write(os.urandom(1 << 20))\n"
                    "    f.flush(); os.fsync(f.fileno())", str(fill), str(mib)],
                   preexec_fn=_enter(group), check=True)
    return group


def _enter(group: Path):
    """preexec_fn: the child joins the cgroup before it runs anything."""
    return lambda: (group / "cgroup.procs").write_text(str(os.getpid()))


def warm_page_cache(work: Path, size: int) -> None:
    """Write and delete `size` octets: some of the pages the cold receivers take were
    used before (session 8's warm-up, kept so that the cold figures compare)."""
    chunk = bytes(1 << 20)
    with (work / "warm").open("wb") as f:
        for _ in range(size >> 20):
            f.write(chunk)
    (work / "warm").unlink()


def _nfdump_records(path: Path) -> int:
    nf = subprocess.run(["nfdump", "-R", str(path), "-q", "-o", "csv"],
                        capture_output=True, text=True).stdout
    return sum(1 for line in nf.splitlines() if line and line[0].isdigit())


def _written(path: Path) -> int:
    with path.open() as f:
        return sum(1 for line in f if '"octetDeltaCount"' in line)


SENDER = """
import socket, sys, time
data = open(sys.argv[1], "rb").read()
rate, seconds, per_msg = float(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
msgs, o = [], 0
while o < len(data):
    k = int.from_bytes(data[o:o + 2], "big"); msgs.append(data[o + 2:o + 2 + k]); o += 2 + k
socks = [socket.socket(2, 2) for _ in range(8)]
for s in socks:
    s.sendto(msgs[0], ("127.0.0.1", 4739))  # each exporter's template, once
t0, sent, i = time.time(), 0, 0
while time.time() - t0 < seconds:
    for _ in range(64):
        socks[i % 8].sendto(msgs[1 + i % (len(msgs) - 1)], ("127.0.0.1", 4739))
        i += 1
    ahead = t0 + i * per_msg / rate - time.time()
    if ahead > 0:
        time.sleep(ahead)
print(i)
"""


def workers(msgs: list[bytes], n: int, seconds: float = 5.0) -> dict:
    """8 exporters (8 source ports of one paced sender) at rising rates, to
    `cniflow collector --workers N` for N = 1 and 2: the highest rate at which the
    collector wrote at least 99 % of the records sent (sustained, not a burst)."""
    node = netlab.up("cfwk", 0)
    work = Path(tempfile.mkdtemp())
    per_msg = n / (len(msgs) - 1)
    out: dict = {}
    try:
        (work / "msgs").write_bytes(b"".join(len(m).to_bytes(2, "big") + m for m in msgs))
        cniflow = str(Path(sys.executable).with_name("cniflow"))
        for w in (1, 2):
            best = 0
            for rate in (100_000, 200_000, 300_000, 400_000, 600_000, 800_000):
                f = work / "out.jsonl"
                col = subprocess.Popen(["ip", "netns", "exec", node.netns, cniflow, "collector",
                                        "--listen", "127.0.0.1:4739", "--output", str(f),
                                        "--rotate-bytes", "0", "--workers", str(w),
                                        "--metrics-address", "off"], stderr=subprocess.DEVNULL)
                time.sleep(3)
                sent_msgs = int(subprocess.run(
                    ["ip", "netns", "exec", node.netns, "/usr/bin/python3", "-c", SENDER,
                     str(work / "msgs"), str(rate), str(seconds), str(per_msg)],
                    capture_output=True, text=True, check=True).stdout)
                time.sleep(2)
                col.send_signal(signal.SIGTERM)
                col.wait(60)
                written = sum(1 for _ in f.open("rb"))
                f.unlink()
                achieved = sent_msgs * per_msg / seconds
                if written < 0.99 * sent_msgs * per_msg:
                    break
                best = round(achieved)
                if achieved < 0.95 * rate:  # the sender's limit, not the collector's
                    out[f"workers_{w}_sender_limited"] = True
                    break
            out[f"workers_{w}_sustained_records_per_s"] = best
        out["ratio_2_to_1"] = round(out["workers_2_sustained_records_per_s"]
                                    / max(out["workers_1_sustained_records_per_s"], 1), 2)
    finally:
        netlab.down("cfwk")
        shutil.rmtree(work, ignore_errors=True)
    return out


PARTS = ("in_process", "kafka", "replay", "workers")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--records", type=int, default=1_000_000)
    p.add_argument("--replay-records", type=int, default=500_000)
    p.add_argument("--rate", type=float, default=2000, help="messages per second in the replay")
    p.add_argument("--memcg", type=int, default=256, metavar="MIB",
                   help="the steady receivers' memory cgroup limit (the DaemonSet's)")
    p.add_argument("--baseline", type=Path,
                   help="replay also to the collector of this checkout (a git worktree)")
    p.add_argument("--only", choices=PARTS, action="append",
                   help="run only this part (repeatable); default: all")
    args = p.parse_args()
    only = set(args.only or PARTS)
    out: dict = {}
    if only & {"in_process", "kafka"}:
        msgs = messages(args.records)
        if "in_process" in only:
            out["in_process"] = in_process(msgs, args.records)
        if "kafka" in only:
            out["kafka"] = kafka(msgs, args.records)
    if "replay" in only:
        small = messages(args.replay_records)
        out["replay"] = replay(small, args.replay_records, args.rate, args.baseline,
                               args.memcg)
    if "workers" in only:
        out["workers"] = workers(messages(20_000), 20_000)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
