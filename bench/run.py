"""cniflow benchmarks. Every figure is measured side by side in one run and printed
as a ratio, because the machine is shared and noisy.

    sudo .venv/bin/python bench/run.py [--quick]

1. Per-packet cost: 64-octet UDP frames over a veth from one pinned core,
   round-robin over 1024 flows, with no program / an empty program / cniflow's
   program attached the same way, by TCX links and by clsact + cls_bpf
   direct-action, on both hooks.
   Also the programs alone, by BPF_PROG_TEST_RUN: nanoseconds per run on one
   frame of a known flow (the hit path), free of the veth's noise.
2. Drain to wire: a kernel map holding 1,000,000 flows drained, folded into the
   flow table, encoded and sent over UDP, against the raw batch drain alone.
   The same with the restart journal (pins on a bpffs mounted for the bench), side
   by side: 10,000 and 65,536 flows a poll kept in the table, and 1,000,000 flushed.
3. Resident memory of the agent's stages holding 100,000 active flows.

    sudo .venv/bin/python bench/run.py --only drain   # part 2 alone
    sudo .venv/bin/python bench/run.py --only packet  # part 1 alone
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

import netlab  # noqa: E402

from agent.records import KEY_DTYPE  # noqa: E402
from bench.accuracy import build  # noqa: E402
from bpf.drain import VAL_DTYPE  # noqa: E402

EMPTY = """
#include <uapi/linux/pkt_cls.h>
int cniflow_ingress(struct __sk_buff *skb) { return TC_ACT_UNSPEC; }
int cniflow_egress(struct __sk_buff *skb) { return TC_ACT_UNSPEC; }
"""


class Loaded:
    """An empty program shaped like FlowProgram, for the attach code."""

    def __init__(self) -> None:
        from bcc import BPF

        self.bpf = BPF(text=EMPTY)
        self.ingress = self.bpf.load_func("cniflow_ingress", BPF.SCHED_CLS)
        self.egress = self.bpf.load_func("cniflow_egress", BPF.SCHED_CLS)
        self.entry = self.ingress  # no entry points in the benchmark
        self.spares = (self.ingress, self.egress, self.entry)  # never moved either

    def meter(self, ifindex: int, on: bool, entry: bool = False) -> None:
        """No metered set: nothing to deduplicate."""


# Where the flood goes. "host": dropped by the node's route (a blackhole): the
# shortest path, where the hook's share of a packet is largest. "remote": forwarded
# to a host behind the node and read by a socket there, the path of pod traffic.
PATHS = ("host", "remote")
# (program, attach mode) per variant, each attached the same way on both hooks; the
# per-CPU layout on the host path only
VARIANTS = ("none", "empty_tcx", "cniflow_tcx", "empty_tc", "cniflow_tc", "cniflow_percpu_tc")


def per_packet(rounds: int, seconds: float, flows: int = 1024) -> dict:
    from pyroute2 import IPRoute

    from bpf.attach import Attacher
    from bpf.program import FlowProgram

    flood, sink = build("udpflood"), build("udpsink")
    node = netlab.up("cfbench", 1, remote=True)
    receiver = None
    try:
        netlab.sh(f"ip -n {node.netns} route add blackhole 10.77.0.1/32")
        # the sink reads on the other core; the path up to its socket runs on the sender's
        receiver = subprocess.Popen(node.in_remote(f"taskset -c 0 {sink} 10000 {flows}").split(),
                                    stdout=subprocess.PIPE, text=True)
        assert receiver.stdout.readline().strip() == "ready"
        pod = node.pods[0]
        ipr = IPRoute(netns=node.netns)
        ifindex = ipr.link_lookup(ifname=pod.host_if)[0]
        empty, cniflow = Loaded(), FlowProgram(65536)
        programs = {"none": (None, ""), "empty_tcx": (empty, "tcx"),
                    "cniflow_tcx": (cniflow, "tcx"), "empty_tc": (empty, "tc"),
                    "cniflow_tc": (cniflow, "tc"),
                    "cniflow_percpu_tc": (FlowProgram(65536, shared=False), "tc")}
        dst = {"host": "10.77.0.1", "remote": node.remote_ip}
        runs = [(path, name) for path in PATHS for name in VARIANTS
                if path == "host" or name != "cniflow_percpu_tc"]
        rates: dict[tuple[str, str], list[float]] = {r: [] for r in runs}
        for ip in dst.values():  # warm ARP and caches
            netlab.sh(node.in_pod(0, f"{flood} {ip} {flows} 0.5 22"))
        for _ in range(rounds):
            for path, name in runs:
                prog, mode = programs[name]
                att = None
                if prog:  # TCX links take the ifindex of the calling thread's namespace
                    att = netlab.in_netns(node.netns, lambda p=prog, m=mode: Attacher(
                        p, m, ipr=ipr, dedup=p is not empty))
                    netlab.in_netns(node.netns, lambda a=att: a.attach(ifindex, pod.host_if))
                cmd = node.in_pod(0, f"taskset -c 1 {flood} {dst[path]} {flows} {seconds} 22")
                sent, elapsed = netlab.sh(cmd).stdout.split()
                rates[path, name].append(int(sent) / float(elapsed))
                if att:
                    netlab.in_netns(node.netns, att.detach_all)

        def paired(path: str, a: str, b: str) -> float:
            """Median of the rounds' own ratios: each pair ran seconds apart, so a
            slow drift of the shared machine cancels out within a pair."""
            return statistics.median(x / y for x, y in zip(rates[path, a], rates[path, b]))

        pairs = {"tcx_cniflow_vs_none": ("cniflow_tcx", "none"),
                 "tcx_cniflow_vs_empty": ("cniflow_tcx", "empty_tcx"),
                 "tcx_empty_vs_none": ("empty_tcx", "none"),
                 "tc_cniflow_vs_none": ("cniflow_tc", "none"),
                 "tc_cniflow_vs_empty": ("cniflow_tc", "empty_tc"),
                 "tc_empty_vs_none": ("empty_tc", "none")}
        out: dict = {"rounds": rounds, "flows": flows}
        for path in PATHS:
            out[path] = {
                "pps_median": {name: round(statistics.median(rates[path, name]))
                               for name in VARIANTS if (path, name) in rates},
                "paired": {k: round(paired(path, a, b), 4) for k, (a, b) in pairs.items()}}
        out["host"]["paired"]["tc_percpu_vs_empty"] = round(
            paired("host", "cniflow_percpu_tc", "empty_tc"), 4)
        receiver.terminate()
        out["remote"]["sink_read"] = int(receiver.communicate(timeout=10)[0])
        if not out["remote"]["sink_read"]:
            raise RuntimeError("the remote path delivered nothing to the sink")
        return out
    finally:
        if receiver and receiver.poll() is None:
            receiver.kill()
        netlab.down("cfbench")


def program_ns(rounds: int) -> dict:
    """ns per run of each program on a UDP frame of a flow already in the map."""
    from bpf import syscall
    from bpf.program import FlowProgram, addr_key

    frame = (b"\x02" * 6 + b"\x04" * 6 + b"\x08\x00"
             + bytes.fromhex("4500003200004000401100000a0000020a4d0001")  # IPv4, 50 octets
             + bytes.fromhex("03e82328001e0000") + b"x" * 22)  # UDP 1000 -> 9000
    programs = {"empty": Loaded(), "cniflow": FlowProgram(65536),
                "cniflow_percpu": FlowProgram(65536, shared=False)}
    # An entry point (bpf/entry.py) on the node's own traffic (no pod has the destination:
    # what every packet of an uplink pays), with Cilium's SNAT map to look replies up in
    # as well (bpf/masquerade.py: an empty map of its layout), and on a packet for a
    # metered pod.
    entry = programs["cniflow"]
    nat = FlowProgram(65536, nat="lru_hash,0")
    snat = syscall.map_create(syscall.MAP_LRU_HASH, 14, 40, 65536, name="snat")
    syscall.update(nat.nat_fd, struct.pack("<I", 0), struct.pack("<I", snat))
    runs = {name: (prog.ingress.fd, frame) for name, prog in programs.items()}
    runs["entry_node"] = (entry.entry.fd, frame)
    runs["entry_node_nat"] = (nat.entry.fd, frame)
    runs["entry_pod"] = (entry.entry.fd, frame[:33] + b"\x02" + frame[34:])  # 10.77.0.2
    entry.pod_addresses({addr_key("10.77.0.2"): 7})
    # --pod-side (bpf/podside.py): a veth's egress pays one lookup more for what it does
    # not leave to a pod end; a pod end (here the loopback, ifindex 1) counts a packet
    # for its pod's address
    side = FlowProgram(65536, pod_side=True)
    side.pod_side_addresses({addr_key("10.77.0.2"): (7, 1, b"\x02" * 6)})  # the frame's MAC
    runs["egress"] = (entry.egress.fd, frame)
    runs["egress_pod_side"] = (side.egress.fd, frame)
    runs["pod_end"] = (side.pod.fd, runs["entry_pod"][1])
    ns: dict[str, list[int]] = {k: [] for k in runs}
    for _ in range(rounds):
        for name, (fd, f) in runs.items():
            ns[name].append(syscall.test_run(fd, f, 2_000_000)[1])
    med = {k: statistics.median(v) for k, v in ns.items()}
    return {"ns_median": med,
            "cniflow_minus_empty": med["cniflow"] - med["empty"],
            "percpu_minus_empty": med["cniflow_percpu"] - med["empty"],
            "entry_node_minus_empty": med["entry_node"] - med["empty"],
            "entry_node_nat_minus_empty": med["entry_node_nat"] - med["empty"],
            "entry_pod_minus_empty": med["entry_pod"] - med["empty"],
            "egress_pod_side_minus_egress": med["egress_pod_side"] - med["egress"],
            "pod_end_minus_empty": med["pod_end"] - med["empty"]}


def fill(prog, fd: int, n: int, ncpu: int) -> None:
    """Put n distinct flows into a kernel map with BPF_MAP_UPDATE_BATCH."""
    from bpf import syscall

    keys = np.zeros(n, KEY_DTYPE)
    keys["ifindex"], keys["ip_version"], keys["proto"] = 7, 4, 17
    idx = np.arange(n, dtype=np.uint32)
    keys["src"][:, 0], keys["src"][:, 1] = 10, 1
    keys["src"][:, 2], keys["src"][:, 3] = (idx >> 8) & 255, idx & 255
    keys["dst"][:, :4] = [10, 2, 0, 1]
    keys["sport"], keys["dport"] = (idx >> 16) + 1024, 53
    vals = np.zeros((n, ncpu), VAL_DTYPE)
    vals["packets"][:, 0], vals["octets"][:, 0] = 3, 300
    now = prog.jiffies() + (1 << 32)  # jiffies64 are past 2**32 from boot on
    vals["first"][:, 0], vals["last"][:, 0] = now - 250, now
    vals["min_ttl"][:, 0] = vals["max_ttl"][:, 0] = 64
    step = 65536
    for i in range(0, n, step):
        syscall.update_batch(fd, keys[i:].ctypes.data, vals[i:].ctypes.data, min(step, n - i))


def drain_to_wire(n: int, rounds: int, shared: bool = True) -> dict:
    from agent import memory
    from agent.exporter import Exporter
    from agent.flowtable import FlowTable
    from agent.metrics import Metrics
    from agent.transport import UdpTransport
    from bpf.drain import BatchDrain
    from bpf.program import FlowProgram

    memory.keep_heap()  # as the agent does
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    prog = FlowProgram(n, shared=shared)
    drain = BatchDrain(prog)
    raw, full, records = [], [], 0
    for _ in range(rounds):
        fill(prog, drain.fds[drain.active], n, drain.ncpu)
        t0 = time.perf_counter()
        got = drain.drain_raw()
        raw.append(time.perf_counter() - t0)
        assert got == n, got

        fill(prog, drain.fds[drain.active], n, drain.ncpu)
        table = FlowTable(max_flows=2 * n)
        exporter = Exporter(UdpTransport(*sink.getsockname()), 1, Metrics(), backlog_limit=2 * n)
        t0 = time.perf_counter()
        table.update(drain.drain(), unique=True)
        out = table.flush()
        exporter.export(out, {7: "veth1234abcd"})
        full.append(time.perf_counter() - t0)
        records = int(exporter.metrics.records_exported._value.get())
        assert records == n, records
    prog.close()
    raw_rate, full_rate = n / statistics.median(raw), n / statistics.median(full)
    return {
        "flows": n,
        "raw_drain_records_per_s": round(raw_rate),
        "drain_table_encode_send_records_per_s": round(full_rate),
        "ratio_to_raw_drain": full_rate / raw_rate,
    }


BENCH_FS = Path("/run/cniflow-bench/jrn-pins")  # a bpffs of the bench's own


class Poller:
    """One dataplane's polls as agent/pipeline.py runs them: drain, fold, expire (or
    flush), then, pinned, the journal's commit before the export and exported after
    (bpf/restart.py's commit; the drain goes into the pinned buffers, DRAINING first)."""

    def __init__(self, n: int, pins: str, steady: bool, sink) -> None:
        from agent.exporter import Exporter
        from agent.flowtable import FlowTable
        from agent.metrics import Metrics
        from agent.transport import UdpTransport
        from bpf.compile import OVERFLOW_SIZE
        from bpf.drain import BatchDrain
        from bpf.journal import Journal
        from bpf.pins import PinDir
        from bpf.program import FlowProgram

        self.pins = PinDir(pins) if pins else None
        self.prog = FlowProgram(n, pins=self.pins)
        self.drain = BatchDrain(self.prog, keep=self.pins is not None)
        poll = n + OVERFLOW_SIZE  # sized as bpf/restart.py sizes it
        self.journal = Journal(self.pins, poll) if self.pins else None
        if self.journal is not None:
            self.drain.before = self.journal.draining
        # steady: the same flows every poll, each reported every poll (active timeout 0)
        # and kept in the table; else every flow flushed (ends) in the poll it came
        self.steady = steady
        self.table = FlowTable(active_timeout_s=0 if steady else 60, idle_timeout_s=3600,
                               max_flows=2 * n)
        self.exporter = Exporter(UdpTransport(*sink.getsockname()), 1, Metrics(),
                                 backlog_limit=2 * n)
        self.names = {7: "veth1234abcd"}

    def poll(self) -> int:
        batch = self.drain.drain()
        evicted = self.table.update(batch, unique=True)
        due = self.table.expire(int(time.time() * 1000)) if self.steady else self.table.flush()
        out = np.concatenate([evicted, due]) if len(evicted) else due
        if self.journal is not None:  # as agent/pipeline.py: commit, send, progress
            j = self.journal
            self.exporter.export(out, self.names, None,
                                 lambda held: j.commit(self.table, held, self.drain.idle),
                                 j.progress)
            j.exported()
        else:
            self.exporter.export(out, self.names)
        return len(out)

    def close(self) -> None:
        if self.journal is not None:
            self.journal.close()
        self.prog.close()
        if self.pins is not None:
            self.pins.remove()


def journal_cost(n: int, rounds: int, steady: bool) -> dict:
    """Drain to wire without pins and with the journal, alternating in one run: records
    a second each (median of rounds) and the ratio journal / no journal (median of each
    round's own ratio)."""
    from agent import memory

    memory.keep_heap()
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    sink.setblocking(False)
    BENCH_FS.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "bpf", "bpf", str(BENCH_FS)], check=True)
    pollers = {}
    try:
        pollers = {"plain": Poller(n, "", steady, sink),
                   "journal": Poller(n, str(BENCH_FS / f"cniflow{n}"), steady, sink)}
        times: dict[str, list[float]] = {k: [] for k in pollers}
        for r in range(rounds + (1 if steady else 0)):  # steady: a first poll inserts
            for name, p in pollers.items():
                fill(p.prog, p.drain.fds[p.drain.active], n, p.drain.ncpu)
                t0 = time.perf_counter()
                got = p.poll()
                dt = time.perf_counter() - t0
                assert got == n, (name, got)
                if r or not steady:
                    times[name].append(dt)
                try:  # the sink is not read: drop what the kernel queued
                    while sink.recv(65536):
                        pass
                except BlockingIOError:
                    pass
    finally:
        for p in pollers.values():
            p.close()
        subprocess.run(["umount", str(BENCH_FS)], check=False)
        BENCH_FS.rmdir()
    rate = {k: n / statistics.median(v) for k, v in times.items()}
    return {
        "flows_per_poll": n,
        "mode": "steady (kept, active timeout each poll)" if steady else "flush (new, ended)",
        "no_journal_records_per_s": round(rate["plain"]),
        "journal_records_per_s": round(rate["journal"]),
        "journal_ms_per_poll": round(1000 * statistics.median(times["journal"]), 1),
        "no_journal_ms_per_poll": round(1000 * statistics.median(times["plain"]), 1),
        "ratio_journal_to_no_journal": round(statistics.median(
            a / b for a, b in zip(times["plain"], times["journal"])), 3),
    }


