// cniflow TC classifier: counts flows per (interface, direction, addresses,
// ports or ICMP type/code, protocol) in a hash map, and never changes the
// packet or its verdict (TC_ACT_UNSPEC lets the next filter, a CNI's, run).
//
// Only uapi headers: the build host's kernel headers may be a near version.
//
// Two maps, flows_a and flows_b, take turns: user space flips `slot`, waits a
// grace period, then drains the idle map with one lookup-and-delete batch. No
// program writes into a map while it is drained, so no count is ever lost to
// the race between the kernel's copy and delete.
//
// Entry points (--entry-points): the ingress of the node's other interfaces (uplinks,
// tunnels, unmetered pods' veths), where a CNI may deliver a packet into a metered pod
// with bpf_redirect_peer, past the pod's veth (Cilium's BPF host routing does, from
// physical devices and tunnels). cniflow_entry counts a packet for a metered pod's
// address there, as that veth's egress, keyed DIR_ENTRY; a packet that still passes the
// veth's egress finds its flow under DIR_ENTRY and is not counted again.
//
// Replies to a pod's connections that Cilium masqueraded come in for the node's address:
// with NAT_TYPE and NAT_FLAGS (those of Cilium's SNAT map), the entry point finds the pod
// in Cilium's reverse NAT entry (user space puts the map into cilium_nat).
//
// Pod ends (--pod-side): what a metered pod receives for its own addresses is counted at
// its end of the veth (cniflow_pod, TCX ingress inside the pod's namespace), as the host
// side's egress, however it got there: through the veth or past it (bpf_redirect_peer of
// a Service's traffic a CNI DNAT'ed to the pod after the entry point). With POD_SIDE the
// host side's egress and the entry points leave those addresses to it: counted once.
//
// Compile-time parameters (cflags): MAP_SIZE, OVERFLOW_SIZE, METERED_SIZE (entries of
// the flow, overflow, metered-interface and pod-address maps); SHARED_MAP for one hash shared by all
// CPUs (the default the loader asks for): packets and octets are added atomically,
// TCP flags, TTL range and TOS are last-writer-wins when two CPUs update one flow at
// the same instant. Without it, a per-CPU hash: no atomics, user space folds values.

#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/pkt_cls.h>

#define MAX_IPV6_EXT 6     // extension headers walked before giving up on ports
#define MAX_L3_OFFSET 64   // Ethernet plus two VLAN tags fit well inside
#define MAX_L4_OFFSET 512  // IPv4 options or IPv6 extension chain, bounded

#define ETH_P_8021AD_ 0x88A8
#define ETH_P_8021Q_ 0x8100

#define NEXTHDR_HOP 0
#define NEXTHDR_ROUTING 43
#define NEXTHDR_FRAGMENT 44
#define NEXTHDR_AUTH 51
#define NEXTHDR_DEST 60

enum stat_index {
    STAT_MAP_FULL = 0,    // packets the flow map had no room for: in overflow records instead
    STAT_NOT_IP = 1,      // frames that are not IPv4 or IPv6: passed on, not counted
    STAT_MALFORMED = 2,   // truncated or invalid IP headers: passed on, not counted
    STAT_LOST = 3,        // no room in the overflow map either: counted here only
    STAT_DEDUP = 4,       // egress packets already counted at a metered sender's ingress
    STAT_MAX = 5,
};

#define DIR_ENTRY 2  // the interface's egress, counted at an entry point (user space: 1)
#define METERED_POD 1    // the metered map's values
#define METERED_ENTRY 2

struct flow_key {
    u32 ifindex;
    u8 direction;   // 0: TC ingress of the interface, 1: TC egress, DIR_ENTRY
    u8 ip_version;  // 4 or 6
    u8 proto;
    u8 overflow;    // 1: the per-interface total of packets the flow map had no room for
    u8 src[16];     // IPv4 uses the first 4 octets
    u8 dst[16];
    u16 sport;      // host order; 0 without ports
    u16 dport;      // host order; ICMP: type << 8 | code
    u32 pad1;
};

