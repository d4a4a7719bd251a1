"""Stand-ins of CNI datapaths, compiled with BCC and attached with TCX at the tail of
the chain (as Cilium's link.Tail() anchor), each counting the packets it sees per
interface so tests can check the CNI still saw every packet.

- CiliumDatapath(node): Cilium's BPF host routing for a netlab "cilium" node. On
  every lxc's TCX ingress: a local endpoint (cilium_lxc, flags without
  ENDPOINT_F_HOST) gets the packet through bpf_redirect_peer (the destination lxc's
  egress hook never sees it), anything else is TC_ACT_OK (TCX_PASS: the chain ends,
  as Cilium's programs never return TCX_NEXT). On cilium_host's TCX egress: a local
  endpoint gets it through bpf_redirect to its lxc (whose egress hook sees it). On
  the node's uplink's TCX ingress (the remote host's way in), as Cilium's
  cil_from_netdev with BPF host routing (its default where the kernel allows): a
  local endpoint gets it through bpf_redirect_peer, past its lxc's egress hook
  (bpf/lib/local_delivery.h: "phys dev -> Pod ... ingress -> ingress so we can use
  redirect_peer()"). With masquerade(node address) on, as Cilium's BPF masquerade
  (bpf/lib/nat.h, a pinned cilium_snat_v4_external of its real layout): on the uplink's
  TCX egress what a local endpoint sends over TCP or UDP leaves with the node's address,
  its port kept if within 32768-65535 and clamped into that range otherwise (Cilium's
  __snat_try_keep_port, with the port itself for the random value), an egress and a
  reverse (TUPLE_F_IN) entry made; on the uplink's ingress a reply to the node's address
  with a reverse entry is rewritten back to the pod's address and port and delivered past
  its veth like the rest. With nodeport(...), TCP and UDP to the node's address and a
  NodePort coming in through the uplink are DNAT'ed to a backend first (nodeport_lb4) and,
  for a local backend, delivered past its veth too.
  Importing this module registers it as netlab.DATAPATHS["cilium"].
- StandIn(netns, ifnames, mode): a generic CNI program that ends the hook ("pass")
  or redirects ("redirect").
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterable

import netlab
from bcc import BPF
from fakeapi import in_netns

from bpf import syscall

F_AFTER = 1 << 4  # BPF_F_AFTER with no relative program: the tail of the chain

CILIUM = r"""
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/pkt_cls.h>

struct endpoint_key {  /* Cilium's bpf/lib/eps.h */
    __u8 ip[16];
    __u8 family;  /* 1 IPv4 (in ip[0..3]), 2 IPv6 */
    __u8 key;
    __u16 cluster_id;
} __attribute__((packed));

struct endpoint_info {
    __u32 ifindex;
    __u16 unused;
    __u16 lxc_id;
    __u32 flags;
    __u32 pad0;
    __u64 mac;
    __u64 node_mac;
    __u32 sec_id;
    __u32 parent_ifindex;
    __u32 pad[2];
};

BPF_TABLE_PINNED("hash", struct endpoint_key, struct endpoint_info, cilium_lxc, 65535,
                 "LXC_MAP");
BPF_HASH(seen, __u32, __u64, 1024);

struct ipv4_ct_tuple {  /* Cilium's bpf/lib/common.h */
    __be32 daddr;
    __be32 saddr;
    __be16 dport;
    __be16 sport;
    __u8 nexthdr;
    __u8 flags;  /* TUPLE_F_OUT 0, TUPLE_F_IN 1 */
} __attribute__((packed));

struct ipv4_nat_entry {  /* bpf/lib/nat.h */
    __u64 created;
    __u64 needs_ct;
    __u64 pad1;
    __u64 pad2;
    __be32 to_addr;  /* to_saddr (egress entry) or to_daddr (reverse entry) */
    __be16 to_port;
};

BPF_TABLE_PINNED("lru_hash", struct ipv4_ct_tuple, struct ipv4_nat_entry,
                 cilium_snat_v4_external, 65536, "SNAT_MAP");
BPF_ARRAY(masq, __be32, 1);  /* the node address to masquerade to; 0: off */

