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
// Compile-time parameters (cflags): MAP_SIZE; SHARED_MAP for one hash shared by all
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
    STAT_MAP_FULL = 0,    // inserts refused: the map holds MAP_SIZE flows
    STAT_NOT_IP = 1,      // frames that are not IPv4 or IPv6: passed on, not counted
    STAT_MALFORMED = 2,   // truncated or invalid IP headers: passed on, not counted
    STAT_MAX = 3,
};

struct flow_key {
    u32 ifindex;
    u8 direction;   // 0: TC ingress of the interface, 1: TC egress
    u8 ip_version;  // 4 or 6
    u8 proto;
    u8 pad0;
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

#ifdef SHARED_MAP
// one value for all CPUs: counters added atomically, the rest last-writer-wins
BPF_HASH(flows_a, struct flow_key, struct flow_val, MAP_SIZE);
BPF_HASH(flows_b, struct flow_key, struct flow_val, MAP_SIZE);
#else
BPF_PERCPU_HASH(flows_a, struct flow_key, struct flow_val, MAP_SIZE);
BPF_PERCPU_HASH(flows_b, struct flow_key, struct flow_val, MAP_SIZE);
#endif
BPF_ARRAY(slot, u32, 1);
BPF_PERCPU_ARRAY(stats, u64, STAT_MAX);

struct pkt {
    u64 now;
    u32 len;
    u16 flags;
    u8 ttl;
    u8 tos;
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
    __sync_fetch_and_add(&v->packets, 1);
    __sync_fetch_and_add(&v->octets, p->len);
#else
    if (v->packets == 0) {
        v->first = p->now;
        v->min_ttl = p->ttl;
    }
    v->packets += 1;
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

static __always_inline void start(struct flow_val *v, const struct pkt *p) {
    v->packets = 1;
    v->octets = p->len;
    v->first = p->now;
    v->last = p->now;
    v->tcp_flags = p->flags;
    v->min_ttl = p->ttl;
    v->max_ttl = p->ttl;
    v->tos = p->tos;
}

// After inserting a new flow: 1 when done (inserted, or the map is full and that is
// counted), 0 when another CPU inserted the key first and it must be looked up again.
static __always_inline int inserted(int err) {
    if (err == -17 /* EEXIST */)
        return 0;
    if (err)
        stat_inc(STAT_MAP_FULL);
    return 1;
}

static __always_inline void fold_or_count(struct flow_val *v, const struct pkt *p) {
    if (v)
        fold(v, p);
    else
        stat_inc(STAT_MAP_FULL);
}

// One function per map, not `b ? flows_b.lookup(k) : flows_a.lookup(k)`: LLVM merges
// that into one call site reached with either map, and for such a site the verifier
// cannot inline the hash lookup (an indirect call per packet: 16 of the 72 ns the
// program cost). tests/test_metering.py checks that every map call site has one map.
static __always_inline void account_a(struct flow_key *key, const struct pkt *p) {
    struct flow_val *v = flows_a.lookup(key);
    if (!v) {
        struct flow_val init = {};  // a new flow: built only now
        start(&init, p);
        if (inserted(flows_a.insert(key, &init)))
            return;
        v = flows_a.lookup(key);
    }
    fold_or_count(v, p);
}

static __always_inline void account_b(struct flow_key *key, const struct pkt *p) {
    struct flow_val *v = flows_b.lookup(key);
    if (!v) {
        struct flow_val init = {};
        start(&init, p);
        if (inserted(flows_b.insert(key, &init)))
            return;
        v = flows_b.lookup(key);
    }
    fold_or_count(v, p);
}

static __always_inline void account(struct flow_key *key, const struct pkt *p) {
    int zero = 0;
    u32 *s = slot.lookup(&zero);
    if (s && *s)
        account_b(key, p);
    else
        account_a(key, p);
}

static __always_inline int classify(struct __sk_buff *skb, u8 direction) {
    void *data = (void *)(long)skb->data;
    void *end = (void *)(long)skb->data_end;
    struct flow_key key = {};
    struct pkt p = {};
    u32 off = sizeof(struct ethhdr);
    u16 l3proto;
    u8 proto;
    int nonfirst = 0;

    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > end) {
        stat_inc(STAT_NOT_IP);
        return TC_ACT_UNSPEC;
    }
    l3proto = eth->h_proto;
    // 802.1ad outer and 802.1Q inner tags (an offloaded tag is not in the data).
#pragma unroll
    for (int i = 0; i < 2; i++) {
        if (l3proto != bpf_htons(ETH_P_8021Q_) && l3proto != bpf_htons(ETH_P_8021AD_))
            break;
        __be16 *inner = data + off + 2;
        if ((void *)(inner + 1) > end) {
            stat_inc(STAT_NOT_IP);
            return TC_ACT_UNSPEC;
        }
        l3proto = *inner;
        off += 4;
    }