struct flow_val {
    u64 packets;
    u64 octets;     // IP header plus payload, as octetDeltaCount defines it
    u64 first;      // jiffies: the cheapest clock (user space maps it to wall time)
    u64 last;
    u16 tcp_flags;  // OR of all packets, NS in bit 8 (RFC 7125)
    u8 min_ttl;
    u8 max_ttl;
    u8 tos;         // of the last packet: DSCP and ECN
    u8 pad[3];
};

struct frag_hdr_ {
    u8 nexthdr;
    u8 reserved;
    __be16 frag_off;
    __be32 identification;
};

struct ext_hdr_ {
    u8 nexthdr;
    u8 hdrlen;
};

// PIN_DIR (a directory on a bpffs): every map is pinned there under its own name, and a
// map already pinned there is reused, so a new agent's program counts into the maps the
// old one left (user space checks their layout first: BCC does not).
#ifdef PIN_DIR
#define TABLE(type, k, v, name, n) BPF_TABLE_PINNED(type, k, v, name, n, PIN_DIR "/" #name)
#else
#define TABLE(type, k, v, name, n) BPF_TABLE(type, k, v, name, n)
#endif

#ifdef SHARED_MAP
// one value for all CPUs: counters added atomically, the rest last-writer-wins
TABLE("hash", struct flow_key, struct flow_val, flows_a, MAP_SIZE);
TABLE("hash", struct flow_key, struct flow_val, flows_b, MAP_SIZE);
#else
TABLE("percpu_hash", struct flow_key, struct flow_val, flows_a, MAP_SIZE);
TABLE("percpu_hash", struct flow_key, struct flow_val, flows_b, MAP_SIZE);
#endif
// When a flow map is full, a packet is still counted: in its interface's, direction's
// and IP version's overflow entry (addresses unknown, counts exact). Shared, atomic.
TABLE("hash", struct flow_key, struct flow_val, overflow_a, OVERFLOW_SIZE);
TABLE("hash", struct flow_key, struct flow_val, overflow_b, OVERFLOW_SIZE);
TABLE("array", int, u32, slot, 1);
TABLE("percpu_array", int, u64, stats, STAT_MAX);
// New flows inserted into flows_a (0) and flows_b (1) since user space last drained
// them: user space reads the active one often and drains early when it fills.
TABLE("percpu_array", int, u64, fill, 2);
// ifindex -> METERED_POD for every pod interface cniflow meters (with dedup), kept by
// user space. A packet that entered through one of them was counted at that interface's
// ingress (the sender's side): its egress on another metered interface is not counted
// again. ifindex -> METERED_ENTRY for every entry point, and every device stacked on one
// (a VLAN, a bond: a packet from there may have been counted at the entry point).
TABLE("hash", u32, u32, metered, METERED_SIZE);

struct addr_key {
    u32 ip_version;
    u8 addr[16];  // IPv4 in the first 4 octets
};
// A metered pod's address -> its host-side interface: what entry points count.
TABLE("hash", struct addr_key, u32, pod_addrs, METERED_SIZE);
// A pod metered at its own end of the veth: its address -> the host side's index (what
// the records name) and the pod side's (in the pod's namespace, checked against the
// packet's device). Kept by user space only while the pod end's link is attached.
struct pod_end {
    u32 host;
    u32 peer;
    u8 mac[6];  // the pod side's: a packet a pod forwards for another is not that one's
    u16 pad;
};
TABLE("hash", struct addr_key, struct pod_end, pod_side, METERED_SIZE);
// Flows (key as the host side's egress would count them) that crossed a pod end's host
// side from a metered pod of the node: counted at the sender, so not at the pod end, also
// when their source was rewritten on the way (a hairpin masqueraded by kube-proxy).
TABLE("lru_hash", struct flow_key, u8, from_sender, OVERFLOW_SIZE);

