"""Resolve a pod's host-side interface from what the node already knows.

- routed CNIs (Calico cali*, Cilium lxc*): the route to the pod's address
  leaves through its veth;
- bridged CNIs (flannel, the bridge plugin): the route leaves through the
  bridge; the bridge's neighbour entry gives the pod's MAC and the FDB entry for
  that MAC gives the bridge port, the veth;
- fallback: the network namespaces under /run/netns, for the interface holding
  the pod's address, whose veth peer index is the host side.
"""

from __future__ import annotations

import logging
import os
import socket

from pyroute2 import IPRoute, NetNS
from pyroute2.netlink.exceptions import NetlinkError

from agent.interfaces import driver

log = logging.getLogger(__name__)

NETNS_DIRS = ("/run/netns", "/var/run/netns")
AF_BRIDGE = 7


class Resolver:
    def __init__(self, ipr: IPRoute) -> None:
        self.ipr = ipr

    def resolve(self, ips: tuple[str, ...]) -> int | None:
        for ip in ips:
            ifindex = self._by_route(ip)
            if ifindex:
                return ifindex
        return self._by_netns(ips)

    def _peer(self, ifindex: int) -> int:
        """A veth's peer index (the last resort's path only: see agent.interfaces)."""
        try:
            return self.ipr.get_links(ifindex)[0].get_attr("IFLA_LINK") or 0
        except (NetlinkError, IndexError):
            return 0

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
        return oif if kind == "veth" else None

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
        wanted = set(ips)
        for d in NETNS_DIRS:
            if not os.path.isdir(d):
                continue
            for name in os.listdir(d):
                try:
                    with NetNS(name) as ns:
                        for addr in ns.get_addr():
                            if addr.get_attr("IFA_ADDRESS") not in wanted:
                                continue
                            link = ns.get_links(addr["index"])[0]
                            peer = link.get_attr("IFLA_LINK")
                            # ifindexes are per namespace: the pair must point at each other
                            if peer and driver(peer) == "veth" and self._peer(peer) == addr[
                                    "index"]:
                                return peer
                except Exception as e:  # a namespace that vanished or is not ours to read
                    log.debug("netns scan", extra={"netns": name, "err": str(e)})
            break
        return None
