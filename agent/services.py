"""Services in records: which Service port a flow was for, and which backend served it.

kube-proxy (iptables or nftables) translates a Service's address (ClusterIP,
external IP, a NodePort on a node address) to a backend with DNAT in the host's
PREROUTING, so a pod's veth sees one of four forms of a connection's tuple: the
client's packet before translation (conntrack's original tuple: at the client's
veth ingress), after it (the reply tuple reversed: at the backend's veth egress),
the backend's answer before un-translation (the reply tuple: at the backend's
ingress) and after it (the original reversed: at the client's egress). The
node's conntrack, dumped with a kernel-side status filter (only DNAT'd entries)
at most once per poll and only when a record may be Service traffic, maps each
form to the Service's frontend and its backend. Entries are remembered for a
while, so a record leaving after conntrack forgot its connection keeps its name.
The API's Services name the frontend ("namespace/name:port", as Kubernetes
prints a ServicePortName); their EndpointSlices name backends on other nodes.
Per record, everything is a sorted-hash search over the batch.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import struct
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from agent.flowtable import key_hash
from agent.kube import Endpoint, Service
from agent.netlink import HDR, NLA, attrs, dump

log = logging.getLogger(__name__)

IPS_DST_NAT = 0x20  # conntrack status bit (linux/netfilter/nf_conntrack_common.h)
PROTOCOLS = {"TCP": 6, "UDP": 17, "SCTP": 132}
MEMORY_S = 300.0  # translations kept after conntrack dropped them
MEMORY_MAX = 65536

TUPLE = np.dtype([("src", "u1", (16,)), ("dst", "u1", (16,)), ("sport", "<u2"),
                  ("dport", "<u2"), ("proto", "u1"), ("version", "u1")])
ENTRY = np.dtype([("orig", TUPLE), ("reply", TUPLE)])
# The forms of a connection's tuple a veth can see (see the module's doc)
ORIG, REPLY_REVERSED, REPLY, ORIG_REVERSED = 0, 1, 2, 3


def _addr(raw16: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(raw16).view("<u8").reshape(-1, 2)


def endpoint_words(raw16: np.ndarray, port: np.ndarray, proto: np.ndarray,
                   version: np.ndarray) -> np.ndarray:
    """(address, port, protocol, family) as (n, 3) uint64 rows."""
    w = np.zeros((len(raw16), 3), np.uint64)
    w[:, :2] = _addr(raw16)
    w[:, 2] = (port.astype(np.uint64) | proto.astype(np.uint64) << np.uint64(16)
               | version.astype(np.uint64) << np.uint64(24))
    return w


def tuple_words(src, dst, sport, dport, proto, version) -> np.ndarray:
    """A 5-tuple and family as (n, 5) uint64 rows."""
    w = np.zeros((len(src), 5), np.uint64)
    w[:, :2], w[:, 2:4] = _addr(src), _addr(dst)
    w[:, 4] = (sport.astype(np.uint64) | dport.astype(np.uint64) << np.uint64(16)
               | proto.astype(np.uint64) << np.uint64(32)
               | version.astype(np.uint64) << np.uint64(40))
    return w


class Lookup:
    """Exact match of uint64 rows to int values (-1: absent), by sorted hashes."""

    def __init__(self, words: np.ndarray, values: np.ndarray) -> None:
        h = key_hash(words) if len(words) else np.zeros(0, np.uint64)
        order = np.argsort(h, kind="stable")
        self.h, self.words, self.values = h[order], words[order], values[order]

    def find(self, words: np.ndarray) -> np.ndarray:
        out = np.full(len(words), -1, np.int64)
        if not len(self.h) or not len(words):
            return out
        h = key_hash(words)
        pos = np.searchsorted(self.h, h)
        # rows sharing a hash are adjacent: look a few ahead for the exact row
        for step in range(4):
            p = np.minimum(pos + step, len(self.h) - 1)
            hit = (out < 0) & (self.h[p] == h) & (self.words[p] == words).all(axis=1)
            out[hit] = self.values[p[hit]]
        return out


def _raw(ip: str) -> tuple[bytes, int]:
    a = ipaddress.ip_address(ip)
    return a.packed.ljust(16, b"\0"), a.version


def _cluster_ips(ips: Sequence[str]) -> tuple[bytes, bytes]:
    """A Service's IPv4 and IPv6 ClusterIPs as octets (zeros where it has none)."""
    v4, v6 = bytes(4), bytes(16)
    for ip in ips:
        a = ipaddress.ip_address(ip)
        if a.version == 4 and v4 == bytes(4):
            v4 = a.packed
        elif a.version == 6 and v6 == bytes(16):
            v6 = a.packed
    return v4, v6


