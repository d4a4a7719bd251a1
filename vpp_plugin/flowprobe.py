"""What cniflow asks of VPP: the IPFIX exporter aimed at the agent, flowprobe's
parameters, and flowprobe on each metered pod interface.

Per release (shared/reference/vpp.md 1.5):
- 22.06+: flowprobe_set_params, flowprobe_interface_add_del in both directions,
  and flowprobe_interface_dump to read the state back;
- 19.08 to 22.02: flowprobe_params and flowprobe_tx_interface_add_del, whose
  `which` is VPP's raw variant number (0 ip4, 1 ip6, 2 l2) whatever the declared
  flags say, transmit direction only; no read-back, so the agent keeps its own
  record and re-applies it when VPP restarts.
Every address is given explicitly: vpp-papi's zero defaults are refusals (path
MTU 0) or traps (port 0).
"""

from __future__ import annotations

import ipaddress
import logging
import math
import re
import socket
from dataclasses import dataclass

from vpp_plugin.connection import Connection, Refused, VppError
from vpp_plugin.interfaces import VppInterfaces

log = logging.getLogger(__name__)

ALL = 0xFFFFFFFF
IP4, IP6, L2 = 0, 1, 2
TX, BOTH = 1, 2
RECORD_L3, RECORD_L4 = 0x2, 0x4
HOST_TAP = re.compile(r"^host-tap-(.+)-ip4$")
CALICO_TAP_ADDRESS = "169.254.0.1"


@dataclass(frozen=True)
class Target:
    """Where flowprobe's IPFIX goes: the agent's mediation listener."""

    collector: str
    source: str
    vrf: int
    port: int
    path_mtu: int
    template_interval: int


def host_ipv4(ifname: str) -> str | None:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        for a in ipr.get_addr(family=socket.AF_INET, label=ifname):
            return a.get_attr("IFA_ADDRESS")
    return None


def discover(conn: Connection, interfaces: VppInterfaces, cfg) -> Target:
    """Settings win; what is not set is read from VPP and the host (reference 7.7)."""
    collector, source, vrf = cfg.vpp_collector_address, cfg.vpp_source_address, cfg.vpp_vrf
    tables = conn.dump("ip_table_dump")
    host_tap = None
    for t in tables:
        table_id, is_ip6, name = ((t.table.table_id, t.table.is_ip6, t.table.name)
                                  if hasattr(t, "table") else (t.table_id, t.is_ip6, t.name))
        name = name.split(b"\0")[0].decode() if isinstance(name, bytes) else name
        m = HOST_TAP.match(name)
        if m and not is_ip6:
            host_tap = (table_id, m.group(1))
    if host_tap is not None:  # Calico/VPP: the host tap's own VRF reaches the node IP
        vrf = host_tap[0] if vrf < 0 else vrf
        collector = collector or host_ipv4(host_tap[1]) or ""
        source = source or CALICO_TAP_ADDRESS
    else:  # Contiv-VPP: the VPP-host interconnect, in table 0
        vrf = 0 if vrf < 0 else vrf
        collector = collector or host_ipv4(cfg.vpp_host_interface) or ""
        if not source:
            tap = interfaces.tagged("tap-vpp2")
            if tap is not None:
                for d in conn.dump("ip_address_dump", sw_if_index=tap.sw_if_index,
                                   is_ipv6=0 if conn.v1908 else False):
                    source = _prefix_ip(d.prefix)
                    break
    if not collector or not source:
        raise VppError("cannot tell where VPP should send IPFIX: set --vpp-collector-address "
                       "and --vpp-source-address")
    port = cfg.vpp_port
    if port != 4739 and conn.version[:5] < "21.06":  # VPP-1859: data ignores the port
        log.warning("VPP before 21.06 sends flowprobe data to port 4739 whatever is set: "
                    "using 4739", extra={"version": conn.version, "asked": port})
        port = 4739
    return Target(collector, source, vrf, port, cfg.vpp_path_mtu, cfg.vpp_template_interval)


def _address(value) -> str:
    """An exporter address as vpp-papi unpacks it: 19.08's raw 16 bytes (IPv4 first),
    or an address."""
    if isinstance(value, bytes):
        return str(ipaddress.ip_address(value[:4]))
    return str(value)


def _prefix_ip(prefix) -> str:
    """ip_address_details.prefix (an address_with_prefix) as vpp-papi unpacks it."""
    return str(prefix.ip if hasattr(prefix, "ip") else prefix.address)


