"""A VPP simulator for the tests: the binary API on a unix socket, and the
flowprobe dataplane that sends IPFIX.

Built from shared/reference/vpp.md with struct and byte offsets, independently
of vpp-papi and of cniflow's API definitions, so a layout either side gets wrong
shows up as a size or value mismatch. Two releases: "19.08.2" (Contiv-VPP) and
"24.10.0-release" (current, Calico/VPP); "21.06.0-release" stands for the middle
family (current layouts, the old flowprobe messages only).
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

from fakeapi import in_netns

ALL = 0xFFFFFFFF
FRAME = struct.Struct(">QII")
MEMCLNT = [  # ids 1.. in memclnt.api order, the same in every release
    ("memclnt_create", "9c5e1c2f"), ("memclnt_create_reply", "42ec4560"),
    ("memclnt_delete", "7e1c04e3"), ("memclnt_delete_reply", "3d3b6312"),
    ("rx_thread_exit", "c3a3a452"), ("memclnt_rx_thread_suspend", "c3a3a452"),
    ("memclnt_read_timeout", "c3a3a452"), ("rpc_call", "7e8a2c95"),
    ("rpc_call_reply", "e8d4e804"), ("get_first_msg_id", "ebf79a66"),
    ("get_first_msg_id_reply", "7d337472"), ("api_versions", "51077d14"),
    ("api_versions_reply", "5f0d99d6"), ("trace_plugin_msg_ids", "f476d3ce"),
    ("sockclnt_create", "455fb9c4"), ("sockclnt_create_reply", "35166268"),
    ("sockclnt_delete", "8ac76db6"), ("sockclnt_delete_reply", "8f38b1ee"),
    ("sock_init_shm", "51646d92"), ("sock_init_shm_reply", "e8d4e804"),
    ("memclnt_keepalive", "51077d14"), ("memclnt_keepalive_reply", "e8d4e804"),
]
OLD = {  # 19.08.x
    "sockclnt_create": "df2cf94d", "sockclnt_create_reply": "21795657",
    "control_ping": "51077d14", "control_ping_reply": "f6b0b8ca",
    "show_version": "51077d14", "show_version_reply": "c919bde1",
    "sw_interface_dump": "aa610c27", "sw_interface_details": "52a9262e",
    "set_ipfix_exporter": "4ff71dea", "set_ipfix_exporter_reply": "e8d4e804",
    "ipfix_exporter_dump": "51077d14", "ipfix_exporter_details": "742dddee",
    "flowprobe_params": "574adc1c", "flowprobe_params_reply": "e8d4e804",
    "flowprobe_tx_interface_add_del": "10c2fbab",
    "flowprobe_tx_interface_add_del_reply": "e8d4e804",
    "ip_neighbor_dump": "6b7bcd0a", "ip_neighbor_details": "c1a190ed",
    "ip_address_dump": "6b7bcd0a", "ip_address_details": "7002eee7",
    "ip_table_dump": "51077d14", "ip_table_details": "4d251961",
}
MIDDLE = {  # 21.06 - 22.02
    "control_ping": "51077d14", "control_ping_reply": "f6b0b8ca",
    "show_version": "51077d14", "show_version_reply": "c919bde1",
    "sw_interface_dump": "aa610c27", "sw_interface_details": "6c221fc7",
    "set_ipfix_exporter": "5530c8a0", "set_ipfix_exporter_reply": "e8d4e804",
    "ipfix_exporter_dump": "51077d14", "ipfix_exporter_details": "0dedbfe4",
    "flowprobe_params": "baa46c09", "flowprobe_params_reply": "e8d4e804",
    "flowprobe_tx_interface_add_del": "b782c976",
    "flowprobe_tx_interface_add_del_reply": "e8d4e804",
    "ip_neighbor_dump": "d817a484", "ip_neighbor_details": "e29d79f0",
    "ip_address_dump": "2d033de4", "ip_address_details": "ee29b797",
    "ip_route_lookup": "710d6471", "ip_route_lookup_reply": "5d8febcb",
    "ip_table_dump": "51077d14", "ip_table_details": "c79fca0f",
}
CURRENT = {**MIDDLE, "flowprobe_set_params": "baa46c09", "flowprobe_set_params_reply": "e8d4e804",
           "flowprobe_get_params": "51077d14", "flowprobe_get_params_reply": "f350d621",
           "flowprobe_interface_add_del": "3420739c",
           "flowprobe_interface_add_del_reply": "e8d4e804",
           "flowprobe_interface_dump": "f9e6675e", "flowprobe_interface_details": "427d77e0"}
SIZES = {  # request sizes from the reference (current, 19.08)
    "set_ipfix_exporter": (59, 57), "flowprobe_params": (19, 21),
    "flowprobe_set_params": (19, 19), "flowprobe_tx_interface_add_del": (16, 16),
    "flowprobe_interface_add_del": (17, 17), "flowprobe_interface_dump": (14, 14),
    "ip_neighbor_dump": (15, 15), "ip_route_lookup": (33, 33), "ip_address_dump": (15, 15),
    "show_version": (10, 10), "control_ping": (10, 10), "ip_table_dump": (10, 10),
    "ipfix_exporter_dump": (10, 10), "flowprobe_get_params": (10, 10),
}
IP4, IP6, L2 = 0, 1, 2
RX, TX, BOTH = 0, 1, 2


@dataclass
class Interface:
    sw_if_index: int
    name: str
    tag: str = ""
    dev_type: str = "virtio"
    mac: bytes = b"\x02\xfe\0\0\0\0"


@dataclass
class Exporter:
    collector: str = "0.0.0.0"
    port: int = 0
    src: str = "0.0.0.0"
    vrf: int = ALL
    mtu: int = 0
    interval: int = 0


@dataclass
class Entry:
    """A flowprobe flow entry (flowprobe_entry_t): its start is the packet that created
    it, for as long as it lives; the counters are since its last export."""

    start: float
    last_exported: float
    deadline: float  # the passive timer
    end: float = 0.0  # flow_end: the last packet
    last_updated: float = 0.0
    packets: int = 0
    octets: int = 0
    tcp_flags: int = 0


@dataclass
class State:
    """What VPP forgets when it restarts."""

    exporter: Exporter = field(default_factory=Exporter)
    record_flags: int = 0
    active: int = 15
    passive: int = 120
    enabled: dict = field(default_factory=dict)  # sw_if_index -> (variant, direction)
    templates: dict = field(default_factory=dict)  # variant key -> template id
    next_template: int = 256
    sequence: int = 0
    template_sent: float = 0.0
    entries: dict = field(default_factory=dict)  # flow key -> Entry
    buffers: dict = field(default_factory=dict)  # template id -> records not sent yet
    clients: set = field(default_factory=set)  # API registrations (pool indexes) in use


class VppSim:
    def __init__(self, path: str, version: str = "24.10.0-release", netns: str | None = None,
                 crc_override: dict[str, str] | None = None) -> None:
        self.path, self.version, self.netns = path, version, netns
        self.old = version.startswith("19.08")
        self.current = not self.old and version >= "22.06"
        self.crcs = dict(OLD if self.old else CURRENT if self.current else MIDDLE)
        self.crcs.update(crc_override or {})
        self.interfaces: dict[int, Interface] = {0: Interface(0, "local0", dev_type="local")}
        self.neighbors: list[tuple[int, str, bytes, int]] = []  # (sw_if_index, ip, mac, flags)
        self.routes: dict[str, int] = {}  # table 0: pod address -> sw_if_index
        self.tables: dict[tuple[int, bool], str] = {(0, False): "ipv4-VRF:0",
                                                     (0, True): "ipv6-VRF:0"}
        self.addresses: dict[int, list[str]] = {}  # sw_if_index -> ["a.b.c.d/len"]
        self.refuse: dict[str, int] = {}  # message -> retval to answer instead
        self.die_on: str | None = None  # a message VPP dies on, unanswered (a crash)
        self.requests: list[tuple[str, int]] = []  # (name, wire size) as received
        self.state = State()
        self.pid = 1000
        self.boots = 0
        self.build = 0  # message ids follow the build and its plugins
        self._clients: list[socket.socket] = []
        self._lock = threading.RLock()
        self._udp: socket.socket | None = None
        self._listener: socket.socket | None = None
        self.start()

    # -- lifecycle ---------------------------------------------------------------

    def start(self, container: bool = False) -> None:
        """Boot: fresh state, listen. Another VPP process has another pid and, here,
        another build (plugins' message ids move). container: VPP restarting in its
        container, a new PID namespace and the same image: the same pid, the same
        message table and, as registrations restart from pool index 0, the same client
        index. Nothing on the API tells it from the process before, except that it
        has forgotten everything."""
        with self._lock:
            self.boots += 1
            if not container:
                self.pid += 1
                self.build += 1
            self.state = State()
            names = [n for n, _ in MEMCLNT]
            if self.current:
                names += ["control_ping", "control_ping_reply"]
            first = 100 + 7 * self.build  # plugins' ids differ between builds
            self.ids: dict[int, str] = {i + 1: n for i, n in enumerate(names)}
            rest = [n for n in self.crcs if n not in names and not n.startswith("sockclnt")]
            self.ids.update({first + i: n for i, n in enumerate(rest)})
            self.by_name = {n: i for i, n in self.ids.items()}
            if os.path.exists(self.path):
                os.unlink(self.path)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.bind(self.path)
            s.listen(8)
            self._listener = s
        threading.Thread(target=self._accept, args=(s,), daemon=True).start()

    def stop(self) -> None:
        """VPP dies: socket gone, clients cut."""
        with self._lock:
            if self._listener:
                self._listener.close()
                self._listener = None
            for c in self._clients:
                try:
                    c.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                c.close()
            self._clients.clear()
            if os.path.exists(self.path):
                os.unlink(self.path)

    def restart(self, down: float = 1.0, container: bool = False) -> None:
        self.stop()
        time.sleep(down)
        self.start(container)

    # -- topology, as the CNI would build it ---------------------------------------

    def add_interface(self, name: str, tag: str = "", dev_type: str = "virtio") -> int:
        i = max(self.interfaces) + 1
        self.interfaces[i] = Interface(i, name, tag, dev_type, b"\x02\xfe" + i.to_bytes(4, "big"))
        return i

    # -- the wire ---------------------------------------------------------------------

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with self._lock:
                self._clients.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        client = [None]  # this connection's registration, once sockclnt_create is seen
        state = self.state
        try:
            while True:
                head = _read(conn, 16)
                _, length, _ = FRAME.unpack(head)
                body = _read(conn, length)
                for reply in self._handle(body, client):
                    conn.sendall(FRAME.pack(0, len(reply), 0) + reply)
        except (OSError, EOFError):
            pass
        finally:
            conn.close()
            with self._lock:
                state.clients.discard(client[0])

    def _handle(self, body: bytes, client: list | None = None) -> list[bytes]:
        msgid = struct.unpack_from(">H", body)[0]
        if msgid == 15:  # sockclnt_create: fixed id, no client_index
            context = struct.unpack_from(">I", body, 2)[0]
            table = [(i, f"{n}_{self.crcs.get(n) or dict(MEMCLNT)[n]}")
                     for i, n in sorted(self.ids.items())]
            with self._lock:  # the lowest free registration, as VPP's pool reuses them
                used = self.state.clients
                index = next(i for i in range(len(used) + 1) if i not in used)
                used.add(index)
                if client is not None:
                    client[0] = index
            out = struct.pack(">HIIiIH", 16, 0, context, 0, 0x80000000 | index, len(table))
            return [out + b"".join(struct.pack(">H64s", i, n.encode()) for i, n in table)]
        name = self.ids.get(msgid)
        if name is None or len(body) < 10:
            return []  # VPP drops what it does not know
        context = struct.unpack_from(">I", body, 6)[0]
        with self._lock:
            self.requests.append((name, len(body)))
            if name == self.die_on:
                self.die_on = None
                self.stop()  # this client's socket too: the call is never answered
                return []
            if name in self.refuse:
                return [self._reply(name, context, self.refuse[name])]
            handler = getattr(self, "_" + name, None)
            if handler is None:
                return []
            return handler(body[10:], context)

    def _msg(self, name: str, context: int, payload: bytes = b"") -> bytes:
        return struct.pack(">HI", self.by_name[name], context) + payload

    def _reply(self, request: str, context: int, retval: int) -> bytes:
        reply = request + "_reply"
        if request.endswith("_dump"):
            reply = "control_ping_reply"
        return self._msg(reply, context, struct.pack(">i", retval) + (
            struct.pack(">II", 0, self.pid) if reply == "control_ping_reply" else b""))

    # -- handlers -----------------------------------------------------------------------

    def _sockclnt_delete(self, body: bytes, context: int) -> list[bytes]:
        return [self._msg("sockclnt_delete_reply", context, struct.pack(">i", 1))]

    def _control_ping(self, body: bytes, context: int) -> list[bytes]:
        return [self._reply("control_ping", context, 0)]

    def _show_version(self, body: bytes, context: int) -> list[bytes]:
        return [self._msg("show_version_reply", context, struct.pack(
            ">i32s32s32s256s", 0, b"vpe", self.version.encode(), b"2026-01-01", b"/w"))]

    def _sw_interface_dump(self, body: bytes, context: int) -> list[bytes]:
        index, filtered, n = struct.unpack_from(">IBI", body)
        needle = body[9:9 + n].decode().lower()
        out = []
        for i in sorted(self.interfaces):
            itf = self.interfaces[i]
            if index not in (ALL, 0) and i != index:
                continue
            if filtered and (self.old or needle not in itf.name.lower()):
                continue  # 19.08's filter matches nothing
            out.append(self._interface_details(itf, context))
        return out

    def _interface_details(self, itf: Interface, context: int) -> bytes:
        if self.old:
            b = bytearray(230)
            struct.pack_into(">I", b, 6, itf.sw_if_index)
            struct.pack_into(">I", b, 14, 6)
            b[18:24] = itf.mac
            b[102:166] = itf.name.encode().ljust(64, b"\0")
            b[166:230] = itf.tag.encode().ljust(64, b"\0")
        else:
            b = bytearray(295)
            struct.pack_into(">I", b, 6, itf.sw_if_index)
            b[14:20] = itf.mac
            struct.pack_into(">I", b, 20, 3)
            b[103:167] = itf.name.encode().ljust(64, b"\0")
            b[167:231] = itf.dev_type.encode().ljust(64, b"\0")
            b[231:295] = itf.tag.encode().ljust(64, b"\0")
        struct.pack_into(">HI", b, 0, self.by_name["sw_interface_details"], context)
        return bytes(b)

    def _address(self, b: bytes, off: int) -> tuple[ipaddress._BaseAddress, int]:
        """vl_api_address_t at off (the current layout): (address, next offset)."""
        af = b[off]
        raw = b[off + 1:off + 17]
        return (ipaddress.ip_address(raw[:4]) if af == 0 else ipaddress.ip_address(raw)), off + 17

    def _set_ipfix_exporter(self, body: bytes, context: int) -> list[bytes]:
        if self.old:
            collector, src = ipaddress.ip_address(body[:4]), ipaddress.ip_address(body[18:22])
            port, = struct.unpack_from(">H", body, 16)
            vrf, mtu, interval = struct.unpack_from(">III", body, 34)
            if collector.packed == bytes(4) or src.packed == bytes(4):
                return [self._reply("set_ipfix_exporter", context, -7)]
        else:
            collector = ipaddress.ip_address(body[1:5])  # always read as IPv4
            port, = struct.unpack_from(">H", body, 17)
            src, off = self._address(body, 19)
            vrf, mtu, interval = struct.unpack_from(">III", body, off)
            if src.version == 6:
                return [self._reply("set_ipfix_exporter", context, -7)]
            if collector.packed != bytes(4) and src.packed == bytes(4):
                return [self._reply("set_ipfix_exporter", context, -7)]
        port = 4739 if port == 0xFFFF else port
        mtu = 512 if mtu == ALL else mtu
        interval = 20 if interval == ALL else interval
        if not 68 <= mtu <= 1450:
            return [self._reply("set_ipfix_exporter", context, -7)]
        if vrf != ALL and (vrf, False) not in self.tables:
            return [self._reply("set_ipfix_exporter", context, -3)]
        e = self.state.exporter
        new = Exporter(str(collector), port, str(src), vrf, mtu, interval)
        if (e.collector, e.port, e.src) != (new.collector, new.port, new.src):
            self.state.sequence, self.state.template_sent = 0, 0.0  # reports reset
        self.state.exporter = new
        return [self._reply("set_ipfix_exporter", context, 0)]

    def _ipfix_exporter_dump(self, body: bytes, context: int) -> list[bytes]:
        e = self.state.exporter
        c, s = ipaddress.ip_address(e.collector).packed, ipaddress.ip_address(e.src).packed
        if self.old:
            payload = c.ljust(16, b"\0") + struct.pack(">H", e.port) + s.ljust(16, b"\0")
        else:
            payload = b"\0" + c.ljust(16, b"\0") + struct.pack(">H", e.port) + b"\0" + s.ljust(
                16, b"\0")
        payload += struct.pack(">IIIB", e.vrf, e.mtu, e.interval, 0)
        return [self._msg("ipfix_exporter_details", context, payload),
                self._reply("control_ping", context, 0)]

    def _params(self, name: str, flags: int, active: int, passive: int, context: int,
                check_order: bool) -> list[bytes]:
        if self.state.enabled:
            return [self._reply(name, context, -126 if self.current else -1)]
        if check_order and passive not in (0, ALL) and active != ALL and active > passive:
            return [self._reply(name, context, -7)]
        self.state.record_flags = flags
        self.state.active = 15 if active == ALL else active
        self.state.passive = 120 if passive == ALL else passive
        return [self._reply(name, context, 0)]

    def _flowprobe_params(self, body: bytes, context: int) -> list[bytes]:
        if self.old:
            l2, l3, l4, active, passive = struct.unpack_from(">BBBII", body)
            flags = (1 if l2 else 0) | (2 if l3 else 0) | (4 if l4 else 0)
        else:
            flags, active, passive = struct.unpack_from(">BII", body)
        return self._params("flowprobe_params", flags, active, passive, context, False)

    def _flowprobe_set_params(self, body: bytes, context: int) -> list[bytes]:
        flags, active, passive = struct.unpack_from(">BII", body)
        return self._params("flowprobe_set_params", flags, active, passive, context, True)

    def _flowprobe_get_params(self, body: bytes, context: int) -> list[bytes]:
        s = self.state
        return [self._msg("flowprobe_get_params_reply", context,
                          struct.pack(">iBII", 0, s.record_flags, s.active, s.passive))]

    def _flowprobe_tx_interface_add_del(self, body: bytes, context: int) -> list[bytes]:
        is_add, which, index = struct.unpack_from(">BBI", body)
        name = "flowprobe_tx_interface_add_del"
        if index not in self.interfaces:
            return [self._reply(name, context, -2)]
        if self.old and which > 2:
            return [self._reply(name, context, -9)]
        return [self._reply(name, context, self._enable(is_add, which, TX, index, -100))]

    def _flowprobe_interface_add_del(self, body: bytes, context: int) -> list[bytes]:
        is_add, which, direction, index = struct.unpack_from(">BBBI", body)
        name = "flowprobe_interface_add_del"
        if index not in self.interfaces:
            return [self._reply(name, context, -2)]
        if which > 2 or direction > 2:
            return [self._reply(name, context, -7)]
        return [self._reply(name, context, self._enable(is_add, which, direction, index, -116))]

    def _enable(self, is_add: int, which: int, direction: int, index: int, exists: int) -> int:
        s = self.state
        if not s.record_flags:
            return -100
        if is_add:
            if index in s.enabled:
                return exists
            s.enabled[index] = (which, direction)
            return 0
        if index not in s.enabled:
            return -6
        del s.enabled[index]
        return 0

    def _flowprobe_interface_dump(self, body: bytes, context: int) -> list[bytes]:
        index, = struct.unpack_from(">I", body)
        out = [self._msg("flowprobe_interface_details", context, struct.pack(">BBI", w, d, i))
               for i, (w, d) in sorted(self.state.enabled.items()) if index in (ALL, i)]
        return out + [self._reply("control_ping", context, 0)]

    def _ip_neighbor_dump(self, body: bytes, context: int) -> list[bytes]:
        index, af = struct.unpack_from(">IB", body)
        out = []
        for sw, ip, mac, flags in sorted(self.neighbors):
            a = ipaddress.ip_address(ip)
            if (a.version == 6) != bool(af) or index not in (ALL, sw):
                continue
            raw = a.packed.ljust(16, b"\0")
            if self.old:
                payload = struct.pack(">II6sI16s", sw, flags, mac, af, raw)
            else:
                payload = struct.pack("<d", 3.5) + struct.pack(">IB6sB16s", sw, flags, mac, af,
                                                                raw)
            out.append(self._msg("ip_neighbor_details", context, payload))
        return out + [self._reply("control_ping", context, 0)]

    def _ip_address_dump(self, body: bytes, context: int) -> list[bytes]:
        index, v6 = struct.unpack_from(">IB", body)
        out = []
        for prefix in self.addresses.get(index, []):
            p = ipaddress.ip_interface(prefix)
            if (p.version == 6) != bool(v6):
                continue
            raw = p.ip.packed.ljust(16, b"\0")
            af = struct.pack(">I" if self.old else ">B", p.version == 6)
            out.append(self._msg("ip_address_details", context, struct.pack(">I", index) + af
                                 + raw + bytes([p.network.prefixlen])))
        return out + [self._reply("control_ping", context, 0)]

    def _ip_route_lookup(self, body: bytes, context: int) -> list[bytes]:
        table, exact = struct.unpack_from(">IB", body)
        addr, _ = self._address(body, 5)
        length = body[22]
        if (table, addr.version == 6) not in self.tables:
            retval, paths = -3, []
        elif table == 0 and str(addr) in self.routes and length == addr.max_prefixlen:
            retval, paths = 0, [self.routes[str(addr)]]
        else:
            retval, paths = -6, []
        route = struct.pack(">IIB16sBB", table, 0, addr.version == 6,
                            addr.packed.ljust(16, b"\0"), length, len(paths))
        for sw in paths:
            route += (struct.pack(">IIIBBIII", sw, 0, 0, 1, 0, 0, 0, addr.version == 6)
                      + bytes(28) + b"\0" + bytes(112))
        return [self._msg("ip_route_lookup_reply", context, struct.pack(">i", retval) + route)]

    def _ip_table_dump(self, body: bytes, context: int) -> list[bytes]:
        out = [self._msg("ip_table_details", context, struct.pack(">IB64s", t, v6, n.encode()))
               for (t, v6), n in sorted(self.tables.items())]
        return out + [self._reply("control_ping", context, 0)]

    # -- the dataplane: flowprobe's IPFIX ------------------------------------------------
    #
    # As VPP's flowprobe plugin does it (src/plugins/flowprobe/node.c and flowprobe.c,
    # read at 19.08-era, 21.10-era and 22.06-era revisions; the logic below is the same
    # in all of them):
    # - add_to_flow_record_state: one entry per key (interfaces, direction, variant,
    #   addresses, protocol, ports); flowprobe_create sets flow_start to the packet's
    #   timestamp and last_exported to now, and nothing sets flow_start again. Each
    #   packet adds to the counters, sets last_updated and flow_end, ORs the TCP flags,
    #   then exports the entry at once if now > last_exported + active_timer.
    # - flowprobe_export_entry writes flow_start and flow_end as they are and resets
    #   only packetcount, octetcount and last_exported (TCP flags stay OR-ed for the
    #   entry's life). The record goes into a per-variant buffer, sent when the next
    #   record would pass the path MTU, or when flow-report-process (every 5 s) calls
    #   flowprobe's data callback.
    # - flowprobe-timer-process (timer_process in flowprobe.c, in every release read)
    #   interrupts the flowprobe-walker node every 0.1 s; flowprobe_walker_process
    #   spins the per-worker timer wheel (1 s ticks), where flowprobe_create put a
    #   passive timer. When it fires: still active (quiet < 0.9 x passive) -> started
    #   again for what is left; else deleted. Either way the entry is exported first if
    #   it has packets and now > last_exported + active_timer (else what it counted is
    #   lost with it).

    def _udp_socket(self) -> socket.socket:
        e = self.state.exporter
        if self._udp is None or self._udp.getsockname()[0] != e.src:

            def make():
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind((e.src, 4739))  # flowprobe's source port is always 4739
                return s

            self._udp = in_netns(self.netns, make)
        return self._udp

    def template(self, variant: int, v6: bool) -> list[tuple[int, int]]:
        """(element id, length) in flowprobe's order for an interface variant."""
        fields = [(10, 4), (14, 4)] + ([(61, 1)] if not self.old and self.current else []) + [
            (2, 8), (156, 8), (157, 8)]
        flags = self.state.record_flags
        if flags & 1:
            fields += [(56, 6), (80, 6), (256, 2)]
        if flags & 2:
            fields += ([(27, 16), (28, 16)] if v6 else [(8, 4), (12, 4)]) + [(4, 1), (1, 8)]
        if flags & 4:
            fields += [(7, 2), (11, 2), (6, 2)]
        return fields

    def _metering(self) -> bool:
        """fm->disabled: the walker turns flowprobe off while the exporter has no collector
        or source address."""
        e = self.state.exporter
        return e.collector != "0.0.0.0" and e.src != "0.0.0.0"

    def traffic(self, sw_if_index: int, flows: list[dict], direction: int = TX,
                when: float | None = None, flush: bool = True) -> int:
        """Packets of flows on an interface in one direction, all at `when` (default
        now), through flowprobe's packet path: nothing unless flowprobe meters that
        interface in that direction. A flow dict gives its key (src, dst, proto, sport,
        dport), "packets", "octets" and "tcp_flags". Returns the records exported in
        the packet path (an entry whose active timer passed since its last export, at
        its first packet here). flush: send what is buffered at the end, as
        flow-report-process does every 5 s; False keeps it for a later tick() or flush()."""
        with self._lock:
            s = self.state
            enabled = s.enabled.get(sw_if_index)
            if enabled is None or enabled[1] not in (direction, BOTH) or not self._metering():
                return 0
            now = time.time() if when is None else when
            exported = 0
            for f in flows:
                key = (sw_if_index, direction, enabled[0], f["src"], f["dst"], f["proto"],
                       f.get("sport", 0), f.get("dport", 0))
                e = s.entries.get(key)
                if e is None:  # flowprobe_create: flow_start and last_exported are now
                    e = s.entries[key] = Entry(start=now, last_exported=now,
                                               deadline=now + s.passive if s.passive else
                                               float("inf"))
                n, octets = f["packets"], f["octets"]
                for i in range(n):
                    e.packets += 1
                    e.octets += octets * (i + 1) // n - octets * i // n
                    e.tcp_flags |= f.get("tcp_flags", 0)
                    e.last_updated = e.end = now
                    if s.active == 0 or now > e.last_exported + s.active:
                        self._export(key, e, now)
                        exported += 1
            if flush:
                self.flush(now)
            return exported

    def tick(self, now: float | None = None) -> int:
        """flowprobe-timer-process and flowprobe-walker at `now` (default now): entries
        whose passive timer fired are started again or, quiet for 0.9 x passive, deleted,
        exported first when they have packets and their active timer passed. Then
        flow-report-process's flush. Returns the records the walker exported."""
        with self._lock:
            s = self.state
            now = time.time() if now is None else now
            if not self._metering():
                return 0
            exported = 0
            for key, e in list(s.entries.items()):
                if e.deadline > now:
                    continue
                quiet = now - e.last_updated
                if quiet < int(s.passive * 0.9):
                    e.deadline = now + int(s.passive - quiet)  # u64 seconds, as the wheel
                else:
                    del s.entries[key]
                if e.packets and now > e.last_exported + s.active:
                    self._export(key, e, now)
                    exported += 1
            self.flush(now)
            return exported

    def report(self, sw_if_index: int, flows: list[dict], direction: int = TX) -> int:
        """Flows VPP metered a while ago (passive timer + 5 s) and not since: its timer
        process deletes their entries and exports them now. What a test needs when it
        wants one report of each flow without waiting out the passive timer. Returns the
        records sent."""
        with self._lock:
            now = time.time()
            self.traffic(sw_if_index, flows, direction, when=now - self.state.passive - 5,
                         flush=False)
            return self.tick(now)

    def run_timer(self, period: float = 0.1) -> None:
        """tick() every period in a thread of its own, as VPP's timer process does (what
        tests that pass simulated times leave off, to drive it themselves)."""
        stop = self._timer_stop = threading.Event()

        def loop():
            while not stop.wait(period):
                self.tick()

        threading.Thread(target=loop, daemon=True).start()

    def _export(self, key: tuple, e: Entry, now: float) -> None:
        """flowprobe_export_entry: the record into its variant's buffer, counters reset."""
        s = self.state
        sw_if_index, direction, variant, src = key[:4]
        v6 = ":" in src
        tid = s.templates.get((variant, v6))
        if tid is None:
            tid = s.templates[(variant, v6)] = s.next_template
            s.next_template += 1
            s.template_sent = 0.0
        fields = self.template(variant, v6)
        record = self._record(fields, key, e)
        buf = s.buffers.setdefault(tid, [])
        buf.append(record)
        e.packets = e.octets = 0
        e.last_exported = now
        if (len(buf) + 1) * len(record) > s.exporter.mtu - 20 - 8 - 16 - 4:
            self._send_data(tid, now)

    def flush(self, now: float | None = None) -> None:
        """flow-report-process: templates when due, then every buffered record."""
        with self._lock:
            now = time.time() if now is None else now
            if not self.state.buffers:
                return
            self._send_templates(now)
            for tid in list(self.state.buffers):
                self._send_data(tid, now)

    def _send_data(self, tid: int, now: float) -> None:
        records = self.state.buffers.pop(tid, [])
        if records:
            self._send_templates(now)
            body = b"".join(records)
            self.state.sequence += 1  # flowprobe: one per data packet
            self._send(struct.pack(">HH", tid, 4 + len(body)) + body, now, data=True)

    def _record(self, fields, key: tuple, e: Entry) -> bytes:
        sw_if_index, direction, _, src, dst, proto, sport, dport = key
        ingress, egress = (sw_if_index, 1) if direction == RX else (1, sw_if_index)
        values = {10: ingress, 14: egress, 61: direction, 2: e.packets,
                  156: _vpp_time(e.start), 157: _vpp_time(e.end), 4: proto, 1: e.octets,
                  7: sport, 11: dport, 6: e.tcp_flags, 8: src, 12: dst, 27: src, 28: dst,
                  256: 0x86DD if ":" in src else 0x0800,
                  56: b"\x02\0\0\0\0\1", 80: b"\x02\0\0\0\0\2"}
        out = b""
        for ie, length in fields:
            v = values[ie]
            if isinstance(v, str):
                out += ipaddress.ip_address(v).packed
            elif isinstance(v, bytes):
                out += v
            else:
                out += v.to_bytes(length, "big")
        return out

    def _send_templates(self, now: float) -> None:
        s = self.state
        if s.template_sent and now < s.template_sent + s.exporter.interval:
            return
        for (variant, v6), tid in sorted(s.templates.items(), key=lambda kv: kv[1]):
            fields = self.template(variant, v6)
            rec = struct.pack(">HH", tid, len(fields)) + b"".join(
                struct.pack(">HH", ie, n) for ie, n in fields)
            self._send(struct.pack(">HH", 2, 4 + len(rec)) + rec, now, data=False)
        s.template_sent = now

    def send_raw(self, payloads: list[bytes]) -> None:
        """Datagrams from flowprobe's own source address and port (a VPP that sends
        garbage), to the configured collector."""
        e = self.state.exporter
        for p in payloads:
            self._udp_socket().sendto(p, (e.collector, e.port))

    def _send(self, ipfix_set: bytes, now: float, data: bool) -> None:
        e = self.state.exporter
        header = struct.pack(">HHIII", 10, 16 + len(ipfix_set), int(now), self.state.sequence, 1)
        port = 4739 if (data and not self.current and self.version < "21.06") else e.port
        self._udp_socket().sendto(header + ipfix_set, (e.collector, port))


def _vpp_time(t: float) -> int:
    """flowprobe's dateTimeNanoseconds: NTP seconds, then nanoseconds (not a fraction)."""
    return ((int(t) + 2_208_988_800) << 32) | int((t % 1) * 1e9)


def _read(conn: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return buf
