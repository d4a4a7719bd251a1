"""Soak: an hour of pod churn, traffic, collector restarts, dropped TCP connections and
VPP restarts, then an exact account of every packet.

    sudo .venv/bin/python bench/soak.py [--minutes 60]      # --quick: 3 minutes

Three lanes run side by side, each on a lab node of its own (namespaces sok<lane>-*):

- udp: an eBPF agent in --kubernetes mode (the fake API server, the real kubernetes
  client's watch), exporting over UDP to `cniflow collector`, which is stopped and
  started again every --restart-every seconds;
- tcp: the same over TCP; every --restart-every seconds, in turn: a reset of the
  agent's socket (`ss -K`), the collector killed, the agent killed (SIGKILL) and
  started again at once (eBPF agents pin their maps and links on a bpffs of the
  lane's, as the DaemonSet does: the successor adopts them);
- vpp: an agent in VPP mode against the VPP simulator (tests/vppsim.py), restarted in
  turn as a new process and in its container (same pid, same message table).

Pods are created and deleted all along (a new veth, a pod object opting in). eBPF
pods are silent but for the soak's traffic (no IPv6, permanent neighbours): sequence-
numbered UDP datagrams and a TCP stream to a remote host, counted by the sender (UDP
sends; TCP_INFO's segments out and in) and checked against the veth's own counters
before the pod is deleted. VPP pods' packets are what the simulator's flowprobe
metered. At the end: packets sent == packets in records at the collector + packets
in the agent's loss counters, per lane; what neither holds is named (a UDP datagram
to a collector that was down, seen on the loopback by a tap; what VPP forgot when it
restarted). Resident memory and open fds of agents and collectors every minute.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts"), str(ROOT / "tests")]

import netlab  # noqa: E402
from fakeapi import FakeApiServer, in_netns  # noqa: E402

CNIFLOW = Path(sys.executable).with_name("cniflow")
NODE = "node-a"  # vpplab.Lab names pods on this node
OPT_IN = {"cniflow.io/export": "true"}
UDP_PORT, TCP_PORT = 7000, 7001
WORK = Path("/tmp/cniflow-soak")


def log(lane: str, msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} [{lane}] {msg}", flush=True)


def sh(cmd: str, check: bool = True) -> str:
    return netlab.sh(cmd, check).stdout


def usage(pid: int) -> tuple[float, int]:
    """(resident MB, open fds) of a process."""
    rss = next(int(line.split()[1]) for line in open(f"/proc/{pid}/status")
               if line.startswith("VmRSS"))
    return rss / 1024, len(os.listdir(f"/proc/{pid}/fd"))


def metrics(netns: str, port: int) -> dict[str, float]:
    out = sh(f"ip netns exec {netns} curl -s 127.0.0.1:{port}/metrics", check=False)
    vals = {}
    for line in out.splitlines():
        if line and not line.startswith("#"):
            k, _, v = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                vals[k] = float(v)
    return vals


def total(vals: dict[str, float], name: str) -> float:
    return sum(v for k, v in vals.items() if k == name or k.startswith(name + "{"))


class Collector:
    """`cniflow collector`, one output file per run so restarts lose no line."""

    def __init__(self, netns: str, transport: str, tag: str) -> None:
        self.netns, self.transport, self.tag, self.runs = netns, transport, tag, 0
        self.proc: subprocess.Popen | None = None
        self.files: list[Path] = []
        self.start()

    def start(self) -> None:
        self.runs += 1
        out = WORK / f"{self.tag}-records-{self.runs}.jsonl"
        out.unlink(missing_ok=True)
        self.files.append(out)
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", self.netns, str(CNIFLOW), "collector", "--listen",
             "127.0.0.1:4739", "--transport", self.transport, "--output", str(out),
             "--rotate-bytes", "0", "--metrics-address", "127.0.0.1:9478"],
            stderr=(WORK / f"{self.tag}-collector.log").open("a" if self.runs > 1 else "w"))
        proto = "u" if self.transport == "udp" else "t"
        for _ in range(150):
            if sh(f"ip netns exec {self.netns} ss -ln{proto}H sport = :4739", False).strip():
                return
            time.sleep(0.1)
        raise RuntimeError(f"{self.tag}: collector did not listen")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)
        self.proc.wait(30)

    def records(self) -> list[dict]:
        rows = []
        for f in self.files:
            if f.exists():
                for line in f.read_text().splitlines():
                    with contextlib.suppress(json.JSONDecodeError):
                        rows.append(json.loads(line))
        return rows


class Agent:
    """`cniflow agent` as the DaemonSet runs it: pinned maps and links on a bpffs of the
    lane's own (eBPF lanes), so a SIGKILLed agent's successor adopts them."""

    def __init__(self, node: netlab.Node, api: FakeApiServer, tag: str, *args: str,
                 pins: str = "off") -> None:
        self.netns, self.tag = node.netns, tag
        kubeconfig = api.kubeconfig(WORK / f"{tag}-kubeconfig")
        self.log = WORK / f"{tag}-agent.log"
        self.cmd = ["ip", "netns", "exec", node.netns, str(CNIFLOW), "agent", "--kubernetes",
                    "--node-name", NODE, "--kubeconfig", str(kubeconfig), "--collector",
                    "127.0.0.1:4739", "--metrics-address", "127.0.0.1:9477", "--pin-path",
                    pins, "--poll-interval", "0.5", "--idle-timeout", "2", "--active-timeout",
                    "10", *args]
        self.runs, self.restarting = 0, False
        self.lost_before = 0.0  # packets the killed agents' loss counters held
        self.start()

    def start(self) -> None:
        self.runs += 1
        self.proc = subprocess.Popen(self.cmd, stderr=self.log.open(
            "a" if self.runs > 1 else "w"))

    def kill_and_start(self) -> None:
        """SIGKILL (its loss counters read just before), then a new agent at once."""
        self.restarting = True
        self.lost_before += total(self.metrics(), "cniflow_packets_lost_total")
        self.proc.kill()
        self.proc.wait(30)
        self.start()
        self.restarting = False

    def metrics(self) -> dict[str, float]:
        return metrics(self.netns, 9477)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(60)


class Lane:
    """What every lane shares: churn pacing, samples, the final account."""

    def __init__(self, name: str, args) -> None:
        self.name, self.args = name, args
        self.prefix = f"sok{name}"
        self.samples: list[tuple[float, str, float, int]] = []  # (t, who, MB, fds)
        self.sent = 0  # packets the lane's truth says crossed a metered interface
        self.pods: dict[str, dict] = {}  # ip -> {name, sent, ...}
        self.events: list[str] = []
        self.errors: list[str] = []
        self.stop = threading.Event()

    def sample(self, t0: float) -> None:
        for who, proc in (("agent", self.agent.proc), ("collector", self.collector.proc)):
            with contextlib.suppress(OSError, StopIteration):
                mb, fds = usage(proc.pid)
                self.samples.append((round((time.time() - t0) / 60, 2), who, round(mb, 1), fds))

    def at_collector(self) -> tuple[int, int, dict[str, int]]:
        """Packets in flow records naming a lane pod's address; the highest
        notSentPacketTotalCount (RFC 7011 reliability statistics); per pod."""
        per: dict[str, int] = {}
        got = lost = 0
        for r in self.collector.records():
            if "notSentPacketTotalCount" in r:
                lost = max(lost, r["notSentPacketTotalCount"])
            if "packetDeltaCount" not in r:
                continue
            for side in ("source", "destination"):
                ip = r.get(f"{side}IPv4Address")
                if ip in self.pods:
                    per[ip] = per.get(ip, 0) + r["packetDeltaCount"]
                    got += r["packetDeltaCount"]
                    break
        return got, lost, per


# -- eBPF lanes ------------------------------------------------------------------------


class Tap:
    """Every IPFIX datagram on the node's loopback to port 4739, decoded: what the
    agent put on the wire, whether or not a collector was listening."""

    def __init__(self, netns: str, pods: dict) -> None:
        from agent.ipfix.decoder import Decoder
        self.decoder, self.pods, self.packets = Decoder(), pods, 0
        self.times: list[tuple[float, int]] = []  # (arrival, packets) per datagram
        self.sock = in_netns(netns, lambda: socket.socket(
            socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(0x0800)))
        self.sock.bind(("lo", 0x0800))
        self.sock.settimeout(0.5)
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        from agent.ipfix.decoder import records
        while not self.done.is_set():
            try:
                data, addr = self.sock.recvfrom(65535)
            except TimeoutError:
                continue
            if addr[2] != socket.PACKET_HOST or data[9] != 17:
                continue
            ihl = (data[0] & 15) * 4
            sport, dport = struct.unpack_from("!HH", data, ihl)
            if dport != 4739:
                continue
            n = 0
            for rs in self.decoder.message(bytes(data[ihl + 8:]), f"127.0.0.1:{sport}"):
                for r in records(rs):
                    if r.get("sourceIPv4Address") in self.pods or \
                            r.get("destinationIPv4Address") in self.pods:
                        n += r.get("packetDeltaCount", 0)
            self.packets += n
            self.times.append((time.time(), n))

    def close(self) -> None:
        time.sleep(1)
        self.done.set()
        self.thread.join()
        self.sock.close()


class Remote:
    """The remote host's sinks: UDP datagrams counted by sequence, TCP read to EOF."""

    def __init__(self, node: netlab.Node) -> None:
        self.received: dict[str, tuple[int, int]] = {}  # address -> (last seq, count)
        self.udp = in_netns(node.remote_netns, lambda: socket.socket(socket.AF_INET,
                                                                     socket.SOCK_DGRAM))
        self.udp.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.udp.bind(("0.0.0.0", UDP_PORT))
        self.udp.settimeout(0.5)
        self.tcp = in_netns(node.remote_netns, lambda: socket.create_server(
            ("0.0.0.0", TCP_PORT), backlog=64))
        self.tcp.settimeout(0.5)
        self.done = threading.Event()
        for fn in (self._udp, self._accept):
            threading.Thread(target=fn, daemon=True).start()

    def _udp(self) -> None:
        while not self.done.is_set():
            try:
                data, addr = self.udp.recvfrom(2048)
            except TimeoutError:
                continue
            except OSError:  # closed at the end of the run
                return
            seq = struct.unpack_from("!Q", data)[0]  # in order on a veth: a gap is a loss
            last, count = self.received.get(addr[0], (0, 0))
            self.received[addr[0]] = (seq, count + 1) if seq > last else (last, count)

    def _accept(self) -> None:
        while not self.done.is_set():
            try:
                conn, _ = self.tcp.accept()
            except TimeoutError:
                continue
            except OSError:  # closed at the end of the run
                return
            threading.Thread(target=self._drain, args=(conn,), daemon=True).start()

    @staticmethod
    def _drain(conn: socket.socket) -> None:
        conn.settimeout(60)
        with contextlib.suppress(OSError):
            while conn.recv(65536):
                pass
        conn.close()

    def close(self) -> None:
        self.done.set()
        self.udp.close()
        self.tcp.close()


