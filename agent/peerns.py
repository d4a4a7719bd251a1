"""The addresses behind each host-side veth, read without entering a namespace.

A veth's link message carries its peer's namespace as a netnsid of this namespace
(IFLA_LINK_NETNSID) and its peer's index there (IFLA_LINK); an address dump with
IFA_TARGET_NETNSID (Linux 4.20+, strict checking) lists that namespace's addresses.
That needs CAP_NET_ADMIN, which the agent has for TC, and not the CAP_SYS_ADMIN that
setns() needs and the DaemonSet does not grant: so it resolves the pods of any CNI
that gives them a veth, whatever carries their traffic on the node (routes, a
bridge, Open vSwitch as Antrea, Kube-OVN and OVN-Kubernetes use, eBPF redirects).

Raw netlink (agent/netlink.py's dump), parsed with struct: pyroute2 0.9 leaks native
memory decoding link messages (agent/interfaces.py).
"""

from __future__ import annotations

import ipaddress
import socket
import struct

from agent.netlink import HDR, attrs, dump, request, route_socket

RTM_NEWLINK, RTM_GETLINK, RTM_NEWADDR, RTM_GETADDR = 16, 18, 20, 22
RTM_NEWNSID, RTM_GETNSID, NETNSA_NSID, NETNSA_FD = 88, 90, 1, 3
IFLA_LINK, IFLA_LINKINFO, IFLA_LINK_NETNSID, IFLA_INFO_KIND = 5, 18, 37, 1
IFLA_STATS64, IFLA_TARGET_NETNSID = 23, 46
IFA_ADDRESS, IFA_LOCAL, IFA_TARGET_NETNSID = 1, 2, 10
RT_SCOPE_UNIVERSE = 0
_IFINFO = struct.Struct("=BxHiII")  # ifinfomsg
_IFADDR = struct.Struct("=BBBBI")  # ifaddrmsg


def _values(buf: bytes, start: int, end: int) -> dict[int, bytes]:
    return {k: buf[s:e] for k, (s, e) in attrs(buf, start, end).items()}


def veth_peers(sock: socket.socket) -> dict[int, tuple[int, int]]:
    """host-side ifindex -> (peer's netnsid, peer's ifindex there), for every veth
    whose peer is in another namespace."""
    out = {}
    for mtype, buf, start, end in dump(sock, RTM_GETLINK,
                                       _IFINFO.pack(socket.AF_UNSPEC, 0, 0, 0, 0), "link dump"):
        if mtype != RTM_NEWLINK:
            continue
        _, _, index, _, _ = _IFINFO.unpack_from(buf, start + HDR.size)
        a = _values(buf, start + HDR.size + _IFINFO.size, end)
        info = a.get(IFLA_LINKINFO, b"")
        kind = _values(info, 0, len(info)).get(IFLA_INFO_KIND, b"")
        if kind.rstrip(b"\0") != b"veth" or IFLA_LINK_NETNSID not in a or IFLA_LINK not in a:
            continue
        nsid = struct.unpack("=i", a[IFLA_LINK_NETNSID][:4])[0]
        if nsid >= 0:
            out[index] = (nsid, struct.unpack("=I", a[IFLA_LINK][:4])[0])
    return out


def addresses(sock: socket.socket, nsid: int) -> list[tuple[int, str]]:
    """(ifindex there, address) of the global addresses of namespace `nsid`."""
    out = []
    target = struct.pack("=HHi", 8, IFA_TARGET_NETNSID, nsid)
    for family in (socket.AF_INET, socket.AF_INET6):
        for mtype, buf, start, end in dump(sock, RTM_GETADDR, _IFADDR.pack(
                family, 0, 0, 0, 0) + target, "address dump"):
            if mtype != RTM_NEWADDR:
                continue
            fam, _, _, scope, index = _IFADDR.unpack_from(buf, start + HDR.size)
            a = _values(buf, start + HDR.size + _IFADDR.size, end)
            raw = a.get(IFA_LOCAL) or a.get(IFA_ADDRESS)
            if scope == RT_SCOPE_UNIVERSE and raw:
                out.append((index, str(ipaddress.ip_address(raw))))
    return out


def nsid(sock: socket.socket, fd: int) -> int:
    """This namespace's id for the network namespace `fd` refers to; -1 if it has none
    (none of its veths has a peer here)."""
    body = struct.pack("=Bxxx", socket.AF_UNSPEC) + struct.pack("=HHI", 8, NETNSA_FD, fd)
    mtype, payload = request(sock, RTM_GETNSID, body, "netns id")
    found = _values(payload, 4, len(payload)).get(NETNSA_NSID)
    if mtype != RTM_NEWNSID or found is None:
        return -1
    return struct.unpack("=i", found[:4])[0]


def host_sides() -> dict[str, int]:
    """Address -> host-side veth, for the addresses on every pod veth's peer."""
    with route_socket(strict=True) as s:
        peers = veth_peers(s)
        out: dict[str, int] = {}
        by_ns: dict[int, dict[int, int]] = {}
        for host, (nsid, peer) in peers.items():
            by_ns.setdefault(nsid, {})[peer] = host
        for nsid, hosts in by_ns.items():
            try:
                found = addresses(s, nsid)
            except OSError:  # the namespace went meanwhile
                continue
            for index, addr in found:
                if index in hosts:
                    out[addr] = hosts[index]
        return out


def _packets(sock: socket.socket, nsid: int | None = None) -> dict[int, tuple[int, int]]:
    """ifindex -> (rx_packets, tx_packets) of every link of this namespace, or of
    namespace `nsid`."""
    target = b"" if nsid is None else struct.pack("=HHi", 8, IFLA_TARGET_NETNSID, nsid)
    out = {}
    for mtype, buf, start, end in dump(sock, RTM_GETLINK, _IFINFO.pack(
            socket.AF_UNSPEC, 0, 0, 0, 0) + target, "link dump"):
        if mtype != RTM_NEWLINK:
            continue
        index = _IFINFO.unpack_from(buf, start + HDR.size)[2]
        a = attrs(buf, start + HDR.size + _IFINFO.size, end)
        if IFLA_STATS64 in a:
            out[index] = struct.unpack_from("=QQ", buf, a[IFLA_STATS64][0])
    return out


def past_host_side(ifindexes: set[int]) -> dict[int, int]:
    """host-side veth -> packets its pod's end received that the host side did not
    send (its peer's rx_packets less its own tx_packets): what a CNI delivered into the
    pod with bpf_redirect_peer, past every hook of the host side's egress. A running
    total since the veth was made. The peers are read first, so a packet sent between
    the two readings can only make it smaller, never larger."""
    with route_socket(strict=True) as s:
        peers = {host: peer for host, peer in veth_peers(s).items() if host in ifindexes}
        received: dict[int, int] = {}
        for nsid in {nsid for nsid, _ in peers.values()}:
            try:
                there = _packets(s, nsid)
            except OSError:  # the namespace went meanwhile
                continue
            for host, (ns, peer) in peers.items():
                if ns == nsid and peer in there:
                    received[host] = there[peer][0]
        sent = _packets(s)
    return {host: rx - sent[host][1] for host, rx in received.items() if host in sent}