struct frontend {  /* one NodePort: the node's address and port, the backend's */
    __be32 addr;
    __be16 port;
    __be16 backend_port;
    __be32 backend;
};
BPF_ARRAY(nodeports, struct frontend, 1);  /* addr 0: none */

#define IP_CSUM (ETH_HLEN + 10)
#define IP_SRC (ETH_HLEN + 12)
#define IP_DST (ETH_HLEN + 16)
#define L4 (ETH_HLEN + 20)  /* no IP options in the lab */

/* The node address to masquerade to, 0 when off. */
static __always_inline __be32 masq_node(void) {
    int zero = 0;
    __be32 *node = masq.lookup(&zero);
    return node ? *node : 0;
}

/* One address of an IPv4 TCP or UDP packet rewritten (at off), checksums fixed. */
static __always_inline void rewrite_addr(struct __sk_buff *skb, __u8 proto, int off,
                                         __be32 from, __be32 to) {
    int l4csum = L4 + (proto == IPPROTO_TCP ? 16 : 6);
    bpf_l4_csum_replace(skb, l4csum, from, to, BPF_F_PSEUDO_HDR | BPF_F_MARK_MANGLED_0 | 4);
    bpf_l3_csum_replace(skb, IP_CSUM, from, to, 4);
    bpf_skb_store_bytes(skb, off, &to, 4, 0);
}

/* One port (at L4 + off: 0 source, 2 destination) rewritten, the checksum fixed. */
static __always_inline void rewrite_port(struct __sk_buff *skb, __u8 proto, int off,
                                         __be16 from, __be16 to) {
    int l4csum = L4 + (proto == IPPROTO_TCP ? 16 : 6);
    bpf_l4_csum_replace(skb, l4csum, from, to, BPF_F_MARK_MANGLED_0 | 2);
    bpf_skb_store_bytes(skb, L4 + off, &to, 2, 0);
}

/* The packet's tuple (TCP or UDP over IPv4), 0 when it has none. */
static __always_inline int tuple_of(struct __sk_buff *skb, struct ipv4_ct_tuple *t) {
    __u16 proto = 0;
    __u8 l4proto = 0;
    bpf_skb_load_bytes(skb, 12, &proto, 2);
    if (proto != htons(ETH_P_IP) || bpf_skb_load_bytes(skb, ETH_HLEN + 9, &l4proto, 1) ||
        (l4proto != IPPROTO_TCP && l4proto != IPPROTO_UDP))
        return 0;
    t->nexthdr = l4proto;
    if (bpf_skb_load_bytes(skb, IP_DST, &t->daddr, 4) ||
        bpf_skb_load_bytes(skb, IP_SRC, &t->saddr, 4) ||
        bpf_skb_load_bytes(skb, L4, &t->sport, 2) ||
        bpf_skb_load_bytes(skb, L4 + 2, &t->dport, 2))
        return 0;
    return 1;
}

/* The local endpoint the packet is for, with the MACs rewritten as Cilium's
 * ipv4_local_delivery does; 0 when it is not for one. */
static __always_inline __u32 local_endpoint(struct __sk_buff *skb) {
    struct endpoint_key key = {};
    __u16 proto = 0;
    seen.atomic_increment(skb->ifindex);
    bpf_skb_load_bytes(skb, 12, &proto, 2);
    if (proto == htons(ETH_P_IP)) {
        key.family = 1;
        if (bpf_skb_load_bytes(skb, ETH_HLEN + 16, key.ip, 4))
            return 0;
    } else if (proto == htons(ETH_P_IPV6)) {
        key.family = 2;
        if (bpf_skb_load_bytes(skb, ETH_HLEN + 24, key.ip, 16))
            return 0;
    } else {
        return 0;
    }
    struct endpoint_info *ep = cilium_lxc.lookup(&key);
    if (!ep || (ep->flags & 1))  /* ENDPOINT_F_HOST: the stack delivers */
        return 0;
    __u64 dst = ep->mac, src = ep->node_mac;
    __u32 ifindex = ep->ifindex;
    bpf_skb_store_bytes(skb, 0, &dst, 6, 0);
    bpf_skb_store_bytes(skb, 6, &src, 6, 0);
    return ifindex;
}