class ServiceIndex:
    """The API's Services as arrays: frontends (address, port, protocol) to their
    Service port, and the addresses of every pod endpoint to that pod."""

    def __init__(self, services: Iterable[Service], endpoints: Iterable[Endpoint],
                 node_addresses: Sequence[str] = ()) -> None:
        self.names: list[str] = []
        rows: list[tuple[bytes, int, int, int, int]] = []  # raw, version, port, proto, index
        cluster: list[tuple[bytes, bytes]] = []  # each Service port's ClusterIPv4, ClusterIPv6
        for svc in services:
            for p in svc.ports:
                proto = PROTOCOLS.get(p.protocol)
                if proto is None:
                    continue
                i = len(self.names)
                self.names.append(f"{svc.namespace}/{svc.name}" + (f":{p.name}" if p.name else ""))
                cluster.append(_cluster_ips(svc.cluster_ips))
                for ip in svc.addresses:
                    rows.append((*_raw(ip), p.port, proto, i))
                for ip in node_addresses if p.node_port else ():
                    rows.append((*_raw(ip), p.node_port, proto, i))
        self.frontends = Lookup(*self._words(rows))
        # by Service port index, one row more (zeros) for "no Service"
        self.cluster4 = np.frombuffer(b"".join(c[0] for c in cluster) + bytes(4),
                                      np.uint8).reshape(-1, 4)
        self.cluster6 = np.frombuffer(b"".join(c[1] for c in cluster) + bytes(16),
                                      np.uint8).reshape(-1, 16)
        self.pods: list[Endpoint] = []
        addrs: list[tuple[bytes, int, int, int, int]] = []
        for ep in endpoints:
            for ip in ep.addresses:
                addrs.append((*_raw(ip), 0, 0, len(self.pods)))
            self.pods.append(ep)
        self.backends = Lookup(*self._words(addrs))

    @staticmethod
    def _words(rows) -> tuple[np.ndarray, np.ndarray]:
        if not rows:
            return np.zeros((0, 3), np.uint64), np.zeros(0, np.int64)
        raw = np.frombuffer(b"".join(r[0] for r in rows), np.uint8).reshape(-1, 16)
        cols = np.array([r[1:] for r in rows], np.int64)
        return (endpoint_words(raw, cols[:, 1], cols[:, 2], cols[:, 0]), cols[:, 3])

    def frontend(self, raw16, port, proto, version) -> np.ndarray:
        return self.frontends.find(endpoint_words(raw16, port, proto, version))

    def endpoint(self, raw16, version) -> np.ndarray:
        zero = np.zeros(len(raw16), np.uint16)
        return self.backends.find(endpoint_words(raw16, zero, zero, version))


NETLINK_NETFILTER, CT_GET = 12, (1 << 8) | 1  # ctnetlink dump
CTA_TUPLE_ORIG, CTA_TUPLE_REPLY, CTA_STATUS, CTA_STATUS_MASK = 1, 2, 3, 26


def _tuple(buf: bytes, span: tuple[int, int], version: int) -> tuple:
    a = attrs(buf, *span)
    ip, l4 = attrs(buf, *a[1]), attrs(buf, *a[2])
    n = 4 if version == 4 else 16
    src = buf[ip[1 if n == 4 else 3][0]:][:n].ljust(16, b"\0")
    dst = buf[ip[2 if n == 4 else 4][0]:][:n].ljust(16, b"\0")
    port = [int.from_bytes(buf[l4[k][0]:l4[k][0] + 2], "big") if k in l4 else 0 for k in (2, 3)]
    return src, dst, port[0], port[1], buf[l4[1][0]], version