class Flowprobe:
    def __init__(self, conn: Connection, active_s: float, idle_s: float) -> None:
        self.conn = conn
        # VPP exports a running flow's delta every active_timer seconds; at most the
        # agent's idle timeout, or the agent would end flows VPP still sees.
        self.active = max(1, int(min(active_s, idle_s)))
        # flowprobe_walker_process (node.c) deletes an entry quiet for (u64)(0.9 x
        # passive) and exports it first only if its active timer passed since its last
        # export: a passive timer under (active + 1) / 0.9 can lose a flow's last packets.
        self.passive = max(math.ceil((self.active + 1) / 0.9), int(max(active_s, idle_s)))
        self.ours: dict[int, int] = {}  # sw_if_index -> variant enabled by this agent
        self.target: Target | None = None

    @property
    def modern(self) -> bool:
        return self.conn.has("flowprobe_interface_add_del")

    def configure(self, target: Target) -> None:
        """Exporter 0 and the record parameters (before any interface is enabled)."""
        c = self.conn
        v19 = c.v1908
        addr = ((lambda a: ipaddress.ip_address(a).packed.ljust(16, b"\0")) if v19
                else ipaddress.ip_address)
        c.call("set_ipfix_exporter", collector_address=addr(target.collector),
               collector_port=target.port, src_address=addr(target.source), vrf_id=target.vrf,
               path_mtu=target.path_mtu, template_interval=target.template_interval,
               udp_checksum=1 if v19 else True)
        self.target = target
        flags = RECORD_L3 | RECORD_L4
        try:
            if self.modern:
                p = c.call("flowprobe_get_params")
                if (int(p.record_flags), p.active_timer, p.passive_timer) != (
                        flags, self.active, self.passive):
                    c.call("flowprobe_set_params", record_flags=flags, active_timer=self.active,
                           passive_timer=self.passive)
            elif v19:
                c.call("flowprobe_params", record_l2=0, record_l3=1, record_l4=1,
                       active_timer=self.active, passive_timer=self.passive)
            else:
                c.call("flowprobe_params", record_flags=flags, active_timer=self.active,
                       passive_timer=self.passive)
        except Refused as e:
            if e.retval not in (-1, -126):
                raise
            # VPP refuses parameter changes while any interface is metered (it kept
            # its state across an agent restart): what is in force stays in force.
            log.warning("flowprobe parameters kept: interfaces are already metered",
                        extra={"err": str(e)})

    def in_force(self) -> bool:
        """Is exporter 0 still the one configure() set? A VPP that restarted has
        forgotten it, even one that came back with the same pid (in its container)."""
        t = self.target
        if t is None:
            return False
        for d in self.conn.dump("ipfix_exporter_dump"):
            return (_address(d.collector_address), d.collector_port, _address(d.src_address),
                    d.vrf_id) == (t.collector, t.port, t.source, t.vrf)
        return False

    def enabled(self) -> dict[int, int] | None:
        """What VPP says is metered (22.06+), or None where it cannot tell."""
        if not self.modern:
            return None
        return {d.sw_if_index: int(d.which)
                for d in self.conn.dump("flowprobe_interface_dump", sw_if_index=ALL)}

    def reconcile(self, want: dict[int, int]) -> list[str]:
        """Enable flowprobe where wanted, disable it where this agent enabled it and it
        is wanted no more. Returns the failures (one per interface); the rest goes on."""
        actual = self.enabled()
        if actual is not None:  # read back: trust VPP over our record
            self.ours = {i: v for i, v in self.ours.items() if i in actual}
        failures = []
        for index, variant in want.items():
            present = (actual if actual is not None else self.ours).get(index)
            if present == variant:
                self.ours[index] = variant
                continue
            try:
                if present is not None:
                    self._set(False, present, index)
                self._set(True, variant, index)
                self.ours[index] = variant
            except Refused as e:
                failures.append(str(e))
        for index in [i for i in self.ours if i not in want]:
            try:
                self._set(False, self.ours[index], index)
            except Refused as e:
                if e.retval not in (-6, -2):  # already off, or the interface is gone
                    failures.append(str(e))
                    continue
            del self.ours[index]
        return failures

    def disable_all(self) -> None:
        for index, variant in list(self.ours.items()):
            try:
                self._set(False, variant, index)
            except VppError as e:
                log.warning("flowprobe not disabled", extra={"sw_if_index": index, "err": str(e)})
        self.ours.clear()

    def _set(self, add: bool, variant: int, index: int) -> None:
        if self.modern:
            self.conn.call("flowprobe_interface_add_del", is_add=add, which=variant,
                           direction=BOTH, sw_if_index=index)
        else:  # the raw variant number: the declared flag values select the wrong one
            self.conn.call("flowprobe_tx_interface_add_del",
                           is_add=int(add) if self.conn.v1908 else add, which=variant,
                           sw_if_index=index)
