"""The plain-host demo: two pods, real traffic, cniflow's agent exporting to cniflow's
collector on the same node, and the flows printed as a table with pod names, their
workloads (a Deployment's pod, a StatefulSet's) and the Service a flow went to.

No Kubernetes runs here, so the agent follows a small stand-in API server (the one
the tests use, tests/fakeapi.py) that lists the two demo pods in an opted-in
namespace, their owners, and a Service whose ClusterIP the node translates as
kube-proxy's iptables mode does. Run through scripts/demo.sh, which prepares the
host first.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]
import netlab  # noqa: E402
from fakeapi import FakeApiServer  # noqa: E402

PREFIX = "cfdemo"
PORT = 4739
NODE = "demo-node"
CLUSTER_IP = "10.96.0.10"
PEN = 32473  # RFC 5612's enterprise number for examples: use your organisation's
ECHO = ("import socket;s=socket.socket(2,2);s.bind(('',9000))\n"
        "while 1:\n d,a=s.recvfrom(9999);s.sendto(d,a)")
REASONS = {1: "idle", 2: "active", 3: "end-of-flow", 4: "forced", 5: "no-room"}
PROTOS = {1: "ICMP", 6: "TCP", 17: "UDP", 58: "ICMPv6"}


def step(text: str) -> None:
    print(f"\n== {text}", flush=True)


def start(node, *args: str, log: Path) -> subprocess.Popen:
    cniflow = str(Path(sys.executable).with_name("cniflow"))
    return subprocess.Popen(["ip", "netns", "exec", node.netns, cniflow, *args],
                            stderr=log.open("w"))


def attached(log: Path, interfaces: set[str], agent: subprocess.Popen) -> None:
    """Until the agent's log says it attached to every interface (TCX links or tc
    filters, whichever the kernel has); an agent that exits says why."""
    deadline = time.time() + 120  # BCC compiles the program first: seconds, more when busy
    while not interfaces <= {entry.get("interface") for entry in _entries(log)
                             if entry.get("msg") == "attached"}:
        if agent.poll() is not None or time.time() > deadline:
            sys.exit(f"the agent did not attach:\n{log.read_text()}")
        time.sleep(0.2)


def _entries(log: Path) -> list[dict]:
    """The log's JSON lines so far (a line being written is not one yet)."""
    out = []
    for line in log.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


def stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM, last started first: the agent exports what it still holds as it stops,
    so the collector it exports to must outlive it (the DaemonSet makes the collector a
    sidecar for the same reason)."""
    while procs:
        p = procs.pop()
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:  # the rest are still stopped, the lab torn down
            p.kill()
            p.wait()


FLOW_TYPES = {1: "intra-node", 2: "inter-node", 3: "to ext", 4: "from ext"}


def workload(r: dict, side: str) -> str:
    kind = r.get(f"{side}WorkloadKind")
    return f"{kind}/{r[f'{side}WorkloadName']}" if kind else "-"


def table(rows: list[dict]) -> None:
    fmt = ("{:<14} {:>5} {:<14} {:>5} {:<6} {:>7} {:>9} {:<12} {:<14} {:<16} {:<14} "
           "{:<16} {:<12} {:<10} {:<11}")
    print(fmt.format("source", "sport", "destination", "dport", "proto", "packets", "octets",
                     "interface", "source pod", "source workload", "dest pod", "dest workload",
                     "service", "flow type", "end reason"))
    for r in sorted(rows, key=lambda r: (r["flowStartMilliseconds"], r["flowDirection"])):
        proto = r["protocolIdentifier"]
        icmp = r.get("icmpTypeCodeIPv4") or r.get("icmpTypeCodeIPv6") or 0
        dport = f"{icmp >> 8}/{icmp & 255}" if proto in (1, 58) else r["destinationTransportPort"]
        where = f"{r['interfaceName']}:{'in' if r['flowDirection'] == 0 else 'out'}"
        print(fmt.format(
            r.get("sourceIPv4Address") or r["sourceIPv6Address"], r["sourceTransportPort"],
            r.get("destinationIPv4Address") or r["destinationIPv6Address"], dport,
            PROTOS.get(proto, proto), r["packetDeltaCount"], r["octetDeltaCount"], where,
            r.get("sourcePodName") or "-", workload(r, "source"),
            r.get("destinationPodName") or "-", workload(r, "destination"),
            r.get("destinationServicePortName") or "-", FLOW_TYPES.get(r.get("flowType", 0), "-"),
            REASONS.get(r["flowEndReason"], "?")))


def report(out: Path, note: str) -> int:
    """The collector's JSON lines as a table; exit status 1 if there were none."""
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    flows = [r for r in rows if "octetDeltaCount" in r]
    step(f"{len(flows)} flow records written by cniflow collector ({out})")
    local = [r for r in flows if str(r.get("sourceIPv6Address")).startswith(("fe80:", "ff02:"))
             or str(r.get("destinationIPv6Address")).startswith(("fe80:", "ff02:"))]
    table([r for r in flows if r not in local])
    if local:
        print(f"(and {len(local)} records of IPv6 neighbour discovery and multicast listener "
              "reports on the link, not shown)")
    print("\n" + note)
    return 0 if flows else 1


