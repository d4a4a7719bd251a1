"""A Kubernetes-like node built from network namespaces, for the demo and the tests.

One "node" namespace holds the host-side veths, in one of three layouts:

- "routed", the way Calico does it: each pod has a /32 (and /128), a default route
  through 169.254.1.1 (fe80::1 for IPv6) answered by proxy ARP on its host-side
  veth, and the node routes each pod address to its veth.
- "bridged" (flannel, the bridge plugin): one bridge holds every pod veth, the pods
  share a subnet and the bridge's address is their gateway.
- "cilium", Cilium's default: the veth pair cilium_host/cilium_net, cilium_host
  holding the router IP; the node routes the whole pod CIDR to cilium_host and has
  no per-pod route; host-side veths are named lxc<11 hex>; the endpoint map
  cilium_lxc is pinned in a private bpffs (node.bpffs). Delivery is BPF's: a
  datapath registered in DATAPATHS["cilium"] (tests/cnilab.py) is started by up().

Any layout may add pods whose namespace has no name (held by a process only),
pods with a second, Multus-style interface net1, and a remote host behind the
node. Traffic never leaves namespaces this module created.

    python3 scripts/netlab.py up PREFIX N    # PREFIX-node, PREFIX-pod0..N-1
    python3 scripts/netlab.py down PREFIX
"""

from __future__ import annotations

import ctypes
import hashlib
import ipaddress
import json
import os
import platform
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LAB = Path("/run/cniflow-lab")  # per prefix: bpffs mount, pids of namespace holders


def in_netns(netns: str | None, make):
    """make() run inside netns, from a throwaway thread (setns changes only the
    calling thread; a socket keeps the namespace it was made in)."""
    out: list = []

    def run():
        try:
            if netns:
                libc = ctypes.CDLL(None, use_errno=True)
                with open(f"/run/netns/{netns}") as f:
                    if libc.setns(f.fileno(), 0x40000000) != 0:  # CLONE_NEWNET
                        raise OSError(ctypes.get_errno(), "setns")
            out.append(make())
        except Exception as e:  # reported in the caller's thread
            out.append(e)

    t = threading.Thread(target=run)
    t.start()
    t.join()
    if isinstance(out[0], Exception):
        raise out[0]
    return out[0]


def sh(cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, shell=True, check=check, capture_output=True, text=True)


# Receiver: read to EOF, then close (FIN); prints the byte count.
_SINK = ("import socket;s=socket.create_server(('',{port}),family=socket.AF_INET6,"
         "dualstack_ipv6=True);print('ready',flush=True);"
         "c,_=s.accept();n=0\nwhile (b:=c.recv(1<<16)): n+=len(b)\nc.close();print(n)")
# Sender: all bytes, FIN, then wait for the receiver's FIN.
_SOURCE = ("import socket;c=socket.create_connection(('{ip}',{port}));"
           "c.sendall(bytes({n}));c.shutdown(socket.SHUT_WR);c.recv(1);c.close()")


@dataclass
class Pod:
    netns: str  # for an unnamed pod, the name it had while being built (gone from /run/netns)
    host_if: str  # the veth in the node namespace
    ipv4: str
    ipv6: str
    pid: int = 0  # unnamed pod: the process that alone holds its network namespace
    extra_if: str = ""  # Multus-style net1: its host-side veth in the node namespace
    extra_ips: list[str] = field(default_factory=list)  # net1's addresses (not in podIPs)

    def exec(self, cmd: str) -> str:
        if self.pid:
            return f"nsenter --net=/proc/{self.pid}/ns/net {cmd}"
        return f"ip netns exec {self.netns} {cmd}"


