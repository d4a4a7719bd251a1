/* txring: send UDP/IPv4 frames through an AF_PACKET TX ring (PACKET_MMAP), the way
 * load generators and packet-processing apps do. The kernel builds such skbs with
 * only the link-layer header in the linear part and the rest in page fragments
 * pointing into the ring: the layout cniflow's program must parse beyond direct
 * packet access.
 *
 * usage: txring DEV DSTMAC SRCIP DSTIP FLOWS COUNT PAYLOAD
 * Sends COUNT frames (as fast as the ring drains), frame i in flow i % FLOWS (flow j:
 * destination port 1 + j % 60000, source port 1024 + j / 60000; FLOWS = COUNT makes
 * every frame a new flow, a port scan's or a flood's shape). Prints "frames bytes seconds" (bytes: what the
 * interface's tx counter should grow by, Ethernet header included). */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <linux/if_packet.h>
#include <net/ethernet.h>
#include <net/if.h>
#include <netinet/ip.h>
#include <netinet/udp.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define FRAME_SIZE 2048
#define FRAMES 1024

static unsigned short csum(const void *p, int n) {
    const unsigned short *w = p;
    unsigned long s = 0;
    for (; n > 1; n -= 2) s += *w++;
    if (n) s += *(const unsigned char *)w;
    while (s >> 16) s = (s & 0xffff) + (s >> 16);
    return ~s;
}

int main(int argc, char **argv) {
    if (argc != 8) {
        fprintf(stderr, "usage: txring DEV DSTMAC SRCIP DSTIP FLOWS COUNT PAYLOAD\n");
        return 2;
    }
    const char *dev = argv[1];
    unsigned char dst[6], src[6];
    sscanf(argv[2], "%hhx:%hhx:%hhx:%hhx:%hhx:%hhx", &dst[0], &dst[1], &dst[2], &dst[3],
           &dst[4], &dst[5]);
    int flows = atoi(argv[5]), payload = atoi(argv[7]);
    long count = atol(argv[6]);
    int fd = socket(AF_PACKET, SOCK_RAW, 0);
    if (fd < 0) { perror("socket"); return 1; }
    struct ifreq ifr = {0};
    strncpy(ifr.ifr_name, dev, IFNAMSIZ - 1);
    if (ioctl(fd, SIOCGIFHWADDR, &ifr) < 0) { perror("SIOCGIFHWADDR"); return 1; }
    memcpy(src, ifr.ifr_hwaddr.sa_data, 6);
    int v = TPACKET_V2;
    if (setsockopt(fd, SOL_PACKET, PACKET_VERSION, &v, sizeof v) < 0) { perror("version"); return 1; }
    struct tpacket_req req = {.tp_block_size = 4096 * 16, .tp_frame_size = FRAME_SIZE,
                              .tp_frame_nr = FRAMES};
    req.tp_block_nr = FRAMES * FRAME_SIZE / req.tp_block_size;
    if (setsockopt(fd, SOL_PACKET, PACKET_TX_RING, &req, sizeof req) < 0) { perror("ring"); return 1; }
    struct sockaddr_ll ll = {.sll_family = AF_PACKET, .sll_protocol = htons(ETH_P_IP),
                             .sll_ifindex = if_nametoindex(dev), .sll_halen = 6};
    memcpy(ll.sll_addr, dst, 6);
    if (bind(fd, (struct sockaddr *)&ll, sizeof ll) < 0) { perror("bind"); return 1; }
    size_t size = (size_t)req.tp_block_size * req.tp_block_nr;
    unsigned char *ring = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (ring == MAP_FAILED) { perror("mmap"); return 1; }

    int len = sizeof(struct ether_header) + sizeof(struct iphdr) + sizeof(struct udphdr) + payload;
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    long sent = 0, next = 0;
    while (sent < count) {
        struct tpacket2_hdr *h = (void *)(ring + (next % FRAMES) * FRAME_SIZE);
        if (h->tp_status != TP_STATUS_AVAILABLE) {  /* ring full: let the kernel drain it */
            if (send(fd, NULL, 0, 0) < 0) { perror("send"); return 1; }
            struct pollfd p = {fd, POLLOUT, 0};
            poll(&p, 1, 10);
            continue;
        }
        unsigned char *f = (unsigned char *)h + TPACKET2_HDRLEN - sizeof(struct sockaddr_ll);
        struct ether_header *eth = (void *)f;
        memcpy(eth->ether_dhost, dst, 6);
        memcpy(eth->ether_shost, src, 6);
        eth->ether_type = htons(ETH_P_IP);
        struct iphdr *ip = (void *)(eth + 1);
        memset(ip, 0, sizeof *ip);
        ip->version = 4; ip->ihl = 5; ip->ttl = 64; ip->protocol = IPPROTO_UDP;
        ip->tot_len = htons(len - sizeof *eth);
        ip->frag_off = htons(IP_DF);
        inet_pton(AF_INET, argv[3], &ip->saddr);
        inet_pton(AF_INET, argv[4], &ip->daddr);
        ip->check = csum(ip, sizeof *ip);
        struct udphdr *udp = (void *)(ip + 1);
        long j = sent % flows;
        udp->source = htons(1024 + j / 60000);
        udp->dest = htons(1 + j % 60000);
        udp->len = htons(sizeof *udp + payload);
        udp->check = 0;
        memset(udp + 1, 0, payload);
        h->tp_len = len;
        h->tp_status = TP_STATUS_SEND_REQUEST;
        sent++;
        next++;
        if (next % 256 == 0 && send(fd, NULL, 0, MSG_DONTWAIT) < 0) { /* ring busy: later */ }
    }
    for (;;) {  /* flush and wait until the kernel took every frame */
        send(fd, NULL, 0, 0);
        int busy = 0;
        for (int i = 0; i < FRAMES; i++) {
            struct tpacket2_hdr *h = (void *)(ring + i * FRAME_SIZE);
            if (h->tp_status == TP_STATUS_SEND_REQUEST || h->tp_status == TP_STATUS_SENDING) busy = 1;
        }
        if (!busy) break;
        usleep(1000);
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    printf("%ld %ld %.6f\n", sent, sent * len,
           (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9);
    return 0;
}