def read_dnat() -> np.ndarray:
    """The node's conntrack entries that were destination-NATed, as ENTRY rows: one
    ctnetlink dump per family, filtered in the kernel by status (IPS_DST_NAT), parsed
    here with struct (pyroute2's parser costs 230 us an entry)."""
    rows = []
    for family, version in ((socket.AF_INET, 4), (socket.AF_INET6, 6)):
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER) as sk:
            sk.bind((0, 0))
            body = struct.pack("=BBH", family, 0, 0) + b"".join(
                NLA.pack(8, kind) + struct.pack(">I", IPS_DST_NAT)
                for kind in (CTA_STATUS, CTA_STATUS_MASK))
            for _, buf, start, end in dump(sk, CT_GET, body, "conntrack dump"):
                a = attrs(buf, start + HDR.size + 4, end)
                if CTA_TUPLE_ORIG in a and CTA_TUPLE_REPLY in a:
                    rows.append((_tuple(buf, a[CTA_TUPLE_ORIG], version),
                                 _tuple(buf, a[CTA_TUPLE_REPLY], version)))
    out = np.zeros(len(rows), ENTRY)
    if rows:
        for side, name in enumerate(("orig", "reply")):
            t = out[name]
            t["src"] = np.frombuffer(b"".join(r[side][0] for r in rows), np.uint8).reshape(-1, 16)
            t["dst"] = np.frombuffer(b"".join(r[side][1] for r in rows), np.uint8).reshape(-1, 16)
            cols = np.array([r[side][2:] for r in rows], np.int64)
            t["sport"], t["dport"], t["proto"], t["version"] = cols.T
    return out


@dataclass
class Matches:
    """Per record: the Service port (-1: none), whether it is the destination's
    (else the source's), the frontend address and port; where the record's other
    end is the frontend and conntrack knows the backend: that backend's address; and
    where the record is the backend's side: the client as conntrack first saw it, which
    a masquerade (kube-proxy's for NodePorts, external and load balancer IPs under
    externalTrafficPolicy Cluster) hides behind the node's address."""
    service: np.ndarray
    to_service: np.ndarray
    frontend: np.ndarray  # (n, 16)
    port: np.ndarray
    backend: np.ndarray  # (n, 16)
    translated: np.ndarray  # backend known and the record's other end is the frontend
    client: np.ndarray  # (n, 16)
    at_backend: np.ndarray  # the record's other end is the client (client known)