@dataclass
class Node:
    prefix: str
    pods: list[Pod] = field(default_factory=list)
    bridge: str = ""  # bridged layout: the bridge holding the pods' veths
    subnet: int = 99
    layout: str = "routed"
    bpffs: str = ""  # cilium: the node's private bpffs, cilium_lxc under tc/globals
    remote_ip: str = ""  # up(remote=True): the remote host's addresses
    remote_ip6: str = ""
    datapath: Any = None  # the running stand-in of the CNI's BPF datapath, if any

    @property
    def netns(self) -> str:
        return f"{self.prefix}-node"

    @property
    def remote_netns(self) -> str:
        return f"{self.prefix}-remote"

    @property
    def lxc_map(self) -> str:
        return f"{self.bpffs}/tc/globals/cilium_lxc"

    def exec(self, cmd: str) -> str:
        return f"ip netns exec {self.netns} {cmd}"

    def in_pod(self, i: int, cmd: str) -> str:
        return self.pods[i].exec(cmd)

    def in_remote(self, cmd: str) -> str:
        return f"ip netns exec {self.remote_netns} {cmd}"

    def tcp_transfer(self, src: int, dst: int, nbytes: int, port: int = 5201,
                     ipv6: bool = False) -> int:
        """Send nbytes over one TCP connection from pod src to pod dst and close it
        gracefully both ways (unlike iperf3, whose server may reset while data is still
        in flight). Returns the bytes the receiver read."""
        server = subprocess.Popen(
            self.in_pod(dst, f"/usr/bin/python3 -c \"{_SINK.format(port=port)}\""),
            shell=True, stdout=subprocess.PIPE, text=True)
        try:
            assert server.stdout.readline().strip() == "ready"
            ip = self.pods[dst].ipv6 if ipv6 else self.pods[dst].ipv4
            code = _SOURCE.format(ip=ip, port=port, n=nbytes)
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


# Stand-ins of CNI datapaths by layout (tests/cnilab.py registers "cilium"): make(node)
# returns an object with .add(pod) and .close(). up() starts one, add_pod() hands it each
# new pod, down() closes what `running` holds for the prefix.
DATAPATHS: dict[str, Callable[[Node], Any]] = {}
running: dict[str, Any] = {}
_holders: dict[int, subprocess.Popen] = {}


def up(prefix: str, count: int = 2, subnet: int = 99, layout: str = "routed",
       unnamed: Iterable[int] = (), net1: Iterable[int] = (), remote: bool = False,
       datapath: bool = True) -> Node:
    """layout: "routed" (Calico-style /32 routes per veth), "bridged" (one bridge
    holding every pod veth, pods in one subnet: flannel and the bridge plugin) or
    "cilium" (cilium_host, lxc veths, cilium_lxc; see above). unnamed: indexes of pods
    whose namespace has no name (pod.pid holds it); net1: indexes of pods with a second
    interface; remote: a host behind the node (node.remote_ip, node.in_remote);
    datapath: start DATAPATHS[layout] when registered (with False the caller may start
    one itself: cnilab.CiliumDatapath(node))."""
    builders = {"routed": _node_routed, "bridged": _node_bridged, "cilium": _node_cilium}
    if layout not in builders:
        raise ValueError(f"layout {layout!r}: one of {', '.join(builders)}")
    down(prefix)
    node = Node(prefix, subnet=subnet, layout=layout)
    builders[layout](node)
    if remote:
        _add_remote(node)
    if datapath and layout in DATAPATHS:
        node.datapath = running[prefix] = DATAPATHS[layout](node)
    unnamed, net1 = set(unnamed), set(net1)
    for i in range(count):
        node.pods.append(add_pod(node, new_pod(node, i, i in net1), unnamed=i in unnamed))
    if layout == "cilium":
        _settle(node, node.pods)
    else:  # wait for IPv6 addresses to leave the tentative state
        gw = "fe80::1%eth0" if layout == "routed" else f"fd00:{subnet}::1"
        for pod in node.pods:
            sh(pod.exec(f"ping -6 -c 1 -W 2 -w 5 {gw}"), check=False)
    return node


def lxc_name(prefix: str, i: int) -> str:
    """Cilium's host-side veth name: lxc and 11 hex digits (here of the pod's netns name)."""
    return "lxc" + hashlib.sha256(f"{prefix}-pod{i}".encode()).hexdigest()[:11]


def new_pod(node: Node, i: int, net1: bool = False) -> Pod:
    """Pod number i, named and numbered as the node's layout does; net1: with a second,
    Multus-style interface."""
    p, sub = node.prefix, node.subnet
    if node.layout == "routed":
        v6 = str(ipaddress.ip_address(f"fd00:{sub}:{i}::2"))
        pod = Pod(f"{p}-pod{i}", f"{p}v{i}"[:15], f"10.{sub}.{i}.2", v6)
    else:
        host_if = lxc_name(p, i) if node.layout == "cilium" else f"{p}v{i}"[:15]
        pod = Pod(f"{p}-pod{i}", host_if, f"10.{sub}.0.{i + 2}", f"fd00:{sub}::{i + 2}")
    if net1:
        pod.extra_if, pod.extra_ips = f"{p}s{i}"[:15], [f"10.{sub}.100.{i + 2}"]
    return pod