def journal_costs(quick: bool) -> list[dict]:
    rounds = 3 if quick else 7
    return [journal_cost(10_000, rounds * 3, True), journal_cost(65_536, rounds, True),
            journal_cost(200_000 if quick else 1_000_000, 2 if quick else 3, False)]


MEMORY = """
import socket, sys, json
sys.path[:0] = [{root!r}]
from bench.run import fill
from agent import memory
from agent.exporter import Exporter
from agent.flowtable import FlowTable
from agent.metrics import Metrics
from agent.transport import UdpTransport
from bpf.drain import BatchDrain
from bpf.program import FlowProgram
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) // 1024
memory.keep_heap()
prog = FlowProgram(131072)
drain = BatchDrain(prog)
table = FlowTable(active_timeout_s=3600, idle_timeout_s=3600)
sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); sink.bind(("127.0.0.1", 0))
exp = Exporter(UdpTransport(*sink.getsockname()), 1, Metrics())
base = rss()
for _ in range(3):
    fill(prog, drain.fds[drain.active], {n}, drain.ncpu)
    table.update(drain.drain(), unique=True)
    exp.export(table.expire(0), {{}})
def hwm():  # peak of this process image (ru_maxrss would include the forking parent)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) // 1024
print(json.dumps({{"active_flows": len(table), "rss_mb": rss(), "rss_after_load_mb": base,
                   "peak_rss_mb": hwm()}}))
"""