#ifdef NAT_TYPE
// Cilium's BPF masquerade map (cilium_snat_v4_external, bpf/lib/nat.h: struct
// ipv4_ct_tuple, struct ipv4_nat_entry): a reply's reverse entry (flags TUPLE_F_IN) holds
// the pod's address and port it is rewritten to.
struct nat_tuple {
    __be32 daddr;
    __be32 saddr;
    __be16 dport;
    __be16 sport;
    u8 nexthdr;
    u8 flags;
} __attribute__((packed));
struct nat_entry {
    u64 created;
    u64 needs_ct;
    u64 pad1;
    u64 pad2;
    __be32 to_daddr;
    __be16 to_dport;
    u16 pad3;
};
#define NAT_DIR_INGRESS 1
BPF_F_TABLE(NAT_TYPE, struct nat_tuple, struct nat_entry, nat_template, 128, NAT_FLAGS);
BPF_ARRAY_OF_MAPS(cilium_nat, "nat_template", 1);
#endif

// Flows (key as counted, DIR_ENTRY) an entry point counted in an overflow entry lately:
// their packets are not counted again at the veth's egress. LRU: a flood evicts the
// oldest, long after their packets crossed the veth (microseconds after the entry).
TABLE("lru_hash", struct flow_key, u8, entry_overflowed, OVERFLOW_SIZE);

struct pkt {
    u64 now;
    u32 len;      // octets: IP header plus payload, of every segment
    u16 flags;
    u8 ttl;
    u8 tos;
    u16 segs;     // packets: 1, or the segments a GRO super-packet was made of
    u16 hdrlen;   // IP and transport headers, repeated in each segment
    u8 jumbo;     // IPv6 BIG TCP: the hop-by-hop jumbo option's octets, in no segment
};

static __always_inline void stat_inc(int index) {
    u64 *c = stats.lookup(&index);
    if (c)
        *c += 1;
}

// A per-CPU value is zero on every CPU but the one that inserted the flow, so
// the first packet a CPU sees starts its slot.
static __always_inline void fold(struct flow_val *v, const struct pkt *p) {
#ifdef SHARED_MAP
    __sync_fetch_and_add(&v->packets, p->segs);
    __sync_fetch_and_add(&v->octets, p->len);
#else
    if (v->packets == 0) {
        v->first = p->now;
        v->min_ttl = p->ttl;
    }
    v->packets += p->segs;
    v->octets += p->len;
#endif
    // Stores only when something changes (jiffies tick every few ms): fewer writes
    // to a line other CPUs may be reading.
    if (v->last != p->now)
        v->last = p->now;
    if ((v->tcp_flags | p->flags) != v->tcp_flags)
        v->tcp_flags |= p->flags;
    if (p->ttl < v->min_ttl)
        v->min_ttl = p->ttl;
    if (p->ttl > v->max_ttl)
        v->max_ttl = p->ttl;
    if (v->tos != p->tos)
        v->tos = p->tos;
}

static __always_inline void fold_shared(struct flow_val *v, const struct pkt *p) {
    __sync_fetch_and_add(&v->packets, p->segs);
    __sync_fetch_and_add(&v->octets, p->len);
    if (v->last != p->now)
        v->last = p->now;
}

static __always_inline void start(struct flow_val *v, const struct pkt *p) {
    v->packets = p->segs;
    v->octets = p->len;
    v->first = p->now;
    v->last = p->now;
    v->tcp_flags = p->flags;
    v->min_ttl = p->ttl;
    v->max_ttl = p->ttl;
    v->tos = p->tos;
}

// After inserting a new flow: 1 when done (inserted, or the map is full and the packet
// must go to the overflow map), 0 when another CPU inserted the key first and it must be
// looked up again. *full is set when the map had no room.
static __always_inline int inserted(int err, int *full, u32 s) {
    if (err == -17 /* EEXIST */)
        return 0;
    if (err) {
        *full = 1;
    } else {
        u64 *c = fill.lookup(&s);
        if (c)
            *c += 1;
    }
    return 1;
}