def _node_routed(node: Node) -> None:
    ns = node.netns
    sh(f"ip netns add {ns}")
    sh(f"ip -n {ns} link set lo up")
    sh(f"ip -n {ns} addr add 169.254.1.1/32 dev lo")  # the pods' gateway, answered by ARP
    sh(f"ip netns exec {ns} sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1")


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


def _quiet(netns: str) -> None:
    """No router solicitations or RA handling, so every frame is the test's."""
    sh(
        f"ip netns exec {netns} sysctl -qw net.ipv6.conf.default.router_solicitations=0 "
        "net.ipv6.conf.default.accept_ra=0 net.ipv6.conf.all.accept_ra=0"
    )


def add_pod(node: Node, pod: Pod, wait: bool = False, unnamed: bool = False) -> Pod:
    """One pod: its namespace, the veth pair, addresses and routes, in the node's layout;
    net1 too when pod.extra_if is set. unnamed: once built, the namespace's name is
    deleted and only a process holds it (pod.pid). The caller appends it to node.pods."""
    if node.bridge:
        _add_bridged_pod(node, pod, wait)
    elif node.layout == "cilium":
        _add_cilium_pod(node, pod)
    else:
        _add_routed_pod(node, pod, wait)
    if pod.extra_if:
        _add_net1(node, pod)
    if node.datapath is not None and node.layout != "cilium":  # cilium: before eth0 is up
        node.datapath.add(pod)
    if wait and node.layout == "cilium":
        _settle(node, [pod])
    if unnamed:
        _unname(node, pod)
    return pod


def _add_routed_pod(node: Node, pod: Pod, wait: bool) -> None:
    ns, p = node.netns, pod.netns
    sh(f"ip netns add {p}")
    _quiet(p)
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


def _node_bridged(node: Node) -> None:
    ns, sub = node.netns, node.subnet
    node.bridge = f"{node.prefix}br"[:15]
    sh(f"ip netns add {ns}")
    sh(f"ip -n {ns} link set lo up")
    sh(f"ip netns exec {ns} sysctl -qw net.ipv6.conf.all.forwarding=1")
    sh(f"ip -n {ns} link add {node.bridge} type bridge")
    sh(f"ip -n {ns} addr add 10.{sub}.0.1/24 dev {node.bridge}")
    sh(f"ip -n {ns} addr add fd00:{sub}::1/64 dev {node.bridge} nodad")
    sh(f"ip -n {ns} link set {node.bridge} up")


def _add_bridged_pod(node: Node, pod: Pod, wait: bool = False) -> None:
    ns, p, sub = node.netns, pod.netns, node.subnet
    sh(f"ip netns add {p}")
    sh(f"ip -n {p} link set lo up")
    _quiet(p)
    sh(f"ip link add {pod.host_if} netns {ns} type veth peer name eth0 netns {p}")
    sh(f"ip -n {ns} link set {pod.host_if} master {node.bridge} up")
    sh(f"ip -n {p} link set eth0 up")
    sh(f"ip -n {p} addr add {pod.ipv4}/24 dev eth0")
    sh(f"ip -n {p} addr add {pod.ipv6}/64 dev eth0 nodad")
    sh(f"ip -n {p} route add default via 10.{sub}.0.1 dev eth0")
    sh(f"ip -n {p} -6 route add default via fd00:{sub}::1 dev eth0")
    if wait:
        sh(f"ip netns exec {p} ping -6 -c 1 -W 2 -w 5 fd00:{sub}::1", check=False)


# Cilium: cilium_host/cilium_net and the endpoint map cilium_lxc, as bpf/lib/eps.h has it.
ENDPOINT_F_HOST = 1
_NR_BPF = {"x86_64": 321, "aarch64": 280}[platform.machine()]
_MAP_CREATE, _MAP_UPDATE_ELEM, _MAP_DELETE_ELEM, _OBJ_PIN, _OBJ_GET = 0, 2, 3, 6, 7