class EbpfLane(Lane):
    def __init__(self, name: str, args, subnet: int) -> None:
        super().__init__(name, args)
        self.transport, self.subnet, self.index = name, subnet, 0
        self.node = netlab.up(self.prefix, 0, subnet=subnet, remote=True)
        sh(self.node.exec("sysctl -qw net.ipv6.conf.default.disable_ipv6=1"))
        self.api = FakeApiServer(self.node.netns)
        self.api.namespace("soak", OPT_IN)
        self.remote = Remote(self.node)
        self.collector = Collector(self.node.netns, self.transport, self.prefix)
        self.tap = Tap(self.node.netns, self.pods) if self.transport == "udp" else None
        self.pinfs = Path(f"/run/cniflow-lab/{self.prefix}-pins")
        self.pinfs.mkdir(parents=True, exist_ok=True)
        sh(f"mount -t bpf bpf {self.pinfs}")
        self.agent = Agent(self.node, self.api, self.prefix, "--transport", self.transport,
                           pins=str(self.pinfs / "cniflow"))
        self.live: list[dict] = []
        self.lock = threading.Lock()
        self.down: list[tuple[float, float]] = []  # UDP collector away: (from, to)

    # pods: IPv4 only, permanent neighbours both ways: the veth carries only our packets
    def add_pod(self) -> dict:
        i, self.index = self.index, self.index + 1
        p = self.prefix
        ns, host_if = f"{p}-pod{i}", f"{p}v{i}"[:15]
        ip = f"10.{self.subnet}.{1 + i // 200}.{2 + i % 200}"
        sh(f"ip netns add {ns}")
        sh(f"ip netns exec {ns} sysctl -qw net.ipv6.conf.all.disable_ipv6=1 "
           "net.ipv6.conf.default.disable_ipv6=1")
        sh(f"ip link add {host_if} netns {self.node.netns} type veth peer name eth0 netns {ns}")
        _, host_mac = netlab.link_info(self.node.netns, host_if)
        _, pod_mac = netlab.link_info(ns, "eth0")
        netlab.batch(self.node.netns, [
            f"link set {host_if} up", f"route add {ip}/32 dev {host_if}",
            f"neigh replace {ip} lladdr {pod_mac} dev {host_if} nud permanent"])
        netlab.batch(ns, [
            "link set lo up", "link set eth0 up", f"addr add {ip}/32 dev eth0",
            "route add 169.254.1.1 dev eth0 scope link",
            "route add default via 169.254.1.1 dev eth0",
            f"neigh replace 169.254.1.1 lladdr {host_mac} dev eth0 nud permanent"])
        name = f"p{i}"
        pod = {"name": name, "ns": ns, "host_if": host_if, "ip": ip, "udp_sent": 0, "seq": 0}
        self.api.pod("soak", name, NODE, [ip])
        deadline = time.time() + 20
        from conftest import tcx_programs
        while "cniflow_egress" not in tcx_programs(self.node.netns, host_if, "egress") or \
                "cniflow_ingress" not in tcx_programs(self.node.netns, host_if, "ingress"):
            if time.time() > deadline:
                raise RuntimeError(f"{self.name}: {host_if} not attached")
            time.sleep(0.05)
        pod["base"] = self.node.link_stats(host_if)  # 0 on a silent veth; kept in any case
        pod["udp"] = in_netns(ns, lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        pod["udp"].connect((self.node.remote_ip, UDP_PORT))

        def tcp():
            s = socket.create_connection((self.node.remote_ip, TCP_PORT), timeout=10)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return s
        pod["tcp"] = in_netns(ns, tcp)
        self.pods[ip] = pod
        return pod

    def delete_pod(self, pod: dict) -> None:
        """Stop its traffic, close the TCP stream both ways, check the counts against
        the veth, then the pod object and the namespace go."""
        s = pod["tcp"]
        s.shutdown(socket.SHUT_WR)
        s.settimeout(10)
        while s.recv(65536):
            pass
        info = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 232)
        segs_out, segs_in = struct.unpack_from("II", info, 136)
        s.close()
        pod["udp"].close()
        time.sleep(0.3)
        now, base = self.node.link_stats(pod["host_if"]), pod["base"]
        rx = now["rx_packets"] - base["rx_packets"]  # the pod sent
        tx = now["tx_packets"] - base["tx_packets"]  # sent to the pod
        pod.update(rx=rx, tx=tx, segs_out=segs_out, segs_in=segs_in,
                   base_total=base["rx_packets"] + base["tx_packets"])
        if (rx, tx) != (pod["udp_sent"] + segs_out, segs_in):
            self.errors.append(f"{pod['name']}: veth rx {rx} tx {tx}, sender: UDP "
                               f"{pod['udp_sent']} + TCP out {segs_out}, TCP in {segs_in}")
        self.sent += rx + tx
        self.api.delete_pod("soak", pod["name"])
        sh(f"ip netns del {pod['ns']}")

    def traffic(self) -> None:
        """Every 20 ms each live pod sends a UDP datagram and a TCP message: about 50
        datagrams and 150 TCP segments (both ways) a second per pod."""
        msg = bytes(100)
        while not self.stop.is_set():
            with self.lock:
                for pod in self.live:
                    pod["seq"] += 1
                    try:
                        pod["udp"].send(struct.pack("!Q", pod["seq"]) + bytes(56))
                        pod["udp_sent"] += 1
                    except OSError as e:
                        self.errors.append(f"{pod['name']}: UDP send: {e}")
                    pod["tcp"].sendall(msg)
            time.sleep(0.02)

    def churn(self, lifetime: float, live: int) -> None:
        gap = lifetime / live
        while not self.stop.is_set():
            t = time.time()
            pod = self.add_pod()
            with self.lock:
                self.live.append(pod)
                old = self.live.pop(0) if len(self.live) > live else None
            if old:
                self.delete_pod(old)
            self.stop.wait(max(0.0, gap - (time.time() - t)))

    def disrupt(self, every: float) -> None:
        k = 0
        while not self.stop.wait(every):
            k += 1
            if self.transport == "udp":
                down = time.time()
                self.collector.stop()
                time.sleep(2)
                self.collector.start()
                self.down.append((down, time.time()))  # from SIGTERM to listening again
                self.events.append("collector restarted")
            elif k % 3 == 1:
                out = sh(self.node.exec(
                    "ss -K -tn state established dport = :4739"), check=False)
                self.events.append(f"agent's connection reset ({len(out.splitlines()) - 1})")
            elif k % 3 == 0:
                self.agent.kill_and_start()
                self.events.append("agent killed (SIGKILL) and started: pins adopted")
            else:
                self.collector.stop(signal.SIGKILL)
                time.sleep(2)
                self.collector.start()
                self.events.append("collector killed and started")

    def finish(self) -> dict:
        with self.lock:
            rest, self.live = self.live, []
        for pod in rest:
            self.delete_pod(pod)
        time.sleep(5)  # idle timeout (2 s) and a poll: every flow ended
        m = self.agent.metrics()
        rc = self.agent.stop()
        time.sleep(2)
        self.collector.stop()
        if self.tap:
            self.tap.close()
        self.remote.close()
        got, lost, per = self.at_collector()
        missing_udp = sum(pod["udp_sent"] - self.remote.received.get(ip, (0, 0))[1]
                          for ip, pod in self.pods.items())
        agent_lost = lost + total(m, "cniflow_packets_lost_total") + self.agent.lost_before
        out = {
            "pods": len(self.pods),
            "packets_sent": self.sent,
            "udp_datagrams_sent": sum(p["udp_sent"] for p in self.pods.values()),
            "udp_datagrams_missing_at_remote": missing_udp,
            "veth_counters_before_traffic": sum(p["base_total"] for p in self.pods.values()),
            "packets_at_collector": got,
            "packets_in_agent_loss_counters": agent_lost,
            "agent_exit": rc,
            "agent_runs": self.agent.runs,
            "agent": {k: total(m, k) for k in (
                "cniflow_records_exported_total", "cniflow_records_dropped_total",
                "cniflow_records_resent_total", "cniflow_export_errors_total",
                "cniflow_map_failed_inserts_total", "cniflow_packets_lost_total",
                "cniflow_poll_errors_total", "cniflow_attach_failures_total")},
            "disruptions": len(self.events),
            "checks_failed": self.errors[:20],
        }
        unaccounted = self.sent - got - agent_lost
        if self.tap:
            out["packets_on_the_wire"] = self.tap.packets
            out["lost_to_a_collector_that_was_down"] = self.tap.packets - got
            out["packets_on_the_wire_while_the_collector_was_down"] = sum(
                n for t, n in self.tap.times if any(a <= t <= b for a, b in self.down))
            out["collector_down_seconds"] = round(sum(b - a for a, b in self.down), 1)
        out["unaccounted"] = unaccounted
        out["exact"] = unaccounted == 0 and not self.errors
        bad = {p["name"]: (p["rx"] + p["tx"], per.get(ip, 0)) for ip, p in self.pods.items()
               if p["rx"] + p["tx"] != per.get(ip, 0)}
        out["pods_off"] = len(bad)
        out["pods_off_examples"] = dict(list(bad.items())[:10])
        return out

    def close(self) -> None:
        for proc in (self.agent.proc, self.collector.proc):
            if proc.poll() is None:
                proc.kill()
        self.api.stop()
        netlab.down(self.prefix)
        sh(f"umount {self.pinfs}", check=False)
        with contextlib.suppress(OSError):
            self.pinfs.rmdir()

    def threads(self, args) -> list[threading.Thread]:
        return [threading.Thread(target=f, args=a, daemon=True) for f, a in (
            (self.churn, (args.lifetime, args.live)), (self.traffic, ()),
            (self.disrupt, (args.restart_every,)))]