AT_LIMITS = """
import json, socket, sys
import numpy as np
sys.path[:0] = [{root!r}]
from agent import memory
from agent.exporter import Exporter
from agent.flowtable import FlowTable
from agent.metrics import Metrics
from agent.records import FLOW_DTYPE
from agent.transport import TcpTransport, UdpTransport
def status(field):
    return next(int(l.split()[1]) // 1024 for l in open("/proc/self/status")
                if l.startswith(field))
memory.keep_heap()
n, backlog, step = {n}, {backlog}, 65536
table = FlowTable(active_timeout_s=3600, idle_timeout_s=3600, max_flows=n)
for i in range(0, n, step):
    k = min(step, n - i)
    b = np.zeros(k, FLOW_DTYPE)
    b["key"]["ifindex"], b["key"]["ip_version"], b["key"]["proto"] = 7, 4, 17
    b["key"]["src"][:, :8] = np.arange(i, i + k, dtype=np.uint64).view(np.uint8).reshape(k, 8)
    b["packets"], b["first_ms"], b["last_ms"] = 1, 1, 1
    table.update(b, unique=True)
for _ in range(5):  # polls that fold a drain's worth into flows already there
    table.update(table.flows[np.random.randint(0, n, step)].copy())
full = status("VmRSS")
sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); sink.bind(("127.0.0.1", 0))
closed = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); closed.bind(("127.0.0.1", 0))
port = closed.getsockname()[1]; closed.close()  # the collector away: the backlog fills
away = Exporter(TcpTransport("127.0.0.1", port), 1, Metrics(), backlog_limit=backlog)
away.export(table.flows[:backlog].copy(), {{}})  # refused: all of it waits
exp = Exporter(UdpTransport(*sink.getsockname()), 1, Metrics(), backlog_limit=backlog)
exp.export(table.flush(), {{7: "lxc0123456789ab"}})  # every flow ends at once
print(json.dumps({{"flows": n, "backlog": backlog, "rss_table_full_mb": full,
                   "peak_rss_mb": status("VmHWM")}}))
"""


