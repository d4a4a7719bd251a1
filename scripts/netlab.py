"""A Kubernetes-like node built from network namespaces, for the demo and the tests.

One "node" namespace holds the host-side veths, routed the way Calico does it:
each pod has a /32 (and /128), a default route through 169.254.1.1 (fe80::1 for
IPv6) answered by proxy ARP on its host-side veth, and the node routes each
pod address to its veth. Traffic never leaves namespaces this module created.

    python3 scripts/netlab.py up PREFIX N    # PREFIX-node, PREFIX-pod0..N-1
    python3 scripts/netlab.py down PREFIX
"""

from __future__ import annotations

import ipaddress
import subprocess
import sys
from dataclasses import dataclass, field


def sh(cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, shell=True, check=check, capture_output=True, text=True)


# Receiver: read to EOF, then close (FIN); prints the byte count.
_SINK = ("import socket;s=socket.create_server(('',{port}));print('ready',flush=True);"
         "c,_=s.accept();n=0\nwhile (b:=c.recv(1<<16)): n+=len(b)\nc.close();print(n)")
# Sender: all bytes, FIN, then wait for the receiver's FIN.
_SOURCE = ("import socket;c=socket.create_connection(('{ip}',{port}));"
           "c.sendall(bytes({n}));c.shutdown(socket.SHUT_WR);c.recv(1);c.close()")


@dataclass
class Pod:
    netns: str
    host_if: str  # the veth in the node namespace
    ipv4: str
    ipv6: str


@dataclass
class Node:
    prefix: str
    pods: list[Pod] = field(default_factory=list)
    bridge: str = ""  # bridged layout: the bridge holding the pods' veths
    subnet: int = 99

    @property
    def netns(self) -> str:
        return f"{self.prefix}-node"

    def exec(self, cmd: str) -> str:
        return f"ip netns exec {self.netns} {cmd}"

    def in_pod(self, i: int, cmd: str) -> str:
        return f"ip netns exec {self.pods[i].netns} {cmd}"

    def tcp_transfer(self, src: int, dst: int, nbytes: int, port: int = 5201) -> int:
        """Send nbytes over one TCP connection from pod src to pod dst and close it
        gracefully both ways (unlike iperf3, whose server may reset while data is still
        in flight). Returns the bytes the receiver read."""
        server = subprocess.Popen(
            self.in_pod(dst, f"/usr/bin/python3 -c \"{_SINK.format(port=port)}\""),
            shell=True, stdout=subprocess.PIPE, text=True)
        try:
            assert server.stdout.readline().strip() == "ready"
            code = _SOURCE.format(ip=self.pods[dst].ipv4, port=port, n=nbytes)
            sh(self.in_pod(src, f"/usr/bin/python3 -c \"{code}\""))
            return int(server.communicate(timeout=30)[0])
        finally:
            if server.poll() is None:
                server.kill()

    def link_stats(self, ifname: str) -> dict[str, int]:
        """rx/tx packets and bytes of an interface in the node namespace."""
        base = f"/sys/class/net/{ifname}/statistics"
        out = sh(
            self.exec(
                f"sh -c 'cat {base}/rx_packets {base}/rx_bytes {base}/tx_packets {base}/tx_bytes'"
            )
        ).stdout.split()
        return dict(zip(("rx_packets", "rx_bytes", "tx_packets", "tx_bytes"), map(int, out)))


def up(prefix: str, count: int = 2, subnet: int = 99, layout: str = "routed") -> Node:
    """layout: "routed" (Calico-style /32 routes per veth) or "bridged" (one bridge
    holding every pod veth, pods in one subnet: flannel and the bridge plugin)."""
    down(prefix)
    node = Node(prefix, subnet=subnet)
    if layout == "bridged":
        return _up_bridged(node, count)
    ns = node.netns
    sh(f"ip netns add {ns}")
    sh(f"ip -n {ns} link set lo up")
    sh(f"ip -n {ns} addr add 169.254.1.1/32 dev lo")  # the pods' gateway, answered by ARP
    sh(f"ip netns exec {ns} sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1")
    for i in range(count):
        v6 = str(ipaddress.ip_address(f"fd00:{subnet}:{i}::2"))
        node.pods.append(
            add_pod(node, Pod(f"{prefix}-pod{i}", f"{prefix}v{i}"[:15], f"10.{subnet}.{i}.2", v6))
        )
    # wait for IPv6 link-local addresses to leave the tentative state
    for pod in node.pods:
        sh(f"ip netns exec {pod.netns} ping -6 -c 1 -W 2 -w 5 fe80::1%eth0", check=False)
    return node


def batch(netns: str, commands: list[str]) -> None:
    """Several ip commands in one process (`ip -batch`), inside netns."""
    r = subprocess.run(
        ["ip", "-n", netns, "-batch", "-"],
        input="\n".join(commands) + "\n",
        capture_output=True,
        text=True,
    )
    if r.returncode:
        raise subprocess.CalledProcessError(
            r.returncode, f"ip -n {netns} -batch", r.stdout, r.stderr
        )


