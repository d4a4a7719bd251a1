"""Shared fixtures: a lab node built from namespaces, and the real agent run inside it.

These tests need root, BPF and network namespaces. They never skip: without
them the suite fails, so a CI run that could not test the kernel path is red.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import netlab  # noqa: E402
import oracles  # noqa: E402, F401

CNIFLOW = Path(sys.executable).with_name("cniflow")
_ids = itertools.count()
# pytest-xdist's worker number (pyproject runs two): in lab names, so two workers whose
# process ids agree modulo 1000 never make one lab twice
WORKER = os.environ.get("PYTEST_XDIST_WORKER", "").removeprefix("gw")

# The labs with floods, timed traffic against oracles and agents killed mid-export run
# one at a time, on one worker; beside them, on the other, each other module as one
# unit (its fixtures once): decoding, the VPP simulator, Kafka, the image build, and
# the labs driven through the fake API server. (All labs on one worker left the other
# idle for 14 of the suite's 24 minutes.)
LAB_MODULES = {"test_cnis", "test_counting", "test_metering", "test_restart",
               "test_robustness"}


def pytest_sessionstart(session):
    problems = []
    if os.geteuid() != 0:
        problems.append("not root")
    if not os.path.ismount("/sys/fs/bpf"):
        problems.append("bpffs not mounted at /sys/fs/bpf")
    if not CNIFLOW.exists():
        problems.append(f"{CNIFLOW} missing: run scripts/setup.sh")
    if problems:
        raise pytest.UsageError(
            "cniflow's tests need root, BPF and namespaces (" + "; ".join(problems) +
            "): run `sudo scripts/test.sh`")


@pytest.hookimpl(optionalhook=True)  # a run without xdist: -p no:xdist
def pytest_xdist_make_scheduler(config, log):
    """Work units for pytest-xdist: all of LAB_MODULES as one, each other module as one.
    (Not xdist_group marks: xdist 3.8 renames the items to group them, which pytest 9.2
    no longer lets it do.)"""
    from xdist.scheduler import LoadScopeScheduling

    class Labs(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::")[0].rsplit("/", 1)[-1].removesuffix(".py")
            return "lab" if module in LAB_MODULES else module

    return Labs(config, log)


@pytest.fixture
def node():
    """Two pods behind a routed node; torn down whatever the test did."""
    prefix = f"cft{WORKER}{os.getpid() % 1000}{next(_ids)}"
    n = netlab.up(prefix, 2)
    try:
        yield n
    finally:
        netlab.down(prefix)


def tcx_programs(netns: str, ifname: str, parent: str = "ingress") -> list[str]:
    """Names of the programs on an interface's TCX hook, in the order they run."""
    from fakeapi import in_netns

    from bpf import syscall

    hook = syscall.TCX_INGRESS if parent == "ingress" else syscall.TCX_EGRESS

    def names() -> list[str]:
        try:
            return [syscall.prog_name(p) for p, _ in
                    syscall.query(socket.if_nametoindex(ifname), hook)]
        except OSError:
            return []  # the interface is gone

    return in_netns(netns, names)


def filters(node, ifname: str, parent: str = "ingress") -> str:
    """What runs on an interface's hook: its tc filters, then a line naming the TCX
    programs (cniflow attaches with either)."""
    tc = subprocess.run(node.exec(f"tc filter show dev {ifname} {parent}").split(),
                        capture_output=True, text=True).stdout
    return tc + "tcx: " + " ".join(tcx_programs(node.netns, ifname, parent)) + "\n"


class RunningAgent:
    def __init__(self, node, proc, log: Path, metrics_port: int):
        self.node, self.proc, self.log, self.metrics_port = node, proc, log, metrics_port

    def metrics(self) -> dict[str, float]:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        out = subprocess.run(self.node.exec(f"curl -s {url}").split(), capture_output=True,
                             text=True).stdout
        values = {}
        for line in out.splitlines():
            m = re.match(r"^([a-z_]+(?:\{[^}]*\})?) (\S+)$", line)
            if m:
                values[m.group(1)] = float(m.group(2))
        return values

    def stop(self) -> int:
        return terminate(self.proc, self.log)


