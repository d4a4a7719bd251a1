"""VPP's interfaces, and which of them is a pod's.

Contiv-VPP gives each pod a tap v2 tagged "vpp-tap-<sandbox id>" and a static
neighbour entry for the pod's IP on it; Calico/VPP gives each pod a "tun" with a
route to the pod's IP in table 0. A pod is resolved by its IPs through the route
(VPP 20.05+) or the static neighbour (19.08), and the interface is confirmed by
the interface dump: it must exist and look like a pod interface.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from vpp_plugin.connection import Connection, Refused, VppError

ALL = 0xFFFFFFFF
NEIGHBOR_STATIC = 0x1
NOT_PODS = ("host-", "main-", "tap-vpp2")  # Calico's host tap and uplink, Contiv's interconnect


@dataclass(frozen=True)
class Interface:
    sw_if_index: int
    name: str
    tag: str

    @property
    def l3(self) -> bool:
        """Calico's tun carries no Ethernet header: the ip4/ip6 flowprobe variants."""
        return self.name.startswith("tun")

    @property
    def pod_like(self) -> bool:
        return self.tag.startswith("vpp-tap-") or (
            self.name.startswith(("tun", "tap")) and not self.tag.startswith(NOT_PODS))


def _text(value) -> str:
    return (value.split(b"\0")[0].decode(errors="replace") if isinstance(value, bytes)
            else str(value))


class VppInterfaces:
    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.by_index: dict[int, Interface] = {}
        self.ipv6: set[int] = set()  # resolved through an IPv6 address only
        self._neighbors: dict[str, int] | None = None

    def scan(self) -> dict[int, str]:
        """sw_if_index -> name of every interface VPP has now."""
        self.by_index = {d.sw_if_index: Interface(d.sw_if_index, _text(d.interface_name),
                                                  _text(d.tag))
                         for d in self.conn.dump("sw_interface_dump", sw_if_index=ALL,
                                                 name_filter_valid=False, name_filter="")}
        self._neighbors = None
        self.ipv6 &= set(self.by_index)  # an index VPP freed may come back as another pod's
        return {i: itf.name for i, itf in self.by_index.items()}

    def tagged(self, tag: str) -> Interface | None:
        return next((i for i in self.by_index.values() if i.tag == tag), None)

    def resolve(self, ips: tuple[str, ...]) -> int | None:
        """The pod interface behind any of the pod's IPs, or None (not there yet, or
        VPP unreachable: the dataplane reports that, once, and resolving is tried
        again at the next poll)."""
        if not self.conn.connected:
            return None
        try:
            return self._resolve(ips)
        except Refused:
            raise
        except VppError:  # the connection was lost meanwhile
            return None

    def _resolve(self, ips: tuple[str, ...]) -> int | None:
        for ip in ips:
            index = self._by_route(ip) if self.conn.has("ip_route_lookup") else None
            if index is None:
                index = self._by_neighbor(ip)
            itf = self.by_index.get(index) if index is not None else None
            if itf is not None and itf.pod_like:
                if ipaddress.ip_address(ip).version == 6 and not any(
                        ipaddress.ip_address(a).version == 4 for a in ips):
                    self.ipv6.add(itf.sw_if_index)
                return itf.sw_if_index
        return None

    def _by_route(self, ip: str) -> int | None:
        prefix = ipaddress.ip_network(ip)
        table = 0
        for _ in range(2):  # a route into a pod VRF (memif, VCL pods) is looked up there
            try:
                r = self.conn.call("ip_route_lookup", table_id=table, exact=1, prefix=prefix)
            except Refused:
                return None
            if not r.route.n_paths:
                return None
            path = r.route.paths[0]
            if path.sw_if_index != ALL:
                return path.sw_if_index
            table = path.table_id
        return None

    def _by_neighbor(self, ip: str) -> int | None:
        if self._neighbors is None:
            self._neighbors = {}
            for v6 in (0, 1):
                family = {"is_ipv6": v6} if self.conn.v1908 else {"af": v6}
                for d in self.conn.dump("ip_neighbor_dump", sw_if_index=ALL, **family):
                    n = d.neighbor
                    if int(n.flags) & NEIGHBOR_STATIC:
                        self._neighbors[str(n.ip_address)] = n.sw_if_index
        return self._neighbors.get(str(ipaddress.ip_address(ip)))
