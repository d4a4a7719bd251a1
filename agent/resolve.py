"""Resolve a pod's host-side interface from what the node already knows.

- routed CNIs (Calico cali*, Cilium with per-endpoint routes): the route to the
  pod's address leaves through its veth (a veth whose peer is in another namespace:
  Cilium's cilium_host, whose peer cilium_net is on the node, is no pod's);
- bridged CNIs (flannel, the bridge plugin): the route leaves through the
  bridge; the bridge's neighbour entry gives the pod's MAC and the FDB entry for
  that MAC gives the bridge port, the veth;
- Cilium's default layout (the whole pod CIDR routed through cilium_host, no
  per-pod routes): Cilium's own endpoint map (cilium_lxc, pinned in bpffs) gives
  the lxc interface of each local endpoint address;
- any CNI that gives pods a veth (Open vSwitch ones as well: Antrea, Kube-OVN,
  OVN-Kubernetes): each host-side veth's peer namespace, read by netnsid without
  entering it (agent/peerns.py: CAP_NET_ADMIN, not CAP_SYS_ADMIN), holds the pod's
  address on the veth's peer;
- last resort, where the agent may setns(): the network namespaces (named under
  /run/netns, then those only processes hold, under /proc), for the interface
  holding the pod's address, whose veth peer index is the host side.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import struct
import time

from pyroute2 import IPRoute, NetNS
from pyroute2.netlink.exceptions import NetlinkError

from agent import peerns
from agent.interfaces import driver

log = logging.getLogger(__name__)

NETNS_DIRS = ("/run/netns", "/var/run/netns")
AF_BRIDGE = 7


# Cilium's endpoint map (bpf/lib/eps.h): key {16 octets address, u8 family (1 IPv4,
# 2 IPv6), u8 key, u16 cluster_id}, value {u32 ifindex, u16, u16 lxc_id, u32 flags, ...}
LXC_KEY, LXC_VALUE, LXC_ENTRIES = 20, 48, 65535
ENDPOINT_F_HOST, ENDPOINT_F_ATHOSTNS = 1, 2
NETNS_RESCAN_SECONDS = 10.0  # a namespace's addresses are read again after this
PEER_RESCAN_SECONDS = 2.0  # the peer namespaces' addresses, at most this often (a pod no
# way finds, a netkit or macvlan one, would otherwise have them read every poll)


def iflink(ifindex: int) -> int:
    """A veth's peer index (in the peer's namespace), from sysfs; 0 when unknown."""
    try:
        name = socket.if_indextoname(ifindex)
        with open(f"/sys/class/net/{name}/iflink") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 0


def pod_veth(ifindex: int) -> bool:
    """A veth whose peer is not in this namespace: the host side of a pod's pair. Both
    ends of a pair on the node (Cilium's cilium_host and cilium_net) point at each other."""
    if driver(ifindex) != "veth":
        return False
    peer = iflink(ifindex)
    return not (peer and peer != ifindex and driver(peer) == "veth" and iflink(peer) == ifindex)


def cilium_endpoints(path: str) -> dict[str, int]:
    """Address -> lxc interface of every local endpoint in Cilium's endpoint map (the
    host's own entries skipped); empty where there is no such map."""
    from bpf import syscall

    if not path or not os.path.exists(path):
        return {}
    try:
        fd = syscall.obj_get(path)
    except OSError as e:
        log.debug("cilium endpoint map", extra={"path": path, "err": str(e)})
        return {}
    try:
        entries = syscall.lookup_batch(fd, LXC_KEY, LXC_VALUE, 1024)
    except OSError as e:
        log.warning("reading Cilium's endpoint map failed", extra={"path": path, "err": str(e)})
        return {}
    finally:
        os.close(fd)
    out = {}
    for key, value in entries:
        ifindex, _, _, flags = struct.unpack_from("<IHHI", value)
        if flags & (ENDPOINT_F_HOST | ENDPOINT_F_ATHOSTNS) or not ifindex:
            continue
        family = key[16]
        if family in (1, 2):
            out[str(ipaddress.ip_address(key[:4] if family == 1 else key[:16]))] = ifindex
    return out


class Resolver:
    def __init__(self, ipr: IPRoute, cilium_map: str = "", netns_scan: bool = True) -> None:
        """netns_scan: the last resort may enter pod namespaces (setns needs
        CAP_SYS_ADMIN, which the DaemonSet does not grant: then it is off)."""
        self.ipr = ipr
        self.cilium_map = cilium_map
        self.netns_scan = netns_scan
        self._netns: dict[tuple[int, int], tuple[float, dict[str, int]]] = {}
        self._peers: dict[str, int] = {}  # address -> host-side veth (agent/peerns.py)
        self._peers_at = -PEER_RESCAN_SECONDS

    def resolve(self, ips: tuple[str, ...]) -> int | None:
        for ip in ips:
            ifindex = self._by_route(ip)
            if ifindex:
                return ifindex
        endpoints = cilium_endpoints(self.cilium_map)
        for ip in ips:
            ifindex = endpoints.get(ip)
            if ifindex and pod_veth(ifindex):
                return ifindex
        ifindex = self._by_peer_ns(ips)
        if ifindex:
            return ifindex
        return self._by_netns(ips) if self.netns_scan else None

    def _by_peer_ns(self, ips: tuple[str, ...]) -> int | None:
        """The addresses behind every host-side veth (read again at most every
        PEER_RESCAN_SECONDS when an address is not among them)."""
        now = time.monotonic()
        if not any(ip in self._peers for ip in ips) and \
                now - self._peers_at >= PEER_RESCAN_SECONDS:
            try:
                self._peers = peerns.host_sides()
            except OSError as e:  # a kernel before 4.20, or no CAP_NET_ADMIN
                log.debug("peer namespaces", extra={"err": str(e)})
                self._peers = {}
            self._peers_at = now
        for ip in ips:
            ifindex = self._peers.get(ip)
            if ifindex and pod_veth(ifindex):
                return ifindex
        return None

    def _by_route(self, ip: str) -> int | None:
        try:
            routes = self.ipr.route("get", dst=ip)
        except NetlinkError:
            return None
        if not routes:
            return None
        oif = routes[0].get_attr("RTA_OIF")
        kind = driver(oif) if oif else ""
        if kind == "bridge":
            return self._by_bridge(ip, oif)
        return oif if kind == "veth" and pod_veth(oif) else None

    def _by_bridge(self, ip: str, bridge: int) -> int | None:
        family = socket.AF_INET6 if ":" in ip else socket.AF_INET
        mac = None
        for n in self.ipr.get_neighbours(family=family, ifindex=bridge):
            if n.get_attr("NDA_DST") == ip and n.get_attr("NDA_LLADDR"):
                mac = n.get_attr("NDA_LLADDR")
                break
        if mac is None:
            return None
        for entry in self.ipr.get_neighbours(family=AF_BRIDGE):
            if entry.get_attr("NDA_LLADDR") == mac and entry.get_attr("NDA_MASTER") == bridge:
                return entry["ifindex"]
        return None

    def _by_netns(self, ips: tuple[str, ...]) -> int | None:
        """The last resort: read the addresses of every network namespace (each read
        again after NETNS_RESCAN_SECONDS), the pod's holds its address on the veth
        whose peer is the host side."""
        now = time.monotonic()
        seen = namespaces()
        for key in [k for k in self._netns if k not in seen]:
            del self._netns[key]
        for key, path in seen.items():
            cached = self._netns.get(key)
            if cached is None or now - cached[0] > NETNS_RESCAN_SECONDS:
                self._netns[key] = (now, self._host_sides(path))
        for ip in ips:
            for _, found in self._netns.values():
                if ip in found:
                    return found[ip]
        return None

    def _host_sides(self, path: str) -> dict[str, int]:
        """Address -> host-side veth of every veth in one namespace whose peer is here."""
        out = {}
        try:
            with NetNS(path) as ns:
                for addr in ns.get_addr():
                    link = ns.get_links(addr["index"])[0]
                    peer = link.get_attr("IFLA_LINK")
                    # ifindexes are per namespace: the pair must point at each other
                    if peer and driver(peer) == "veth" and iflink(peer) == addr["index"]:
                        out[addr.get_attr("IFA_ADDRESS")] = peer
        except Exception as e:  # a namespace that vanished or is not ours to read
            log.debug("netns scan", extra={"netns": path, "err": str(e)})
        return out


def namespaces() -> dict[tuple[int, int], str]:
    """(device, inode) -> a path, for every network namespace but this process's: the
    named ones, then those only processes hold (pods of runtimes that name none)."""
    out: dict[tuple[int, int], str] = {}
    paths = [os.path.join(d, n) for d in NETNS_DIRS if os.path.isdir(d)
             for n in sorted(os.listdir(d))]
    paths += [f"/proc/{p}/ns/net" for p in os.listdir("/proc") if p.isdigit()]
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            continue
        out.setdefault((st.st_dev, st.st_ino), path)
    own = os.stat("/proc/thread-self/ns/net")
    out.pop((own.st_dev, own.st_ino), None)
    return out