def _bpf(cmd: int, fmt: str, *args: Any) -> int:
    attr = ctypes.create_string_buffer(struct.pack(fmt, *args), 128)  # zero-padded bpf_attr
    ret = ctypes.CDLL(None, use_errno=True).syscall(_NR_BPF, cmd, attr, len(attr))
    if ret < 0:
        raise OSError(ctypes.get_errno(), f"bpf({cmd}): {os.strerror(ctypes.get_errno())}")
    return ret


def _node_cilium(node: Node) -> None:
    ns, sub = node.netns, node.subnet
    sh(f"ip netns add {ns}")
    # the node's own IPv6 chatter (DAD, MLD reports) over within milliseconds of a link
    # coming up, not seconds: the datapath counts what cilium_host sends
    sh(node.exec("sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1 "
                 "net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.default.rp_filter=0 "
                 "net.ipv6.conf.default.dad_transmits=0 "
                 "net.ipv6.conf.default.router_solicitation_delay=0 "
                 "net.ipv6.conf.default.mldv1_unsolicited_report_interval=10 "
                 "net.ipv6.conf.default.mldv2_unsolicited_report_interval=10"))
    batch(ns, [
        "link set lo up",
        "link add cilium_host type veth peer name cilium_net",
        "link set cilium_host arp off up",
        "link set cilium_net arp off up",
        f"addr add 10.{sub}.0.1/32 dev cilium_host",
        f"addr add fd00:{sub}::1/128 dev cilium_host nodad",
        f"route add 10.{sub}.0.1/32 dev cilium_host scope link",
        f"route add 10.{sub}.0.0/24 via 10.{sub}.0.1 dev cilium_host src 10.{sub}.0.1",
        f"route add fd00:{sub}::/64 dev cilium_host",
    ])
    node.bpffs = str(LAB / node.prefix / "bpffs")
    os.makedirs(node.bpffs, exist_ok=True)
    sh(f"mount -t bpf bpf {node.bpffs}")
    os.makedirs(os.path.dirname(node.lxc_map))
    # struct endpoint_key (20 bytes) -> struct endpoint_info (48), BPF_F_NO_PREALLOC
    fd = _bpf(_MAP_CREATE, "<7I16s", 1, 20, 48, 65535, 1, 0, 0, b"cilium_lxc")
    try:
        path = ctypes.create_string_buffer(node.lxc_map.encode())
        _bpf(_OBJ_PIN, "<QII", ctypes.addressof(path), fd, 0)
    finally:
        os.close(fd)
    _, mac = link_info(ns, "cilium_host")
    for ip in (f"10.{sub}.0.1", f"fd00:{sub}::1"):
        lxc_update(node, ip, 0, 0, mac, mac, flags=ENDPOINT_F_HOST, sec_id=1)


def link_info(netns: str, ifname: str) -> tuple[int, str]:
    """(ifindex, MAC) of an interface in a named namespace."""
    (link,) = json.loads(sh(f"ip -n {netns} -j link show dev {ifname}").stdout)
    return link["ifindex"], link["address"]


def _endpoint_key(ip: str) -> ctypes.Array:
    a = ipaddress.ip_address(ip)  # u8 ip[16]; u8 family (1 v4, 2 v6); u8 key; u16 cluster_id
    return ctypes.create_string_buffer(
        a.packed.ljust(16, b"\0") + struct.pack("<BBH", 1 if a.version == 4 else 2, 0, 0), 20)


def lxc_update(node: Node, ip: str, ifindex: int, lxc_id: int, mac: str, node_mac: str,
               flags: int = 0, sec_id: int = 0) -> None:
    """One cilium_lxc entry: the endpoint at ip (mac) behind the lxc veth ifindex (node_mac)."""
    def mac64(m: str) -> int:
        return int.from_bytes(bytes.fromhex(m.replace(":", "")) + b"\0\0", "little")

    key = _endpoint_key(ip)
    value = ctypes.create_string_buffer(struct.pack(
        "<IHHI4xQQII8x", ifindex, 0, lxc_id, flags, mac64(mac), mac64(node_mac), sec_id, 0), 48)
    fd = _map_fd(node)
    try:
        _bpf(_MAP_UPDATE_ELEM, "<IIQQQ", fd, 0, ctypes.addressof(key), ctypes.addressof(value), 0)
    finally:
        os.close(fd)