int cil_from_container(struct __sk_buff *skb) {
    __u32 ifindex = local_endpoint(skb);
    return ifindex ? bpf_redirect_peer(ifindex, 0) : TC_ACT_OK;
}

int cil_from_host(struct __sk_buff *skb) {
    __u32 ifindex = local_endpoint(skb);
    return ifindex ? bpf_redirect(ifindex, 0) : TC_ACT_OK;
}

/* BPF host routing, from a physical device: ingress to ingress, so redirect_peer
 * (Cilium's should_redirect_peer(): not from the host). A reply to a masqueraded
 * connection is rewritten back first (snat_v4_rev_nat). */
int cil_from_netdev(struct __sk_buff *skb) {
    __be32 node = masq_node();
    struct ipv4_ct_tuple t = {};
    if (node && tuple_of(skb, &t) && t.daddr == node) {
        t.flags = 1;
        struct ipv4_nat_entry *rev = cilium_snat_v4_external.lookup(&t);
        if (rev) {
            __be16 port = rev->to_port;
            rewrite_addr(skb, t.nexthdr, IP_DST, t.daddr, rev->to_addr);
            if (port != t.dport)
                rewrite_port(skb, t.nexthdr, 2, t.dport, port);
        }
    }
    /* kube-proxy replacement (nodeport_lb4): a NodePort's traffic DNAT'ed to its backend,
     * then delivered like the rest: past the veth when the backend is local */
    int zero = 0;
    struct frontend *fe = nodeports.lookup(&zero);
    if (fe && fe->addr && (t.daddr || tuple_of(skb, &t)) && t.daddr == fe->addr &&
        t.dport == fe->port) {
        rewrite_addr(skb, t.nexthdr, IP_DST, t.daddr, fe->backend);
        rewrite_port(skb, t.nexthdr, 2, t.dport, fe->backend_port);
    }
    __u32 ifindex = local_endpoint(skb);
    return ifindex ? bpf_redirect_peer(ifindex, 0) : TC_ACT_OK;
}

/* BPF masquerade on the way out (snat_v4_new_mapping: the port kept), for what a local
 * endpoint sends when masquerading is on. */
int cil_to_netdev(struct __sk_buff *skb) {
    __be32 node = masq_node();
    struct ipv4_ct_tuple t = {};
    if (!node || !tuple_of(skb, &t))
        return TC_ACT_OK;
    struct endpoint_key ek = {.family = 1};
    __builtin_memcpy(ek.ip, &t.saddr, 4);
    struct endpoint_info *ep = cilium_lxc.lookup(&ek);
    if (!ep || (ep->flags & 1))
        return TC_ACT_OK;
    __u16 sport = ntohs(t.sport);
    __be16 port = sport >= 32768 ? t.sport : htons(sport % 32767 + 32768);
    struct ipv4_nat_entry out = {.to_addr = node, .to_port = port};
    struct ipv4_nat_entry rev = {.to_addr = t.saddr, .to_port = t.sport};
    struct ipv4_ct_tuple r = {.daddr = node, .saddr = t.daddr, .dport = port,
                              .sport = t.dport, .nexthdr = t.nexthdr, .flags = 1};
    t.flags = 0;
    cilium_snat_v4_external.update(&r, &rev);
    cilium_snat_v4_external.update(&t, &out);
    rewrite_addr(skb, t.nexthdr, IP_SRC, t.saddr, node);
    if (port != t.sport)
        rewrite_port(skb, t.nexthdr, 0, t.sport, port);
    return TC_ACT_OK;
}
"""

STANDIN = r"""
#include <uapi/linux/if_ether.h>
#include <uapi/linux/pkt_cls.h>

BPF_HASH(seen, __u64, __u64, 1024);      /* ifindex | egress << 32 -> packets */
BPF_HASH(targets, __u32, __u32, 1024);   /* destination IPv4 -> ifindex; 0: everything */

