"""The README's first command, `scripts/demo.sh`, as a user runs it: it prepares the host
(idempotent: the suite's setup already ran), builds two pods, sends real traffic and
prints what cniflow collector wrote. Every row it promises is checked, with its counts."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def rows(out: str) -> list[list[str]]:
    """The printed table's rows, split into columns (none of them holds a space)."""
    table = out.split("source         sport destination", 1)[1].split("\n\n", 1)[0]
    return [line.split() for line in table.splitlines()[1:] if line.strip()]


def test_the_demo_shows_every_flow_once_with_pods_workloads_and_the_service():
    r = subprocess.run(["bash", str(ROOT / "scripts/demo.sh")], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    web, db = ("web-7d9f-x2x4q", "Deployment/web"), ("db-0", "StatefulSet/db")
    got = {(src, sport, dst, dport, proto): (int(pkts), int(octets), where, (spod, swl),
                                             (dpod, dwl), service, kind, end)
           for src, sport, dst, dport, proto, pkts, octets, where, spod, swl, dpod, dwl, service,
           kind, end in rows(r.stdout)}
    pair = {"10.99.0.2": ("cfdemov0:in", web), "10.99.1.2": ("cfdemov1:in", db),
            "fd00:99::2": ("cfdemov0:in", web), "fd00:99:1::2": ("cfdemov1:in", db)}

    def row(src: str, sport: str, dst: str, dport: str, proto: str, pkts: int, octets: int,
            service: str):
        where, source = pair[src]
        dest = pair[dst][1] if dst in pair else db  # the ClusterIP's pod: db-0
        return (src, sport, dst, dport, proto), (pkts, octets, where, source, dest, service,
                                                 "intra-node", "idle")

    (port,) = [k[1] for k in got if k[2:] == ("10.96.0.10", "80", "UDP")]  # the client's

    want = dict([
        row("10.99.0.2", "0", "10.99.1.2", "8/0", "ICMP", 4, 4 * 84, "-"),
        row("10.99.1.2", "0", "10.99.0.2", "0/0", "ICMP", 4, 4 * 84, "-"),
        row("fd00:99::2", "0", "fd00:99:1::2", "128/0", "ICMPv6", 3, 3 * 104, "-"),
        row("fd00:99:1::2", "0", "fd00:99::2", "129/0", "ICMPv6", 3, 3 * 104, "-"),
        row("10.99.0.2", port, "10.96.0.10", "80", "UDP", 10, 10 * 228, "shop/db:sql"),
        # the answers: from db-0's port 9000, named by the Service they answer for
        row("10.99.1.2", "9000", "10.99.0.2", port, "UDP", 10, 10 * 228, "shop/db:sql"),
    ])
    tcp = {k: v for k, v in got.items() if k[4] == "TCP"}
    assert {k: v for k, v in got.items() if k[4] != "TCP"} == want
    # iperf3: a control and a data connection to 5201, both ways, closed (FIN) by the
    # end; the data connection carried 2 s at 20 Mbit/s
    to_server = sorted(v[1] for k, v in tcp.items() if k[3] == "5201")
    assert len(tcp) == 4 and len(to_server) == 2 and to_server[1] > 4_500_000, tcp
    assert {(v[2], v[3], v[4], v[6], v[7]) for k, v in tcp.items()} == {
        ("cfdemov0:in", web, db, "intra-node", "end-of-flow"),
        ("cfdemov1:in", db, web, "intra-node", "end-of-flow")}
    # and nothing was lost on the way out: the agent's last export (at SIGTERM) found the
    # collector still there
    work = Path(re.search(r"written by cniflow collector \((\S+)/records.jsonl\)", r.stdout)[1])
    assert "not delivered" not in (work / "agent.log").read_text()
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert "cfdemo" not in left