def terminate(proc: subprocess.Popen, log: Path, seconds: float = 30) -> int:
    """SIGTERM, and the exit code; a process that does not stop in time is made to
    write its threads' stacks to its log (SIGUSR1), killed, and the test fails with
    the log."""
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGUSR1)
        time.sleep(1)
        proc.kill()
        proc.wait()
        raise AssertionError(f"did not stop in {seconds} s:\n{log.read_text()}") from None


@contextlib.contextmanager
def agent(node, *args: str, interfaces: tuple[str, ...] | None = None, wait_attached=True,
          collector: str = "127.0.0.1:4739", metrics_port: int = 9477,
          wrap: tuple[str, ...] = (), metered: int | None = None):
    """Run `cniflow agent` in the node namespace (under wrap, e.g. setpriv), yielded once
    it is up; on exit SIGTERM it and expect exit 0. metered: the first pods it attaches
    to (all)."""
    log = Path(f"/tmp/{node.prefix}-agent.log")
    ifs = interfaces if interfaces is not None else (f"{node.prefix}v*",)
    cmd = ["ip", "netns", "exec", node.netns, *wrap, str(CNIFLOW), "agent", "--collector",
           collector,
           "--metrics-address", f"127.0.0.1:{metrics_port}", "--poll-interval", "0.5"]
    for i in ifs:
        cmd += ["--interface", i]
    cmd += list(args)
    if "--pin-path" not in args:  # no pins unless the test asks: none adopted, none left
        cmd += ["--pin-path", "off"]
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, stderr=f, stdout=f)
    running = RunningAgent(node, proc, log, metrics_port)
    try:
        # up (serving its metrics, which it does once started: seconds on a slow machine)
        # and, with wait_attached, attached (links an earlier agent pinned are there
        # before this one is up)
        deadline = time.time() + 60
        while not running.metrics() or wait_attached and not all(
                "cniflow_egress" in filters(node, p.host_if, "egress")
                for p in node.pods[:metered]):
            assert proc.poll() is None, log.read_text()
            assert time.time() < deadline, "agent not up and attached: " + log.read_text()
            time.sleep(0.1)
        yield running
    finally:
        if proc.poll() is None:
            rc = running.stop()
            assert rc == 0, log.read_text()


@contextlib.contextmanager
def k8s_agent(node, api, *args: str, wait_attached: bool = False, wrap: tuple[str, ...] = (),
              node_name: str = "node-a"):
    """`cniflow agent --kubernetes` in the node namespace against the fake API server
    (tests/fakeapi.py), as the node node_name; wait_attached: until every pod of the
    node is attached."""
    kubeconfig = api.kubeconfig(Path(f"/tmp/{node.prefix}-kubeconfig"))
    with agent(node, "--kubernetes", "--node-name", node_name, "--kubeconfig", str(kubeconfig),
               *args, interfaces=(), wait_attached=wait_attached, wrap=wrap) as running:
        yield running


def wait_for(predicate, timeout: float = 10.0, step: float = 0.1):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    return predicate()


@pytest.fixture(scope="session")
def txring(tmp_path_factory) -> Path:
    """bench/txring.c built: a sender through an AF_PACKET TX ring (paged skbs)."""
    out = tmp_path_factory.mktemp("bin") / "txring"
    subprocess.run(["gcc", "-O2", "-o", str(out), str(ROOT / "bench" / "txring.c")], check=True)
    return out


@contextlib.contextmanager
def own_bpffs(name: str):
    """A bpffs of the test's own at /run/cniflow-lab/NAME (outside /sys, which `ip netns
    exec` replaces): no test adopts another's pins. Yields its path."""
    fs = Path(f"/run/cniflow-lab/{name}")
    fs.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "bpf", "bpf", str(fs)], check=True)
    try:
        yield fs
    finally:
        subprocess.run(["umount", str(fs)], check=False)
        fs.rmdir()