static __always_inline int run(struct __sk_buff *skb, __u64 egress) {
    __u64 key = skb->ifindex | egress << 32;
    __u32 dst = 0, *ifindex;
    __u16 proto = 0;
    seen.atomic_increment(key);
#ifdef REDIRECT
    bpf_skb_load_bytes(skb, 12, &proto, 2);
    if (proto == htons(ETH_P_IP) && !bpf_skb_load_bytes(skb, ETH_HLEN + 16, &dst, 4)) {
        ifindex = targets.lookup(&dst);
        if (ifindex)  /* to that veth's peer, the pod (from ingress only) */
            return egress ? bpf_redirect(*ifindex, 0) : bpf_redirect_peer(*ifindex, 0);
    }
    dst = 0;
    ifindex = targets.lookup(&dst);
    if (ifindex)
        return bpf_redirect(*ifindex, 0);
#endif
    return TC_ACT_OK;  /* TCX_PASS: what runs after this on the hook never sees it */
}

int standin_ingress(struct __sk_buff *skb) { return run(skb, 0); }
int standin_egress(struct __sk_buff *skb) { return run(skb, 1); }
"""

HOOKS = {"ingress": syscall.TCX_INGRESS, "egress": syscall.TCX_EGRESS}


class _Tcx:
    """Programs of one BPF object attached by TCX links in one namespace."""

    def __init__(self, netns: str, b: BPF) -> None:
        self.netns, self.bpf = netns, b
        self.links: dict[tuple[str, str], int] = {}  # (ifname, hook) -> link fd
        self.ifindex: dict[str, int] = {}

    def attach(self, ifname: str, hook: str, prog_fd: int, head: bool = False) -> None:
        """At the tail of the chain, or at its head."""
        def run() -> tuple[int, int]:  # ifindex and BPF_LINK_CREATE are per namespace
            idx = socket.if_nametoindex(ifname)
            return idx, syscall.link_create(prog_fd, idx, HOOKS[hook],
                                            syscall.F_BEFORE if head else F_AFTER)

        self.ifindex[ifname], self.links[(ifname, hook)] = in_netns(self.netns, run)

    def attached(self, ifname: str, hook: str, prog_fd: int) -> bool:
        """Still on the hook (BPF_PROG_QUERY)?"""
        pid = syscall.prog_id(prog_fd)
        try:
            progs = in_netns(self.netns, lambda: syscall.query(self.ifindex[ifname], HOOKS[hook]))
        except OSError:  # the interface is gone
            return False
        return any(p == pid for p, _ in progs)

    def to_head(self, ifname: str, hook: str, prog_fd: int) -> None:
        """Its link made again, at the head of the chain (as a CNI re-creating it)."""
        os.close(self.links.pop((ifname, hook)))
        self.attach(ifname, hook, prog_fd, head=True)

    def close(self) -> None:
        for fd in self.links.values():  # the links are not pinned: closing detaches
            os.close(fd)
        self.links.clear()
        self.bpf.cleanup()


class _ClsBpf:
    """Programs of one BPF object as cls_bpf filters in one namespace, as Cilium attached
    them before TCX: clsact, direct-action, priority 1, handle 1. The kernel puts a
    filter added to a priority at the head of its list, so "head" is where it goes."""

    PARENTS = {"ingress": 0xFFFFFFF2, "egress": 0xFFFFFFF3}

    def __init__(self, netns: str, b: BPF) -> None:
        from pyroute2 import IPRoute

        self.netns, self.bpf = netns, b
        self.ipr = IPRoute(netns=netns)
        self.links: dict[tuple[str, str], int] = {}  # (ifname, hook) -> program fd
        self.ifindex: dict[str, int] = {}

    def attach(self, ifname: str, hook: str, prog_fd: int, head: bool = True) -> None:
        from pyroute2.netlink.exceptions import NetlinkError

        idx = self.ifindex[ifname] = self.ipr.link_lookup(ifname=ifname)[0]
        with contextlib.suppress(NetlinkError):  # there already (cniflow's)
            self.ipr.tc("add", "clsact", idx)
        self.ipr.tc("add-filter", "bpf", idx, 1, fd=prog_fd, name=f"standin_{hook}",
                    parent=self.PARENTS[hook], prio=1, classid=1, direct_action=True)
        self.links[(ifname, hook)] = prog_fd

    def attached(self, ifname: str, hook: str, prog_fd: int) -> bool:
        """Its filter (handle 1, its name) still on the hook?"""
        from pyroute2.netlink.exceptions import NetlinkError

        try:
            filters = self.ipr.get_filters(self.ifindex[ifname], parent=self.PARENTS[hook])
        except NetlinkError:  # the interface is gone
            return False
        return any(f["handle"] == 1 and f.get_attr("TCA_OPTIONS").get_attr("TCA_BPF_NAME")
                   == f"standin_{hook}" for f in filters)

    def to_head(self, ifname: str, hook: str, prog_fd: int) -> None:
        """Its filter deleted and added again (as a CNI re-creating it): at the head."""
        self.ipr.tc("del-filter", "bpf", self.ifindex[ifname], 1, parent=self.PARENTS[hook],
                    prio=1)
        self.attach(ifname, hook, prog_fd)

    def close(self) -> None:
        from pyroute2.netlink.exceptions import NetlinkError

        for ifname, hook in self.links:
            with contextlib.suppress(NetlinkError):
                self.ipr.tc("del-filter", "bpf", self.ifindex[ifname], 1,
                            parent=self.PARENTS[hook], prio=1)
        self.links.clear()
        self.ipr.close()
        self.bpf.cleanup()


class CiliumDatapath:
    """Cilium's datapath for a netlab "cilium" node (see the module's doc)."""

    def __init__(self, node: netlab.Node) -> None:
        self.node = node
        text = CILIUM.replace("LXC_MAP", node.lxc_map).replace(
            "SNAT_MAP", node.lxc_map.replace("cilium_lxc", "cilium_snat_v4_external"))
        b = BPF(text=text.encode(), cflags=["-w"])
        self.from_container = b.load_func(b"cil_from_container", BPF.SCHED_CLS)
        self.from_host = b.load_func(b"cil_from_host", BPF.SCHED_CLS)
        self.from_netdev = b.load_func(b"cil_from_netdev", BPF.SCHED_CLS)
        self.to_netdev = b.load_func(b"cil_to_netdev", BPF.SCHED_CLS)
        self.tcx = _Tcx(node.netns, b)
        self.tcx.attach("cilium_host", "egress", self.from_host.fd)
        if node.remote_ip:  # the uplink to the remote host
            self.tcx.attach(f"{node.prefix}up"[:15], "ingress", self.from_netdev.fd)
            self.tcx.attach(f"{node.prefix}up"[:15], "egress", self.to_netdev.fd)
        for pod in node.pods:
            self.add(pod)
        if node.datapath is None:
            node.datapath = self  # add_pod() hands it new pods
        netlab.running.setdefault(node.prefix, self)  # down() closes it

    def add(self, pod: netlab.Pod) -> None:
        """A new pod's lxc: from-container on its ingress."""
        self.tcx.attach(pod.host_if, "ingress", self.from_container.fd)

    def ifindex(self, ifname: str) -> int:
        return self.tcx.ifindex[ifname]

    def masquerade(self, node_ip: str) -> None:
        """What local endpoints send over TCP or UDP leaves the uplink from node_ip ("":
        off)."""
        table = self.tcx.bpf[b"masq"]
        table[table.Key(0)] = table.Leaf(
            int.from_bytes(socket.inet_aton(node_ip), "little") if node_ip else 0)

    def nodeport(self, node_ip: str, port: int, backend_ip: str, backend_port: int) -> None:
        """TCP and UDP for node_ip:port from the uplink DNAT'ed to backend_ip:backend_port
        (Cilium's kube-proxy replacement: a NodePort, LoadBalancer or hostPort Service)."""
        table = self.tcx.bpf[b"nodeports"]
        fe = table.Leaf()
        fe.addr = int.from_bytes(socket.inet_aton(node_ip), "little")
        fe.port = socket.htons(port)
        fe.backend = int.from_bytes(socket.inet_aton(backend_ip), "little")
        fe.backend_port = socket.htons(backend_port)
        table[table.Key(0)] = fe

    def seen(self, iface: int | str) -> int:
        """Packets the datapath saw on an interface (ifindex or name)."""
        idx = self.tcx.ifindex[iface] if isinstance(iface, str) else iface
        v = self.tcx.bpf[b"seen"].get(self.tcx.bpf[b"seen"].Key(idx))
        return v.value if v is not None else 0

    def attached(self, ifname: str) -> bool:
        hook, fd = (("egress", self.from_host.fd) if ifname == "cilium_host"
                    else ("ingress", self.from_netdev.fd) if ifname.endswith("up")
                    else ("ingress", self.from_container.fd))
        return self.tcx.attached(ifname, hook, fd)

    def close(self) -> None:
        if self.tcx.bpf is not None:
            self.tcx.close()
            self.tcx.bpf = None
        if netlab.running.get(self.node.prefix) is self:
            del netlab.running[self.node.prefix]
        if self.node.datapath is self:
            self.node.datapath = None