def lxc_delete(node: Node, ip: str) -> None:
    key, fd = _endpoint_key(ip), _map_fd(node)
    try:
        _bpf(_MAP_DELETE_ELEM, "<IIQQQ", fd, 0, ctypes.addressof(key), 0, 0)
    finally:
        os.close(fd)


def _map_fd(node: Node) -> int:
    path = ctypes.create_string_buffer(node.lxc_map.encode())
    return _bpf(_OBJ_GET, "<QII", ctypes.addressof(path), 0, 0)


def _add_cilium_pod(node: Node, pod: Pod) -> None:
    """Cilium's pod: /32 and /128, the router IP as gateway behind a /32 (/128) link
    route. Cilium answers the pod's ARP and NDP for it in BPF; here the pod has
    permanent neighbours with the lxc's MAC, and eth0 is NOARP: no ARP, NDP, DAD or
    MLD, so every packet on the lxc's ingress is the test's. The datapath is on the
    lxc before eth0 comes up."""
    ns, p, sub = node.netns, pod.netns, node.subnet
    sh(f"ip netns add {p}")
    _quiet(p)
    sh(f"ip link add {pod.host_if} netns {ns} type veth peer name eth0 netns {p}")
    sh(f"ip -n {ns} link set {pod.host_if} up")
    ifindex, lxc_mac = link_info(ns, pod.host_if)
    _, pod_mac = link_info(p, "eth0")
    if node.datapath is not None:
        node.datapath.add(pod)
    batch(p, [
        "link set lo up",
        "link set eth0 arp off up",
        f"addr add {pod.ipv4}/32 dev eth0",
        f"addr add {pod.ipv6}/128 dev eth0 nodad",
        f"route add 10.{sub}.0.1/32 dev eth0 scope link",
        f"route add default via 10.{sub}.0.1 dev eth0",
        f"route add fd00:{sub}::1/128 dev eth0",
        f"route add default via fd00:{sub}::1 dev eth0",
        f"neigh replace 10.{sub}.0.1 lladdr {lxc_mac} dev eth0 nud permanent",
        f"neigh replace fd00:{sub}::1 lladdr {lxc_mac} dev eth0 nud permanent",
    ])
    for ip in (pod.ipv4, pod.ipv6):
        lxc_update(node, ip, ifindex, ifindex, pod_mac, lxc_mac, sec_id=1000 + ifindex)


def _settle(node: Node, pods: list[Pod]) -> None:
    """Wait until the lxcs have their link-local address: the carrier came up (the
    kernel's link watch takes up to a second) and their MLD reports, 10 ms apart, are
    gone: from then on the node sends the pods nothing unasked."""
    for _ in range(300):
        out = sh(f"ip -n {node.netns} -6 -o addr show scope link -tentative").stdout
        if all(f" {p.host_if} " in out for p in pods):
            break
        time.sleep(0.01)
    time.sleep(0.1)


def _add_net1(node: Node, pod: Pod) -> None:
    """Multus-style second interface: net1 in the pod, pod.extra_if on the node, which
    routes each extra address to it; the pod reaches 10.S.100.0/24 through it, no default."""
    ns, p, gw = node.netns, pod.netns, f"10.{node.subnet}.100.1"
    sh(f"ip link add {pod.extra_if} netns {ns} type veth peer name net1 netns {p}")
    sh(node.exec(f"sysctl -qw net.ipv6.conf.{pod.extra_if}.disable_ipv6=1"))
    sh(f"ip netns exec {p} sysctl -qw net.ipv6.conf.net1.disable_ipv6=1")
    batch(ns, [f"link set {pod.extra_if} up", f"addr add {gw}/32 dev {pod.extra_if}"]
          + [f"route add {ip}/32 dev {pod.extra_if} src {gw}" for ip in pod.extra_ips])
    batch(p, ["link set net1 up"] + [f"addr add {ip}/32 dev net1" for ip in pod.extra_ips]
          + [f"route add {gw} dev net1 scope link",
             f"route add 10.{node.subnet}.100.0/24 via {gw} dev net1"])