def memory_at_limits(n: int, backlog: int) -> dict:
    """The table at --max-flows, the backlog at --export-backlog, then every flow ending
    at once (encoded and sent in one poll): the peak the DaemonSet's limit must hold."""
    out = subprocess.run([sys.executable, "-c", AT_LIMITS.format(root=str(ROOT), n=n,
                                                                 backlog=backlog)],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def memory(n: int) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", MEMORY.format(root=str(ROOT), n=n)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer rounds, smaller map")
    p.add_argument("--flows", type=int, default=1024, help="per-packet cost: flows the "
                   "sender goes round (each a destination port)")
    p.add_argument("--only", choices=("drain", "packet"), help="drain: drain to wire (and "
                   "the journal's cost beside it) only; packet: the per-packet cost only")
    args = p.parse_args()
    if args.only == "packet":
        print(json.dumps({"per_packet": per_packet(rounds=3 if args.quick else 7,
                                                   seconds=1 if args.quick else 2,
                                                   flows=args.flows),
                          "program_ns": program_ns(rounds=3 if args.quick else 7)}, indent=2))
        return 0
    if args.only == "drain":
        n = 200_000 if args.quick else 1_000_000
        print(json.dumps({"drain_to_wire": drain_to_wire(n, rounds=2 if args.quick else 3),
                          "journal": journal_costs(args.quick)}, indent=2))
        return 0
    results = {
        "per_packet": per_packet(rounds=3 if args.quick else 7, seconds=1 if args.quick else 2,
                                 flows=args.flows),
        "program_ns": program_ns(rounds=3 if args.quick else 7),
        "drain_to_wire": drain_to_wire(
            200_000 if args.quick else 1_000_000, rounds=2 if args.quick else 3
        ),
        "drain_to_wire_percpu": drain_to_wire(  # the alternative map layout, same run
            200_000 if args.quick else 1_000_000, rounds=2 if args.quick else 3, shared=False
        ),
        "journal": journal_costs(args.quick),
        "memory": memory(100_000),
        "memory_at_limits": [memory_at_limits(n, 100_000) for n in (250_000, 1_000_000)],
    }
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