netlab.DATAPATHS["cilium"] = CiliumDatapath


class StandIn:
    """A generic CNI program at the tail of TCX (the head with head=True) on each of
    ifnames, in netns, on the given hooks; with attach="tc" a cls_bpf filter instead (at
    the head of priority 1: see _ClsBpf). mode "pass": count, TC_ACT_OK (ends the
    hook). mode "redirect": count, then for an IPv4 destination in targets ({ip: veth})
    bpf_redirect_peer to that veth's pod (bpf_redirect from egress), everything else
    bpf_redirect to target's egress when target is given, else TC_ACT_OK. Frames are
    redirected as they are (no MAC rewrite)."""

    def __init__(self, netns: str, ifnames: Iterable[str], mode: str = "pass",
                 targets: dict[str, str] | None = None, target: str = "",
                 hooks: Iterable[str] = ("ingress",), head: bool = False,
                 attach: str = "tcx") -> None:
        if mode not in ("pass", "redirect") or attach not in ("tcx", "tc"):
            raise ValueError(f"mode {mode!r}, attach {attach!r}")
        b = BPF(text=STANDIN.encode(), cflags=["-w"] + (["-DREDIRECT"] if mode == "redirect"
                                                        else []))
        self.progs = {h: b.load_func(f"standin_{h}".encode(), BPF.SCHED_CLS) for h in HOOKS}
        self.tcx = _Tcx(netns, b) if attach == "tcx" else _ClsBpf(netns, b)
        names = list(ifnames) + list((targets or {}).values()) + ([target] if target else [])
        index = in_netns(netns, lambda: {n: socket.if_nametoindex(n) for n in names})
        table = b[b"targets"]
        for ip, ifname in (targets or {}).items():
            table[table.Key(int.from_bytes(socket.inet_aton(ip), "little"))] = \
                table.Leaf(index[ifname])
        if target:
            table[table.Key(0)] = table.Leaf(index[target])
        self.hooks = tuple(hooks)
        for ifname in ifnames:
            for hook in self.hooks:
                self.tcx.attach(ifname, hook, self.progs[hook].fd, head)

    def to_head(self, ifname: str, hook: str = "ingress") -> None:
        """Its link or filter made again, at the head (as a CNI re-creating it)."""
        self.tcx.to_head(ifname, hook, self.progs[hook].fd)

    def seen(self, ifname: str, hook: str | None = None) -> int:
        """Packets seen on ifname's hook (both hooks when None)."""
        t, idx = self.tcx.bpf[b"seen"], self.tcx.ifindex[ifname]
        total = 0
        for h in [hook] if hook else list(HOOKS):
            v = t.get(t.Key(idx | (h == "egress") << 32))
            total += v.value if v is not None else 0
        return total

    def attached(self, ifname: str | None = None) -> bool:
        """Still on every hook of ifname (of every interface when None)?"""
        names = [ifname] if ifname else list(self.tcx.ifindex)
        return all(self.tcx.attached(n, h, self.progs[h].fd) for n in names
                   for h in self.hooks if (n, h) in self.tcx.links)

    def close(self) -> None:
        if self.tcx.bpf is not None:
            self.tcx.close()
            self.tcx.bpf = None