def _unname(node: Node, pod: Pod) -> None:
    """Leave the pod's namespace to a holder process, as some runtimes do: no name."""
    holder = subprocess.Popen(["ip", "netns", "exec", pod.netns, "sleep", "infinity"],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    _holders[holder.pid] = holder
    lab = LAB / node.prefix
    lab.mkdir(parents=True, exist_ok=True)
    with (lab / "holders").open("a") as f:
        f.write(f"{holder.pid}\n")
    inode = os.stat(f"/run/netns/{pod.netns}").st_ino
    for _ in range(500):
        if os.stat(f"/proc/{holder.pid}/ns/net").st_ino == inode:
            break
        if holder.poll() is not None:
            raise RuntimeError(f"holder of {pod.netns} exited")
        time.sleep(0.01)
    sh(f"ip netns delete {pod.netns}")
    pod.pid = holder.pid


def _add_remote(node: Node) -> None:
    """A host behind the node: namespace PREFIX-remote, veth PREFIXup on the node."""
    ns, r, sub, ifname = node.netns, node.remote_netns, node.subnet, f"{node.prefix}up"[:15]
    sh(f"ip netns add {r}")
    _quiet(r)
    sh(node.exec("sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1"))
    sh(f"ip link add {ifname} netns {ns} type veth peer name eth0 netns {r}")
    # no DAD of the link-local addresses: neighbour discovery works at once
    sh(node.exec(f"sysctl -qw net.ipv6.conf.{ifname}.dad_transmits=0"))
    sh(node.in_remote("sysctl -qw net.ipv6.conf.eth0.dad_transmits=0"))
    batch(ns, [f"link set {ifname} up", f"addr add 10.{sub}.200.1/24 dev {ifname}",
               f"addr add fd00:{sub}:200::1/64 dev {ifname} nodad"])
    node.remote_ip, node.remote_ip6 = f"10.{sub}.200.2", f"fd00:{sub}:200::2"
    batch(r, ["link set lo up", "link set eth0 up",
              f"addr add {node.remote_ip}/24 dev eth0",
              f"addr add {node.remote_ip6}/64 dev eth0 nodad",
              f"route add 10.{sub}.0.0/16 via 10.{sub}.200.1",  # every layout's pod CIDRs
              f"route add fd00:{sub}::/32 via fd00:{sub}:200::1"])
    if node.layout == "cilium":  # a node address: Cilium's host entries hold them all
        _, mac = link_info(ns, ifname)
        for ip in (f"10.{sub}.200.1", f"fd00:{sub}:200::1"):
            lxc_update(node, ip, 0, 0, mac, mac, flags=ENDPOINT_F_HOST, sec_id=1)


def down(prefix: str) -> None:
    """Stop the datapath stand-in, kill what runs inside and the holders of unnamed pods,
    delete the namespaces (the veths go with them), unmount the node's bpffs."""
    datapath = running.pop(prefix, None)
    if datapath is not None:
        datapath.close()
    lab = LAB / prefix
    if (lab / "holders").exists():
        for pid in map(int, (lab / "holders").read_text().split()):
            try:
                if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"sleep"):
                    os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
            if pid in _holders:
                _holders.pop(pid).wait()
    for name in sh("ip netns list", check=False).stdout.split("\n"):
        name = name.split(" ")[0]
        if name in (f"{prefix}-node", f"{prefix}-remote") or name.startswith(f"{prefix}-pod"):
            pids = sh(f"ip netns pids {name}", check=False).stdout.split()
            if pids:
                sh(f"kill -9 {' '.join(pids)}", check=False)
            sh(f"ip netns del {name}", check=False)
            stale = Path("/run/netns") / name  # seen once after a full run: the file left
            if stale.exists() and not os.path.ismount(stale):  # behind, no longer mounted
                stale.unlink(missing_ok=True)
    if lab.exists():
        if os.path.ismount(lab / "bpffs"):
            sh(f"umount {lab / 'bpffs'}")
        shutil.rmtree(lab, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "up":
        n = up(sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 2)
        for pod in n.pods:
            print(pod)
    elif len(sys.argv) == 3 and sys.argv[1] == "down":
        down(sys.argv[2])
    else:
        sys.exit(__doc__)