// The overflow entry's key: interface, direction and IP version only.
static __always_inline void overflow_key(struct flow_key *o, const struct flow_key *k) {
    o->ifindex = k->ifindex;
    o->direction = k->direction;
    o->ip_version = k->ip_version;
    o->overflow = 1;
}

// One function per map, not `b ? flows_b.lookup(k) : flows_a.lookup(k)`: LLVM merges
// that into one call site reached with either map, and for such a site the verifier
// cannot inline the hash lookup (an indirect call per packet: 16 of the 72 ns the
// program cost). tests/test_metering.py checks that every map call site has one map.
static __always_inline int account_a(struct flow_key *key, const struct pkt *p) {
    int full = 0;
    struct flow_val *v = flows_a.lookup(key);
    if (!v) {
        struct flow_val init = {};  // a new flow: built only now
        start(&init, p);
        if (!inserted(flows_a.insert(key, &init), &full, 0))
            v = flows_a.lookup(key);
        else if (!full)
            return 0;
    }
    if (v) {
        fold(v, p);
        return 0;
    }
    // The flow map is full (or the flow vanished between insert and lookup).
    stat_inc(STAT_MAP_FULL);
    struct flow_key o = {};
    overflow_key(&o, key);
    v = overflow_a.lookup(&o);
    if (!v) {
        struct flow_val init = {};
        start(&init, p);
        init.min_ttl = init.max_ttl = init.tos = init.tcp_flags = 0;
        int err = overflow_a.insert(&o, &init);
        if (err == 0)
            return 1;
        v = overflow_a.lookup(&o);
    }
    if (v)
        fold_shared(v, p);
    else
        stat_inc(STAT_LOST);
    return 1;
}

static __always_inline int account_b(struct flow_key *key, const struct pkt *p) {
    int full = 0;
    struct flow_val *v = flows_b.lookup(key);
    if (!v) {
        struct flow_val init = {};
        start(&init, p);
        if (!inserted(flows_b.insert(key, &init), &full, 1))
            v = flows_b.lookup(key);
        else if (!full)
            return 0;
    }
    if (v) {
        fold(v, p);
        return 0;
    }
    stat_inc(STAT_MAP_FULL);
    struct flow_key o = {};
    overflow_key(&o, key);
    v = overflow_b.lookup(&o);
    if (!v) {
        struct flow_val init = {};
        start(&init, p);
        init.min_ttl = init.max_ttl = init.tos = init.tcp_flags = 0;
        int err = overflow_b.insert(&o, &init);
        if (err == 0)
            return 1;
        v = overflow_b.lookup(&o);
    }
    if (v)
        fold_shared(v, p);
    else
        stat_inc(STAT_LOST);
    return 1;
}

// 1 when the flow map had no room (the packet is in an overflow entry, or lost).
static __always_inline int account(struct flow_key *key, const struct pkt *p) {
    int zero = 0;
    u32 *s = slot.lookup(&zero);
    if (s && *s)
        return account_b(key, p);
    return account_a(key, p);
}

// What parse() made of a frame.
enum verdict {
    PARSED = 0,     // key and packet filled in
    NOT_IP = 1,     // counted in STAT_NOT_IP
    MALFORMED = 2,  // counted in STAT_MALFORMED
    SHORT = 3,      // a header lies beyond the linear part, in paged fragments
};

// Bytes made linear on the slow path: Ethernet, two VLAN tags, IPv4 with options and a
// TCP header, or IPv6 with a few extension headers. A deeper chain keeps its ports unread.
#define PULL_LEN 256

// A header that does not fit in the linear data is SHORT when the skb holds more (an
// AF_PACKET TX ring frame keeps only the Ethernet header linear), else truncated.
#define NEED(ptr, n, bad) \
    if ((void *)(ptr) + (n) > end) \
        return paged ? SHORT : (bad)