# -- VPP lane ----------------------------------------------------------------------------


class VppLane(Lane):
    def __init__(self, name: str, args) -> None:
        from vpplab import CURRENT, Lab, link
        from vppsim import VppSim
        super().__init__(name, args)
        self.node = netlab.up(self.prefix, 0)
        ns = self.node.netns
        self.api = FakeApiServer(ns)
        self.api.namespace("shop", OPT_IN)
        self.sim = VppSim(str(WORK / f"{self.prefix}-api.sock"), CURRENT, netns=ns)
        link(ns, "uplink0", "10.0.5.10/24")
        self.sim.tables[(5, False)] = "host-tap-uplink0-ip4"
        self.sim.add_interface("tap0", "host-uplink0")
        link(ns, "vppend", "169.254.0.1/32")
        self.lab = Lab(self.node, self.api, self.sim, "10.0.5.10", "169.254.0.1", 5)
        self.sim.run_timer(0.1)
        self.collector = Collector(ns, "udp", self.prefix)
        self.agent = Agent(self.node, self.api, self.prefix, "--dataplane", "vpp",
                           "--vpp-socket", self.sim.path)
        self.live: list[dict] = []
        self.index = 0
        self.not_metered = self.lost_in_vpp = 0

    def churn(self, lifetime: float, live: int) -> None:
        gap = lifetime / live
        while not self.stop.is_set():
            i, self.index = self.index, self.index + 1
            ip = f"10.1.{1 + i // 200}.{2 + i % 200}"
            with self.sim._lock:
                sw = self.lab.pod(f"v{i}", ip)
                pod = {"name": f"v{i}", "ip": ip, "sw": sw, "sent": 0}
                self.pods[ip] = pod
                self.live.append(pod)
                old = self.live.pop(0) if len(self.live) > live else None
            if old:
                self.api.delete_pod("shop", old["name"])
            self.stop.wait(gap)

    def traffic(self) -> None:
        """Every 0.1 s each live pod: 10 packets out (RX at VPP) and 10 in (TX), two
        flows each way; counted when VPP's flowprobe meters that interface."""
        from vppsim import BOTH, RX, TX
        k = 0
        while not self.stop.is_set():
            k += 1
            with self.sim._lock:
                for pod in self.live:
                    enabled = self.sim.state.enabled.get(pod["sw"])
                    for direction, src, dst in ((RX, pod["ip"], "10.9.9.9"),
                                                (TX, "10.9.9.9", pod["ip"])):
                        flows = [{"src": src, "dst": dst, "proto": 17, "sport": 5000 + j,
                                  "dport": 53, "packets": 5, "octets": 500} for j in range(2)]
                        if enabled and enabled[1] in (direction, BOTH) and \
                                self.sim._metering():
                            self.sim.traffic(pod["sw"], flows, direction)
                            pod["sent"] += 10
                            self.sent += 10
                        else:
                            self.not_metered += 10
            time.sleep(0.1)

    def disrupt(self, every: float) -> None:
        from vppsim import State
        k = 0
        while not self.stop.wait(every):
            k += 1
            with self.sim._lock:  # what VPP counted and had not exported dies with it
                lost = 0
                by_sw = {pod["sw"]: pod for pod in self.pods.values()}
                for key, e in self.sim.state.entries.items():
                    by_sw[key[0]]["forgotten"] = by_sw[key[0]].get("forgotten", 0) + e.packets
                    lost += e.packets
                self.lost_in_vpp += lost
                self.sim.stop()
                self.sim.state = State()  # dead: it meters and exports nothing until up
            time.sleep(1)
            self.sim.start(container=bool(k % 2))
            self.events.append(f"VPP restarted ({'same pid' if k % 2 else 'new pid'}), "
                               f"{lost} packets forgotten")

    def sample(self, t0: float) -> None:
        super().sample(t0)

    def finish(self) -> dict:
        with self.sim._lock:
            self.live = []
            self.sim.tick(time.time() + 1000)  # every entry's timers pass: all exported
        time.sleep(6)
        m = self.agent.metrics()
        rc = self.agent.stop()
        time.sleep(2)
        self.collector.stop()
        got, lost, per = self.at_collector()
        agent_lost = lost
        unaccounted = self.sent - self.lost_in_vpp - got - agent_lost
        bad = {p["name"]: (p["sent"], p.get("forgotten", 0), per.get(ip, 0))
               for ip, p in self.pods.items()
               if p["sent"] - p.get("forgotten", 0) != per.get(ip, 0)}
        return {
            "pods": len(self.pods),
            "packets_metered_by_vpp": self.sent,
            "packets_forgotten_by_vpp_at_restarts": self.lost_in_vpp,
            "packets_not_metered (VPP restarting, flowprobe not yet on)": self.not_metered,
            "packets_at_collector": got,
            "packets_in_agent_loss_counters": agent_lost,
            "agent_exit": rc,
            "agent_runs": self.agent.runs,
            "agent": {k: total(m, k) for k in (
                "cniflow_records_exported_total", "cniflow_records_dropped_total",
                "cniflow_vpp_records_total", "cniflow_vpp_decode_errors_total",
                "cniflow_vpp_foreign_datagrams_total", "cniflow_vpp_errors_total",
                "cniflow_poll_errors_total")},
            "disruptions": len(self.events),
            "unaccounted": unaccounted,
            "exact": unaccounted == 0,
            "pods_off": len(bad),
            "pods_off_examples (sent, forgotten by VPP, at collector)":
                dict(list(bad.items())[:10]),
        }

    def close(self) -> None:
        for proc in (self.agent.proc, self.collector.proc):
            if proc.poll() is None:
                proc.kill()
        self.sim.stop()
        self.api.stop()
        netlab.down(self.prefix)

    threads = EbpfLane.threads


