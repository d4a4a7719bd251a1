"""The plain-host demo: two pods, real traffic, cniflow exporting to nfcapd, a flow table.

Run through scripts/demo.sh (which prepares the host first).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import netlab  # noqa: E402
import oracles  # noqa: E402

PREFIX = "cfdemo"
PORT = 4739
REASONS = {1: "idle", 2: "active", 3: "end-of-flow", 4: "forced", 5: "no-room"}
PROTOS = {1: "ICMP", 6: "TCP", 17: "UDP", 58: "ICMPv6"}


def step(text: str) -> None:
    print(f"\n== {text}", flush=True)


def main() -> int:
    cniflow = Path(sys.executable).with_name("cniflow")
    node = netlab.up(PREFIX, 2)
    agent = None
    try:
        a, b = node.pods
        step(
            f"pods: {a.netns} {a.ipv4} {a.ipv6} (host side {a.host_if}), "
            f"{b.netns} {b.ipv4} {b.ipv6} (host side {b.host_if})"
        )
        collector = oracles.Nfcapd(node.netns, PORT)
        step(f"nfcapd collecting on 127.0.0.1:{PORT} in {node.netns}; starting cniflow agent")
        agent = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                node.netns,
                str(cniflow),
                "agent",
                "--interface",
                f"{PREFIX}v*",
                "--collector",
                f"127.0.0.1:{PORT}",
                "--idle-timeout",
                "3",
                "--active-timeout",
                "8",
                "--log-format",
                "text",
                "--metrics-address",
                "127.0.0.1:9477",
            ],
            stderr=subprocess.STDOUT,
        )
        deadline = time.time() + 60
        while (
            b"cniflow_ingress"
            not in subprocess.run(
                node.exec(f"tc filter show dev {b.host_if} ingress").split(), capture_output=True
            ).stdout
            and time.time() < deadline
        ):
            time.sleep(0.2)
        subprocess.run(node.in_pod(1, f"iperf3 -s -D -1 -B {b.ipv4} -p 5201").split(), check=True)
        step("traffic: ping, ping -6, UDP datagrams, an iperf3 TCP transfer")
        subprocess.run(
            node.in_pod(0, f"ping -c 4 -i 0.2 -q {b.ipv4}").split(), stdout=subprocess.DEVNULL
        )
        subprocess.run(
            node.in_pod(0, f"ping -6 -c 3 -i 0.2 -q {b.ipv6}").split(), stdout=subprocess.DEVNULL
        )
        subprocess.run(
            node.in_pod(
                0,
                'python3 -c "import socket;s=socket.socket(2,2);'
                f"[s.sendto(b'x'*200,('{b.ipv4}',9000)) for _ in range(10)]\"",
            ),
            shell=True,
        )
        time.sleep(0.5)
        subprocess.run(
            node.in_pod(0, f"iperf3 -c {b.ipv4} -p 5201 -t 2 -b 20M").split(),
            stdout=subprocess.DEVNULL,
        )
        step("waiting for idle timeouts, then stopping the agent (SIGTERM exports the rest)")
        time.sleep(5)
        agent.send_signal(signal.SIGTERM)
        agent.wait(timeout=20)
        agent = None
        flows = collector.stop()
        names = {
            int(line.split(":")[0]): line.split(":")[1].strip().split("@")[0]
            for line in subprocess.run(
                node.exec("ip -o link").split(), capture_output=True, text=True
            ).stdout.splitlines()
        }
        step(f"{len(flows)} flow records read back by nfdump")
        fmt = "{:<26} {:>5} {:<26} {:>5} {:<6} {:>8} {:>10} {:<10} {:<11}"
        print(
            fmt.format(
                "source",
                "sport",
                "destination",
                "dport",
                "proto",
                "packets",
                "octets",
                "interface",
                "end reason",
            )
        )
        for f in sorted(flows, key=lambda f: (f["first_ms"], f["src"])):
            ifindex = f["input"] or f["output"]
            where = f"{names.get(ifindex, ifindex)}:{'in' if f['input'] else 'out'}"
            dport = (
                f["dport"] if f["proto"] not in (1, 58) else f"{f['dport'] >> 8}/{f['dport'] & 255}"
            )
            print(
                fmt.format(
                    f["src"],
                    f["sport"],
                    f["dst"],
                    dport,
                    PROTOS.get(f["proto"], f["proto"]),
                    f["packets"],
                    f["octets"],
                    where,
                    REASONS.get(f["end_reason"], "?"),
                )
            )
        print("\n'in' is the TC ingress of the host-side veth: traffic the pod sent.")
        return 0 if flows else 1
    finally:
        if agent is not None:
            agent.send_signal(signal.SIGTERM)
            agent.wait(timeout=20)
        if os.environ.get("CNIFLOW_DEMO_KEEP") != "1":
            netlab.down(PREFIX)


if __name__ == "__main__":
    sys.exit(main())