// Parses with direct packet access. Inlined twice: once on the frame as it comes, and
// once more after bpf_skb_pull_data() only when the first pass found it SHORT.
static __always_inline int parse(struct __sk_buff *skb, struct flow_key *key, struct pkt *p) {
    void *data = (void *)(long)skb->data;
    void *end = (void *)(long)skb->data_end;
    int paged = skb->len > (u32)(end - data);
    u32 off = sizeof(struct ethhdr);
    u16 l3proto;
    u8 proto;
    int nonfirst = 0;

    struct ethhdr *eth = data;
    NEED(eth, sizeof(*eth), NOT_IP);
    l3proto = eth->h_proto;
    // 802.1ad outer and 802.1Q inner tags (an offloaded tag is not in the data).
#pragma unroll
    for (int i = 0; i < 2; i++) {
        if (l3proto != bpf_htons(ETH_P_8021Q_) && l3proto != bpf_htons(ETH_P_8021AD_))
            break;
        __be16 *inner = data + off + 2;
        NEED(inner, sizeof(*inner), NOT_IP);
        l3proto = *inner;
        off += 4;
    }

    u32 l3off = off;
    u32 iplen;
    if (l3proto == bpf_htons(ETH_P_IP)) {
        struct iphdr *ip = data + off;
        NEED(ip, sizeof(*ip), MALFORMED);
        if (ip->version != 4 || ip->ihl < 5)
            return MALFORMED;
        key->ip_version = 4;
        __builtin_memcpy(key->src, &ip->saddr, 4);
        __builtin_memcpy(key->dst, &ip->daddr, 4);
        proto = ip->protocol;
        p->ttl = ip->ttl;
        p->tos = ip->tos;
        iplen = bpf_ntohs(ip->tot_len);
        nonfirst = (bpf_ntohs(ip->frag_off) & 0x1FFF) != 0;
        off += ip->ihl * 4;
    } else if (l3proto == bpf_htons(ETH_P_IPV6)) {
        struct ipv6hdr *ip6 = data + off;
        NEED(ip6, sizeof(*ip6), MALFORMED);
        if (ip6->version != 6)
            return MALFORMED;
        key->ip_version = 6;
        __builtin_memcpy(key->src, &ip6->saddr, 16);
        __builtin_memcpy(key->dst, &ip6->daddr, 16);
        proto = ip6->nexthdr;
        p->ttl = ip6->hop_limit;
        p->tos = (ip6->priority << 4) | (ip6->flow_lbl[0] >> 4);
        // BIG TCP: payload length 0 (behind a hop-by-hop jumbo option where the kernel
        // adds one), the length is the skb's.
        iplen = ip6->payload_len ? bpf_ntohs(ip6->payload_len) + sizeof(struct ipv6hdr) : 0;
        off += sizeof(struct ipv6hdr);
#pragma unroll
        for (int i = 0; i < MAX_IPV6_EXT; i++) {
            if (proto != NEXTHDR_HOP && proto != NEXTHDR_ROUTING && proto != NEXTHDR_DEST &&
                proto != NEXTHDR_FRAGMENT && proto != NEXTHDR_AUTH)
                break;
            if (off > MAX_L4_OFFSET)
                break;
            struct ext_hdr_ *x = data + off;
            if ((void *)(x + 1) > end) {
                if (paged && off + sizeof(*x) <= PULL_LEN)
                    return SHORT;
                break;
            }
            if (i == 0 && proto == NEXTHDR_HOP && iplen == 0 && x->hdrlen == 0)
                p->jumbo = 8;  // struct hop_jumbo_hdr, added by GSO/GRO above 64 KB
            if (proto == NEXTHDR_FRAGMENT) {
                struct frag_hdr_ *f = data + off;
                if ((void *)(f + 1) > end) {
                    if (paged && off + sizeof(*f) <= PULL_LEN)
                        return SHORT;
                    break;
                }
                nonfirst = (bpf_ntohs(f->frag_off) & 0xFFF8) != 0;
                off += sizeof(struct frag_hdr_);
            } else if (proto == NEXTHDR_AUTH) {
                off += (x->hdrlen + 2) * 4;
            } else {
                off += (x->hdrlen + 1) * 8;
            }
            proto = x->nexthdr;
            if (nonfirst)
                break;
        }
    } else {
        return NOT_IP;
    }

    // A lying or zero length (BIG TCP) falls back to what the skb holds.
    u32 have = skb->len > l3off ? skb->len - l3off : 0;
    p->len = (iplen == 0 || iplen > have) ? have : iplen;
    key->proto = proto;

    if (!nonfirst && off <= MAX_L4_OFFSET) {
        u8 *l4 = data + off;
        // Ports beyond the linear part are pulled in when they are within reach.
        int reach = paged && off + 14 <= PULL_LEN;
        if (proto == IPPROTO_TCP) {
            if ((void *)(l4 + 14) <= end) {
                key->sport = (l4[0] << 8) | l4[1];
                key->dport = (l4[2] << 8) | l4[3];
                p->flags = l4[13] | ((l4[12] & 1) << 8);
                p->hdrlen = off - l3off + (l4[12] >> 4) * 4;
            } else if (reach) {
                return SHORT;
            }
        } else if (proto == IPPROTO_UDP || proto == IPPROTO_SCTP || proto == IPPROTO_UDPLITE) {
            if ((void *)(l4 + 4) <= end) {
                key->sport = (l4[0] << 8) | l4[1];
                key->dport = (l4[2] << 8) | l4[3];
                p->hdrlen = off - l3off + 8;
            } else if (reach) {
                return SHORT;
            }
        } else if (proto == IPPROTO_ICMP || proto == 58 /* ICMPv6 */) {
            if ((void *)(l4 + 2) <= end)
                key->dport = (l4[0] << 8) | l4[1];
            else if (reach)
                return SHORT;
        }
    }
    return PARSED;
}

