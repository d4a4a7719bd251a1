"""Kubernetes-side benchmarks, on a lab node of network namespaces.

    sudo .venv/bin/python bench/k8s.py [--pods 250] [--churn-seconds 60] [--rate 20]

1. Attach: 250 opted-in pods resolved and attached (the agent's reconcile path:
   route lookups and pyroute2 netlink calls, no `tc` process), timed from the
   program being loaded.
2. First record: a real agent with a fake API server; a new pod opts in, its
   veth appears, it sends one datagram; time until its first record reaches the
   collector (active timeout 0.5 s).
3. Churn: pods created and deleted at --rate per second for --churn-seconds
   against the running agent; afterwards no filter of cniflow's is left on a
   deleted pod's interface, and the agent's file descriptors and memory are back
   where they were.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts"), str(ROOT / "tests")]

import netlab  # noqa: E402
from fakeapi import FakeApiServer, in_netns  # noqa: E402

NODE = "bench-node"
OPT_IN = {"cniflow.io/export": "true"}


def pod_for(node, i: int) -> netlab.Pod:
    return netlab.Pod(
        f"{node.prefix}-pod{i}",
        f"{node.prefix}v{i}"[:15],
        f"10.{90 + i // 250}.{i % 250}.2",
        f"fd00:90:{i:x}::2",
    )


def attach(pods: int) -> dict:
    from pyroute2 import IPRoute

    from agent.resolve import Resolver
    from bpf.attach import Attacher
    from bpf.program import FlowProgram

    node = netlab.up("cfka", 0)
    try:
        made = time.perf_counter()
        for i in range(pods):
            netlab.add_pod(node, pod_for(node, i))
        built = time.perf_counter() - made
        ipr = IPRoute(netns=node.netns)
        t0 = time.perf_counter()
        program = FlowProgram(65536)
        loaded = time.perf_counter()
        resolver, attacher = Resolver(ipr), Attacher(program, ipr=ipr)
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}

        def resolve_and_attach() -> float:  # in the node's namespace, as the agent runs
            for i in range(pods):
                p = pod_for(node, i)
                ifindex = resolver.resolve((p.ipv4, p.ipv6))
                attacher.attach(ifindex, names[ifindex])
            return time.perf_counter()

        done = in_netns(node.netns, resolve_and_attach)
        attacher.detach_all()
        program.close()
        return {
            "pods": pods,
            "lab_build_s": round(built, 1),
            "program_load_s": round(loaded - t0, 2),
            "resolve_and_attach_all_s": round(done - loaded, 3),
            "per_pod_ms": round((done - loaded) / pods * 1000, 2),
        }
    finally:
        netlab.down("cfka")


class Agent:
    def __init__(self, node, api: FakeApiServer, *args: str) -> None:
        kubeconfig = api.kubeconfig(Path(tempfile.mkdtemp()) / "kubeconfig")
        self.log = Path(tempfile.mkdtemp()) / "agent.log"
        cmd = [
            "ip",
            "netns",
            "exec",
            node.netns,
            str(Path(sys.executable).with_name("cniflow")),
            "agent",
            "--kubernetes",
            "--node-name",
            NODE,
            "--kubeconfig",
            str(kubeconfig),
            "--collector",
            "127.0.0.1:4739",
            "--metrics-address",
            "127.0.0.1:9477",
            "--poll-interval",
            "0.2",
            *args,
        ]
        self.proc = subprocess.Popen(cmd, stderr=self.log.open("w"))
        self.node = node

    def pid(self) -> int:
        return self.proc.pid  # `ip netns exec` execs the agent in place

    def fds_and_rss(self) -> tuple[int, int]:
        pid = self.pid()
        fds = len(list(Path(f"/proc/{pid}/fd").iterdir()))
        rss = next(
            int(line.split()[1]) // 1024
            for line in open(f"/proc/{pid}/status")
            if line.startswith("VmRSS")
        )
        return fds, rss

    def stop(self) -> int:
        self.proc.terminate()
        return self.proc.wait(30)


def collector(netns: str, port: int, seen: dict, stop: threading.Event) -> threading.Thread:
    """Record the arrival time of the first data set per source address (any template)."""

    def run():
        code = (
            "import socket,sys,time\n"
            f"s=socket.socket(2,2);s.bind(('127.0.0.1',{port}));s.settimeout(0.2)\n"
            "while True:\n"
            "  try: d=s.recv(65535)\n"
            "  except socket.timeout: continue\n"
            "  print(time.time(), d.hex(), flush=True)\n"
        )
        p = subprocess.Popen(
            ["ip", "netns", "exec", netns, sys.executable, "-c", code],
            stdout=subprocess.PIPE,
            text=True,
        )
        for line in p.stdout:
            if stop.is_set():
                break
            t, data = line.split()
            raw = bytes.fromhex(data)
            if len(raw) > 20 and raw[16:18] in (b"\x01\x02", b"\x01\x03"):  # sets 258/259
                for ip in list(seen.get("want", {})):
                    if socket.inet_aton(ip) in raw and ip not in seen:
                        seen[ip] = float(t)
        p.terminate()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def first_record(samples: int) -> dict:
    node = netlab.up("cfkf", 0)
    api = FakeApiServer(node.netns)
    api.namespace("bench", OPT_IN)
    seen: dict = {"want": {}}
    stop = threading.Event()
    collector(node.netns, 4739, seen, stop)
    agent = Agent(node, api, "--active-timeout", "0.5", "--idle-timeout", "1")
    try:
        time.sleep(4)  # program loaded, API synced
        delays = []
        for i in range(samples):
            p = pod_for(node, i)
            api.pod("bench", f"p{i}", NODE, [p.ipv4])
            t0 = time.time()
            netlab.add_pod(node, p)  # the interface appears now
            seen["want"][p.ipv4] = t0
            subprocess.run(
                [
                    "ip",
                    "netns",
                    "exec",
                    p.netns,
                    "/usr/bin/python3",
                    "-c",
                    "import socket,time\ns=socket.socket(2,2)\n"
                    "for _ in range(30): s.sendto(b'x',('169.254.1.1',9)); time.sleep(0.1)",
                ]
            )
            deadline = time.time() + 10
            while p.ipv4 not in seen and time.time() < deadline:
                time.sleep(0.05)
            if p.ipv4 in seen:
                delays.append(seen[p.ipv4] - t0)
        return {
            "samples": samples,
            "first_record_s": sorted(round(d, 2) for d in delays),
            "max_s": round(max(delays), 2) if delays else None,
        }
    finally:
        stop.set()
        agent.stop()
        api.stop()
        netlab.down("cfkf")


def churn(seconds: float, rate: float) -> dict:
    node = netlab.up("cfkc", 0)
    api = FakeApiServer(node.netns)
    api.namespace("bench", OPT_IN)
    # a live collector: with none, the agent keeps records for it (the bounded backlog)
    sink = subprocess.Popen(["ip", "netns", "exec", node.netns, sys.executable, "-c",
                             "import socket\ns=socket.socket(2,2);s.bind(('127.0.0.1',4739))\n"
                             "while True: s.recv(65535)"])
    agent = Agent(node, api, "--idle-timeout", "1")
    try:
        time.sleep(4)
        fds0, rss0 = agent.fds_and_rss()
        created = deleted = 0
        live: list[tuple[int, netlab.Pod]] = []
        t_end = time.time() + seconds
        i = 0
        samples, next_sample = [rss0], time.time() + 60  # the trend tells a leak from a plateau
        while time.time() < t_end:
            tick = time.time()
            if tick >= next_sample:
                samples.append(agent.fds_and_rss()[1])
                next_sample += 60
            p = pod_for(node, i % 1000)
            netlab.add_pod(node, p)
            api.pod("bench", f"c{i}", NODE, [p.ipv4])
            live.append((i, p))
            created += 1
            if len(live) > 10:  # keep ten alive, delete the oldest
                j, old = live.pop(0)
                api.delete_pod("bench", f"c{j}")
                netlab.sh(f"ip netns del {old.netns}")
                deleted += 1
            i += 1
            time.sleep(max(0.0, 1 / rate - (time.time() - tick)))
        for j, old in live:
            api.delete_pod("bench", f"c{j}")
            netlab.sh(f"ip netns del {old.netns}")
            deleted += 1
        time.sleep(4)
        fds1, rss1 = agent.fds_and_rss()
        left = netlab.sh(f"ip -n {node.netns} -o link show type veth", check=False).stdout
        metrics = subprocess.run(
            ["ip", "netns", "exec", node.netns, "curl", "-s", "127.0.0.1:9477/metrics"],
            capture_output=True,
            text=True,
        ).stdout
        values = dict(line.rsplit(" ", 1) for line in metrics.splitlines()
                      if line and not line.startswith("#"))
        return {
            "seconds": seconds,
            "achieved_rate_per_s": round(created / seconds, 1),
            "created": created,
            "deleted": deleted,
            "veths_left": len(left.splitlines()),
            "interfaces_attached_after": values.get("cniflow_interfaces_attached"),
            "records_exported": values.get("cniflow_records_exported_total"),
            "export_backlog_after": values.get("cniflow_export_backlog_records"),
            "fds_before_after": [fds0, fds1],
            "rss_mb_before_after": [rss0, rss1],
            "rss_mb_every_60_s": samples + [rss1],
            "agent_alive": agent.proc.poll() is None,
        }
    finally:
        agent.stop()
        sink.terminate()
        api.stop()
        netlab.down("cfkc")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pods", type=int, default=250)
    p.add_argument("--samples", type=int, default=5)
    p.add_argument("--churn-seconds", type=float, default=60)
    p.add_argument("--rate", type=float, default=20)
    args = p.parse_args()
    out = {
        "attach": attach(args.pods),
        "first_record": first_record(args.samples),
        "churn": churn(args.churn_seconds, args.rate),
    }
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