# -- the run -------------------------------------------------------------------------------


def trend(samples: list[tuple[float, str, float, int]], who: str) -> dict:
    """First, middle and last sample, and the least-squares slope per hour (over the
    whole run and over its second half, after warm-up)."""
    pts = [(t, mb, fds) for t, w, mb, fds in samples if w == who]
    if len(pts) < 2:
        return {"samples": len(pts)}

    def slope(xs, ys):
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        den = sum((x - mx) ** 2 for x in xs) or 1
        return round(sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den * 60, 2)

    half = pts[len(pts) // 2:]
    return {
        "samples": len(pts),
        "rss_mb_first_middle_last": [pts[0][1], pts[len(pts) // 2][1], pts[-1][1]],
        "fds_first_middle_last": [pts[0][2], pts[len(pts) // 2][2], pts[-1][2]],
        "rss_mb_per_hour": slope([p[0] for p in pts], [p[1] for p in pts]),
        "rss_mb_per_hour_second_half": slope([p[0] for p in half], [p[1] for p in half]),
        "fds_per_hour": slope([p[0] for p in pts], [p[2] for p in pts]),
        "rss_mb_all": [p[1] for p in pts],
        "fds_all": [p[2] for p in pts],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=60)
    p.add_argument("--quick", action="store_true", help="a 3-minute smoke run")
    p.add_argument("--live", type=int, default=6, help="pods alive at once per lane")
    p.add_argument("--lifetime", type=float, default=60, help="seconds a pod lives")
    p.add_argument("--restart-every", type=float, default=90,
                   help="seconds between collector restarts, TCP drops, VPP restarts")
    p.add_argument("--sample-every", type=float, default=60)
    p.add_argument("--lanes", default="udp,tcp,vpp")
    args = p.parse_args()
    if args.quick:
        args.minutes, args.lifetime, args.restart_every, args.sample_every = 3, 20, 30, 20
    WORK.mkdir(exist_ok=True)
    lanes: list[Lane] = []
    try:
        for i, name in enumerate(args.lanes.split(",")):
            lanes.append(VppLane(name, args) if name == "vpp" else
                         EbpfLane(name, args, 60 + i))
        time.sleep(5)  # agents up: program loaded, API synced
        t0 = time.time()
        threads = [t for lane in lanes for t in lane.threads(args)]
        for t in threads:
            t.start()
        end, next_sample = t0 + args.minutes * 60, t0
        while time.time() < end:
            if time.time() >= next_sample:
                for lane in lanes:
                    lane.sample(t0)
                    if lane.agent.proc.poll() is not None and not lane.agent.restarting:
                        raise RuntimeError(f"{lane.name}: agent exited")
                next_sample += args.sample_every
                log("soak", f"{(time.time() - t0) / 60:.1f} min: " + "; ".join(
                    f"{ln.name} {len(ln.pods)} pods, {ln.sent} packets, "
                    f"{len(ln.events)} disruptions" for ln in lanes))
            time.sleep(1)
        for lane in lanes:
            lane.sample(t0)
            lane.stop.set()
        for t in threads:
            t.join(60)
        report = {"minutes": args.minutes, "lanes": {}}
        for lane in lanes:
            r = lane.finish()
            r["agent_usage"] = trend(lane.samples, "agent")
            r["collector_usage"] = trend(lane.samples, "collector")
            r["events"] = lane.events[:8]
            report["lanes"][lane.name] = r
        report["exact"] = all(r["exact"] for r in report["lanes"].values())
        print(json.dumps(report, indent=2), flush=True)
        return 0 if report["exact"] else 1
    finally:
        for lane in lanes:
            lane.close()


if __name__ == "__main__":
    sys.exit(main())