// Parses the frame into key and p; PARSED, or NOT_IP or MALFORMED (not counted).
static __always_inline int parse_frame(struct __sk_buff *skb, struct flow_key *key,
                                       struct pkt *p) {
    int v = parse(skb, key, p);
    if (v == SHORT) {
        // The slow path: headers in paged fragments (AF_PACKET TX rings, some GSO/GRO
        // layouts). Pull them into the linear part and parse again from the start.
        u32 len = skb->len < PULL_LEN ? skb->len : PULL_LEN;
        __builtin_memset(key, 0, sizeof(*key));
        __builtin_memset(p, 0, sizeof(*p));
        v = bpf_skb_pull_data(skb, len) ? MALFORMED : parse(skb, key, p);
        if (v == SHORT)  // still short after the pull: the frame itself is cut short
            v = MALFORMED;
    }
    return v;
}

// Counts a parsed packet under key (ifindex and direction set); 1 when the flow map had
// no room for it.
static __always_inline int count(struct __sk_buff *skb, struct flow_key *key,
                                 struct pkt *p) {
    p->segs = 1;
    // A GRO super-packet (made by NAPI, which marks its id on the skb; a TSO packet from a
    // local socket carries none): the veth counted its segments, each with its headers.
    if (skb->napi_id) {  // one load on the common path: most veth skbs carry none
        u32 segs = skb->gso_segs;
        if (segs > 1) {
            p->segs = segs;
            // The segments carried no jumbo option: GRO added it to the super-packet.
            p->len += (segs - 1) * (p->hdrlen - p->jumbo) - p->jumbo;
        }
    }
    p->now = bpf_jiffies64();  // 2 ns; bpf_ktime_get_coarse_ns() costs 15
    return account(key, p);
}