def add_pod(node: Node, pod: Pod, wait: bool = False) -> Pod:
    """One pod: its namespace, the veth pair, addresses and routes, in the node's layout."""
    if node.bridge:
        return _add_bridged_pod(node, pod, wait)
    ns, p = node.netns, pod.netns
    sh(f"ip netns add {p}")
    # quiet pods: no router solicitations or RA handling, so every frame is the test's
    sh(
        f"ip netns exec {p} sysctl -qw net.ipv6.conf.default.router_solicitations=0 "
        "net.ipv6.conf.default.accept_ra=0 net.ipv6.conf.all.accept_ra=0"
    )
    sh(f"ip link add {pod.host_if} netns {ns} type veth peer name eth0 netns {p}")
    sh(f"ip netns exec {ns} sysctl -qw net.ipv4.conf.{pod.host_if}.proxy_arp=1")
    batch(
        ns,
        [
            f"link set {pod.host_if} up",
            f"addr add fe80::1/64 dev {pod.host_if} nodad",
            f"route add {pod.ipv4}/32 dev {pod.host_if}",
            f"route add {pod.ipv6}/128 dev {pod.host_if}",
        ],
    )
    batch(
        p,
        [
            "link set lo up",
            "link set eth0 up",
            f"addr add {pod.ipv4}/32 dev eth0",
            f"addr add {pod.ipv6}/128 dev eth0 nodad",
            "route add 169.254.1.1 dev eth0 scope link",
            "route add default via 169.254.1.1 dev eth0",
            "route add default via fe80::1 dev eth0",
        ],
    )
    if wait:
        sh(f"ip netns exec {p} ping -6 -c 1 -W 2 -w 5 fe80::1%eth0", check=False)
    return pod


def _up_bridged(node: Node, count: int) -> Node:
    ns, sub = node.netns, node.subnet
    node.bridge = f"{node.prefix}br"[:15]
    sh(f"ip netns add {ns}")
    sh(f"ip -n {ns} link set lo up")
    sh(f"ip netns exec {ns} sysctl -qw net.ipv6.conf.all.forwarding=1")
    sh(f"ip -n {ns} link add {node.bridge} type bridge")
    sh(f"ip -n {ns} addr add 10.{sub}.0.1/24 dev {node.bridge}")
    sh(f"ip -n {ns} addr add fd00:{sub}::1/64 dev {node.bridge} nodad")
    sh(f"ip -n {ns} link set {node.bridge} up")
    for i in range(count):
        pod = Pod(
            f"{node.prefix}-pod{i}",
            f"{node.prefix}v{i}"[:15],
            f"10.{sub}.0.{i + 2}",
            f"fd00:{sub}::{i + 2}",
        )
        node.pods.append(_add_bridged_pod(node, pod))
    for pod in node.pods:
        sh(f"ip netns exec {pod.netns} ping -6 -c 1 -W 2 -w 5 fd00:{sub}::1", check=False)
    return node


def _add_bridged_pod(node: Node, pod: Pod, wait: bool = False) -> Pod:
    ns, p, sub = node.netns, pod.netns, node.subnet
    sh(f"ip netns add {p}")
    sh(f"ip -n {p} link set lo up")
    sh(
        f"ip netns exec {p} sysctl -qw net.ipv6.conf.default.router_solicitations=0 "
        "net.ipv6.conf.default.accept_ra=0 net.ipv6.conf.all.accept_ra=0"
    )
    sh(f"ip link add {pod.host_if} netns {ns} type veth peer name eth0 netns {p}")
    sh(f"ip -n {ns} link set {pod.host_if} master {node.bridge} up")
    sh(f"ip -n {p} link set eth0 up")
    sh(f"ip -n {p} addr add {pod.ipv4}/24 dev eth0")
    sh(f"ip -n {p} addr add {pod.ipv6}/64 dev eth0 nodad")
    sh(f"ip -n {p} route add default via 10.{sub}.0.1 dev eth0")
    sh(f"ip -n {p} -6 route add default via fd00:{sub}::1 dev eth0")
    if wait:
        sh(f"ip netns exec {p} ping -6 -c 1 -W 2 -w 5 fd00:{sub}::1", check=False)
    return pod


def down(prefix: str) -> None:
    """Kill what runs inside, then delete the namespaces (the veths go with them)."""
    for name in sh("ip netns list", check=False).stdout.split("\n"):
        name = name.split(" ")[0]
        if name == f"{prefix}-node" or name.startswith(f"{prefix}-pod"):
            pids = sh(f"ip netns pids {name}", check=False).stdout.split()
            if pids:
                sh(f"kill -9 {' '.join(pids)}", check=False)
            sh(f"ip netns del {name}", check=False)


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "up":
        n = up(sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 2)
        for pod in n.pods:
            print(pod)
    elif len(sys.argv) == 3 and sys.argv[1] == "down":
        down(sys.argv[2])
    else:
        sys.exit(__doc__)