class Services:
    """The Service names of one agent: the index rebuilt when the API's objects
    change, conntrack's translations remembered for MEMORY_S."""

    def __init__(self, objects: Callable[[], tuple], node_addresses: Callable[[], Sequence[str]],
                 read: Callable[[], np.ndarray] = read_dnat, clock=time.monotonic) -> None:
        self.objects, self.node_addresses, self.read, self.clock = (
            objects, node_addresses, read, clock)
        self.index = ServiceIndex((), ())
        self._generation: tuple | None = None
        self.remembered: dict[bytes, float] = {}
        self.entries = np.zeros(0, ENTRY)
        self.forms = Lookup(np.zeros((0, 5), np.uint64), np.zeros(0, np.int64))
        self.entry_service = np.zeros(0, np.int64)
        self.read_errors = 0
        self._read = False  # conntrack already read this poll

    def refresh(self) -> ServiceIndex:
        """At each poll: the index, rebuilt only when Services, EndpointSlices or the
        node changed; conntrack is read again (if needed) once."""
        self._read = False
        generation, services, endpoints = self.objects()
        nodes = tuple(self.node_addresses())
        if (generation, nodes) != self._generation:
            self.index = ServiceIndex(services, endpoints, nodes)
            self._generation = (generation, nodes)
            self._reindex()
        return self.index

    def _conntrack(self) -> None:
        """Read the translations, once a poll."""
        if self._read:
            return
        self._read = True
        try:
            rows = self.read()
        except Exception as e:  # noqa: BLE001  (no conntrack here, or no CAP_NET_ADMIN)
            self.read_errors += 1
            if self.read_errors == 1:
                log.warning("conntrack not readable: Services are named, backends are not",
                            extra={"err": str(e)[:200]})
            return
        now = self.clock()
        seen = self.remembered
        for b in np.ascontiguousarray(rows).view(np.dtype((np.void, ENTRY.itemsize))).tolist():
            seen[b] = now
        for b in [b for b, t in seen.items() if now - t > MEMORY_S]:
            del seen[b]
        if len(seen) > MEMORY_MAX:  # the oldest go first
            for b, _ in sorted(seen.items(), key=lambda kv: kv[1])[:len(seen) - MEMORY_MAX]:
                del seen[b]
        self.entries = np.frombuffer(b"".join(seen), ENTRY).copy() if seen else \
            np.zeros(0, ENTRY)
        self._reindex()

    def _reindex(self) -> None:
        e = self.entries
        o, r = e["orig"], e["reply"]
        n = len(e)
        self.entry_service = self.index.frontend(o["dst"], o["dport"], o["proto"], o["version"])
        forms = [tuple_words(o["src"], o["dst"], o["sport"], o["dport"], o["proto"], o["version"]),
                 tuple_words(r["dst"], r["src"], r["dport"], r["sport"], r["proto"], r["version"]),
                 tuple_words(r["src"], r["dst"], r["sport"], r["dport"], r["proto"], r["version"]),
                 tuple_words(o["dst"], o["src"], o["dport"], o["sport"], o["proto"], o["version"])]
        values = np.concatenate([np.arange(n, dtype=np.int64) * 4 + f for f in range(4)])
        self.forms = Lookup(np.concatenate(forms) if n else np.zeros((0, 5), np.uint64), values)

    def match(self, key: np.ndarray, ingress: np.ndarray) -> Matches:
        """Service names of records (their FLOW_DTYPE keys)."""
        ix = self.index
        n = len(key)
        src, dst, version, proto = key["src"], key["dst"], key["ip_version"], key["proto"]
        to = ix.frontend(dst, key["dport"], proto, version)
        back = ix.frontend(src, key["sport"], proto, version)
        service = np.where(to >= 0, to, back)
        to_service = to >= 0
        frontend = np.where(to_service[:, None], dst, src)
        port = np.where(to_service, key["dport"], key["sport"]).astype(np.uint16)
        backend = np.zeros((n, 16), np.uint8)
        translated = np.zeros(n, bool)
        client = np.zeros((n, 16), np.uint8)
        at_backend = np.zeros(n, bool)
        # conntrack only when a record may be Service traffic: at a frontend, or at a
        # backend's address (the translated forms)
        maybe = (service >= 0) | (ix.endpoint(src, version) >= 0) | (ix.endpoint(dst, version) >= 0)
        if len(ix.names) and maybe.any():
            self._conntrack()
            hit = self.forms.find(tuple_words(src, dst, key["sport"], key["dport"], proto, version))
            hit = np.where(maybe, hit, -1)
            entry, form = hit // 4, hit % 4
            known = hit >= 0
            known[known] = self.entry_service[entry[known]] >= 0  # DNATs of no Service: not ours
            if known.any():
                rows = self.entries[entry[known]]
                fwd = (form[known] == ORIG) | (form[known] == REPLY_REVERSED)
                service[known] = self.entry_service[entry[known]]
                to_service[known] = fwd
                frontend[known] = rows["orig"]["dst"]
                port[known] = rows["orig"]["dport"]
                backend[known] = rows["reply"]["src"]
                # the frontend is the other end: ORIG seen at ingress, ORIG_REVERSED at egress
                f = form[known]
                translated[known] = ((f == ORIG) & ingress[known]) | (
                    (f == ORIG_REVERSED) & ~ingress[known])
                # the client is the other end: REPLY_REVERSED at egress, REPLY at ingress
                client[known] = rows["orig"]["src"]
                at_backend[known] = ((f == REPLY_REVERSED) & ~ingress[known]) | (
                    (f == REPLY) & ingress[known])
        none = service < 0
        frontend[none] = 0
        port[none] = 0
        return Matches(service, to_service, frontend, port, backend, translated, client,
                       at_backend)