// Whether an entry point counted this packet's flow (key as the egress would count it):
// in either flow map, or in an overflow entry when they had no room (entry_overflowed).
static __always_inline int counted_at_entry(struct flow_key *key) {
    key->direction = DIR_ENTRY;
    int seen = flows_a.lookup(key) || flows_b.lookup(key) || entry_overflowed.lookup(key);
    key->direction = 1;
    return seen;
}

// The key of the packet's destination address in pod_addrs and pod_side.
static __always_inline void dst_key(struct addr_key *a, const struct flow_key *key) {
    a->ip_version = key->ip_version;
    __builtin_memcpy(a->addr, key->dst, 16);
}

// The pod end of the veth `host` counts packets for this address (POD_SIDE).
static __always_inline int at_pod_end(const struct addr_key *a, u32 host) {
    struct pod_end *e = pod_side.lookup(a);
    return e && e->host == host;
}

// The pod end of the veth `host` counts packets for the key's destination (POD_SIDE).
static __always_inline int to_pod_end(const struct flow_key *key, u32 host) {
    struct addr_key a = {};
    dst_key(&a, key);
    return at_pod_end(&a, host);
}

static __always_inline int classify(struct __sk_buff *skb, u8 direction, int from_entry) {
    struct flow_key key = {};
    struct pkt p = {};
    int v = parse_frame(skb, &key, &p);
    if (v != PARSED) {
        stat_inc(v == NOT_IP ? STAT_NOT_IP : STAT_MALFORMED);
        return TC_ACT_UNSPEC;
    }
    key.ifindex = skb->ifindex;
    key.direction = direction;
#ifdef POD_SIDE
    if (direction == 1 && to_pod_end(&key, key.ifindex))
        return TC_ACT_UNSPEC;  // counted at the pod's end of the veth
#endif
    if (from_entry && counted_at_entry(&key)) {
        stat_inc(STAT_DEDUP);
        return TC_ACT_UNSPEC;
    }
    count(skb, &key, &p);
    return TC_ACT_UNSPEC;
}

int cniflow_ingress(struct __sk_buff *skb) { return classify(skb, 0, 0); }
#ifdef POD_SIDE
// A packet from a metered pod on its way to a pod end: the pod end must not count it.
static __always_inline void mark_from_sender(struct __sk_buff *skb) {
    struct flow_key key = {};
    struct pkt p = {};
    if (parse_frame(skb, &key, &p) != PARSED)
        return;
    key.ifindex = skb->ifindex;
    key.direction = 1;
    if (to_pod_end(&key, key.ifindex) && !from_sender.lookup(&key)) {
        u8 one = 1;
        from_sender.update(&key, &one);
    }
}
#endif

int cniflow_egress(struct __sk_buff *skb) {
    u32 from = skb->ingress_ifindex;
    if (!from)  // from this host: no entry point nor metered pod saw it
        return classify(skb, 1, 0);
    u32 *m = metered.lookup(&from);
    if (m && *m == METERED_POD) {  // entered through a metered pod: counted there
#ifdef POD_SIDE
        mark_from_sender(skb);
#endif
        stat_inc(STAT_DEDUP);
        return TC_ACT_UNSPEC;
    }
    return classify(skb, 1, m != 0);  // an entry point, or a device stacked on one
}

#ifdef NAT_TYPE
// A reply to a masqueraded connection (TCP, UDP, IPv4): the pod's interface, with the
// key's destination made the pod's address and port (as the pod receives it); 0 if none.
static __always_inline u32 *masqueraded(struct flow_key *key, struct addr_key *a) {
    int zero = 0;
    if (key->ip_version != 4 || (key->proto != IPPROTO_TCP && key->proto != IPPROTO_UDP))
        return 0;
    void *nat = cilium_nat.lookup(&zero);
    if (!nat)
        return 0;
    struct nat_tuple t = {};
    __builtin_memcpy(&t.daddr, key->dst, 4);
    __builtin_memcpy(&t.saddr, key->src, 4);
    t.dport = bpf_htons(key->dport);
    t.sport = bpf_htons(key->sport);
    t.nexthdr = key->proto;
    t.flags = NAT_DIR_INGRESS;
    struct nat_entry *e = bpf_map_lookup_elem(nat, &t);
    if (!e)
        return 0;
    __builtin_memcpy(a->addr, &e->to_daddr, 4);
    u32 *veth = pod_addrs.lookup(a);
    if (veth) {
        __builtin_memcpy(key->dst, &e->to_daddr, 4);
        key->dport = bpf_ntohs(e->to_dport);
    }
    return veth;
}
#endif