    u32 l3off = off;
    u32 iplen;
    if (l3proto == bpf_htons(ETH_P_IP)) {
        struct iphdr *ip = data + off;
        if ((void *)(ip + 1) > end || ip->version != 4 || ip->ihl < 5) {
            stat_inc(STAT_MALFORMED);
            return TC_ACT_UNSPEC;
        }
        key.ip_version = 4;
        __builtin_memcpy(key.src, &ip->saddr, 4);
        __builtin_memcpy(key.dst, &ip->daddr, 4);
        proto = ip->protocol;
        p.ttl = ip->ttl;
        p.tos = ip->tos;
        iplen = bpf_ntohs(ip->tot_len);
        nonfirst = (bpf_ntohs(ip->frag_off) & 0x1FFF) != 0;
        off += ip->ihl * 4;
    } else if (l3proto == bpf_htons(ETH_P_IPV6)) {
        struct ipv6hdr *ip6 = data + off;
        if ((void *)(ip6 + 1) > end || ip6->version != 6) {
            stat_inc(STAT_MALFORMED);
            return TC_ACT_UNSPEC;
        }
        key.ip_version = 6;
        __builtin_memcpy(key.src, &ip6->saddr, 16);
        __builtin_memcpy(key.dst, &ip6->daddr, 16);
        proto = ip6->nexthdr;
        p.ttl = ip6->hop_limit;
        p.tos = (ip6->priority << 4) | (ip6->flow_lbl[0] >> 4);
        iplen = bpf_ntohs(ip6->payload_len) + sizeof(struct ipv6hdr);
        off += sizeof(struct ipv6hdr);
#pragma unroll
        for (int i = 0; i < MAX_IPV6_EXT; i++) {
            if (proto != NEXTHDR_HOP && proto != NEXTHDR_ROUTING && proto != NEXTHDR_DEST &&
                proto != NEXTHDR_FRAGMENT && proto != NEXTHDR_AUTH)
                break;
            if (off > MAX_L4_OFFSET)
                break;
            struct ext_hdr_ *x = data + off;
            if ((void *)(x + 1) > end)
                break;
            if (proto == NEXTHDR_FRAGMENT) {
                struct frag_hdr_ *f = data + off;
                if ((void *)(f + 1) > end)
                    break;
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
        stat_inc(STAT_NOT_IP);
        return TC_ACT_UNSPEC;
    }

    // A lying or zero length (BIG TCP) falls back to what the skb holds.
    u32 have = skb->len > l3off ? skb->len - l3off : 0;
    p.len = (iplen == 0 || iplen > have) ? have : iplen;
    key.proto = proto;
    key.ifindex = skb->ifindex;
    key.direction = direction;

    if (!nonfirst && off <= MAX_L4_OFFSET) {
        u8 *l4 = data + off;
        if (proto == IPPROTO_TCP) {
            if ((void *)(l4 + 14) <= end) {
                key.sport = (l4[0] << 8) | l4[1];
                key.dport = (l4[2] << 8) | l4[3];
                p.flags = l4[13] | ((l4[12] & 1) << 8);
            }
        } else if (proto == IPPROTO_UDP || proto == IPPROTO_SCTP || proto == IPPROTO_UDPLITE) {
            if ((void *)(l4 + 4) <= end) {
                key.sport = (l4[0] << 8) | l4[1];
                key.dport = (l4[2] << 8) | l4[3];
            }
        } else if (proto == IPPROTO_ICMP || proto == 58 /* ICMPv6 */) {
            if ((void *)(l4 + 2) <= end)
                key.dport = (l4[0] << 8) | l4[1];
        }
    }

    p.now = bpf_jiffies64();  // 2 ns; bpf_ktime_get_coarse_ns() costs 15
    account(&key, &p);
    return TC_ACT_UNSPEC;
}

int cniflow_ingress(struct __sk_buff *skb) { return classify(skb, 0); }
int cniflow_egress(struct __sk_buff *skb) { return classify(skb, 1); }

// Run by user space (BPF_PROG_TEST_RUN) to read the jiffies the flow times are in.
int cniflow_jiffies(struct __sk_buff *skb) { return (u32)bpf_jiffies64(); }