def kube_proxy(node, cluster_ip: str, port: int, backend: str, target: int) -> None:
    """What kube-proxy's iptables mode writes for one UDP Service port, one endpoint."""
    for rule in ("-N KUBE-SERVICES", "-I PREROUTING -j KUBE-SERVICES",
                 "-I OUTPUT -j KUBE-SERVICES", "-N KUBE-SVC-DB", "-N KUBE-SEP-DB",
                 f"-A KUBE-SERVICES -d {cluster_ip}/32 -p udp --dport {port} -j KUBE-SVC-DB",
                 "-A KUBE-SVC-DB -j KUBE-SEP-DB",
                 f"-A KUBE-SEP-DB -p udp -j DNAT --to-destination {backend}:{target}"):
        netlab.sh(node.exec(f"iptables -t nat {rule}"))


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="cniflow-demo-"))
    node = netlab.up(PREFIX, 2)
    procs: list[subprocess.Popen] = []
    api = None
    try:
        a, b = node.pods
        api = FakeApiServer(node.netns)
        api.namespace("shop", {"cniflow.io/export": "true"})
        rs = api.replica_set("shop", "web", "7d9f")
        api.owned_pod("shop", "web-7d9f-x2x4q", NODE, [a.ipv4, a.ipv6],
                      ("apps/v1", "ReplicaSet", rs), {"app": "web"})
        sts = {"metadata": {"name": "db", "uid": "5f0c1c2e-8c1b-4b7e-9d6a-3f1e2d4c5b6a"}}
        api.owned_pod("shop", "db-0", NODE, [b.ipv4, b.ipv6], ("apps/v1", "StatefulSet", sts),
                      {"app": "db"})
        api.service("shop", "db", CLUSTER_IP, [("sql", "UDP", 80, 9000)])
        api.endpoint_slice("shop", "db", [("sql", "UDP", 9000)], [(b.ipv4, "db-0", NODE)])
        kube_proxy(node, CLUSTER_IP, 80, b.ipv4, 9000)
        step(f"pods: shop/web-7d9f-x2x4q {a.ipv4} {a.ipv6} (Deployment web, host side "
             f"{a.host_if}), shop/db-0 {b.ipv4} {b.ipv6} (StatefulSet db, host side "
             f"{b.host_if}); namespace shop opted in; Service shop/db {CLUSTER_IP} port sql "
             "80/UDP -> db-0:9000 (iptables DNAT, as kube-proxy writes it)")
        out = work / "records.jsonl"
        collector = start(node, "collector", "--listen", f"127.0.0.1:{PORT}", "--output",
                          str(out), "--metrics-address", "off", log=work / "collector.log")
        procs.append(collector)
        agent = start(node, "agent", "--kubernetes", "--node-name", NODE, "--kubeconfig",
                      str(api.kubeconfig(work / "kubeconfig")), "--collector",
                      f"127.0.0.1:{PORT}", "--idle-timeout", "3", "--active-timeout", "8",
                      "--enterprise-number", str(PEN), "--pod-labels", "app",
                      "--metrics-address", "127.0.0.1:9477", log=work / "agent.log")
        procs.append(agent)
        step("cniflow collector on 127.0.0.1:4739 and cniflow agent --kubernetes, in the node")
        attached(work / "agent.log", {p.host_if for p in node.pods}, agent)
        subprocess.run(node.in_pod(1, f"iperf3 -s -D -1 -B {b.ipv4} -p 5201").split(), check=True)
        procs.append(subprocess.Popen(node.in_pod(1, "python3 -c").split() + [ECHO]))
        step("traffic: ping, ping -6, UDP datagrams to the Service (answered), an iperf3 TCP "
             "transfer")
        subprocess.run(node.in_pod(0, f"ping -c 4 -i 0.2 -q {b.ipv4}").split(),
                       stdout=subprocess.DEVNULL)
        subprocess.run(node.in_pod(0, f"ping -6 -c 3 -i 0.2 -q {b.ipv6}").split(),
                       stdout=subprocess.DEVNULL)
        subprocess.run(node.in_pod(0, "python3 -c \"import socket;s=socket.socket(2,2);"
                                   "s.settimeout(2);s.connect(('" + CLUSTER_IP + "',80))\n"
                                   "for _ in range(10): s.send(b'x'*200);s.recv(999)\""),
                       shell=True)
        time.sleep(0.5)
        subprocess.run(node.in_pod(0, f"iperf3 -c {b.ipv4} -p 5201 -t 2 -b 20M").split(),
                       stdout=subprocess.DEVNULL)
        step("waiting for idle timeouts, then stopping the agent (SIGTERM exports the rest)")
        time.sleep(5)
        stop(procs)
        return report(out, "'in' is the TC ingress of the host-side veth: traffic the pod "
                      "sent. A packet between two\nmetered pods of the node is counted once, "
                      "at the sender's veth (--dedup). The datagrams to the\nService's "
                      "ClusterIP name the Service and, from the node's conntrack, db-0 behind "
                      "it; workloads\ntravel under --enterprise-number (here RFC 5612's "
                      f"example number {PEN}), named by RFC 5610 records.")
    finally:
        stop(procs)
        if api is not None:
            api.stop()
        netlab.down(PREFIX)


if __name__ == "__main__":
    if "--vpp" in sys.argv[1:]:
        from demo_vpp import main as vpp_main

        sys.exit(vpp_main())
    sys.exit(main())