// At an entry point's ingress: a packet for a metered pod, as its veth's egress. The
// node's own traffic, and what is not IP, is none of cniflow's business here.
int cniflow_entry(struct __sk_buff *skb) {
    struct flow_key key = {};
    struct pkt p = {};
    struct addr_key a = {};
    if (parse_frame(skb, &key, &p) != PARSED)
        return TC_ACT_UNSPEC;
    dst_key(&a, &key);
    u32 *veth = pod_addrs.lookup(&a);
#ifdef NAT_TYPE
    if (!veth)
        veth = masqueraded(&key, &a);
#endif
    if (!veth)
        return TC_ACT_UNSPEC;
#ifdef POD_SIDE
    if (at_pod_end(&a, *veth))  // the pod's address (masqueraded: too): counted at the
        return TC_ACT_UNSPEC;   // pod's end of the veth
#endif
    key.ifindex = *veth;
    key.direction = DIR_ENTRY;
    if (count(skb, &key, &p) && !entry_overflowed.lookup(&key)) {  // in an overflow
        u8 one = 1;                                    // entry: the veth's egress must know
        entry_overflowed.update(&key, &one);
    }
    return TC_ACT_UNSPEC;
}

// At a metered pod's end of its veth (TCX ingress in the pod's namespace, --pod-side): a
// packet for one of the pod's addresses, as the host side's egress. Not one a metered pod
// of this node sent (dedup): counted at that sender's veth. Frames not parsed are left to
// the host side's stats (those that crossed it are counted there).
int cniflow_pod(struct __sk_buff *skb) {
    struct flow_key key = {};
    struct pkt p = {};
    struct addr_key a = {};
    if (parse_frame(skb, &key, &p) != PARSED)
        return TC_ACT_UNSPEC;
    dst_key(&a, &key);
    struct pod_end *e = pod_side.lookup(&a);
    if (!e || e->peer != skb->ifindex)  // not this pod's address: the host side counts it
        return TC_ACT_UNSPEC;
    struct ethhdr *eth = (void *)(long)skb->data;
    if ((void *)(eth + 1) > (void *)(long)skb->data_end)
        return TC_ACT_UNSPEC;
    u8 other = 0;
#pragma unroll
    for (int i = 0; i < 6; i++)
        other |= eth->h_dest[i] ^ e->mac[i];
    if (other)  // for another pod, through this one (a router's): its host side counts it
        return TC_ACT_UNSPEC;
    key.ifindex = e->host;
    key.direction = 1;
    if (from_sender.lookup(&key))  // crossed the host side from a metered pod of the node
        return TC_ACT_UNSPEC;
    __builtin_memcpy(a.addr, key.src, 16);
    u32 *sender = pod_addrs.lookup(&a);
    if (sender) {  // one put past the host side: its source says who sent it
        u32 *m = metered.lookup(sender);
        if (m && *m == METERED_POD)  // the host side said so in STAT_DEDUP, if it crossed it
            return TC_ACT_UNSPEC;
    }
    count(skb, &key, &p);
    return TC_ACT_UNSPEC;
}

// Run by user space (BPF_PROG_TEST_RUN) to read the jiffies the flow times are in.
int cniflow_jiffies(struct __sk_buff *skb) { return (u32)bpf_jiffies64(); }
