/* udpflood: send small UDP datagrams as fast as one core can, round-robin over
 * many destination ports (so many flows), with sendmmsg. Prints packets sent.
 * usage: udpflood DST_IPV4 FLOWS SECONDS PAYLOAD */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>

#define BATCH 64

int main(int argc, char **argv) {
    if (argc != 5) { fprintf(stderr, "usage: udpflood DST FLOWS SECONDS PAYLOAD\n"); return 2; }
    int flows = atoi(argv[2]), payload = atoi(argv[4]);
    double seconds = atof(argv[3]);
    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    int sndbuf = 4 << 20;
    setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof sndbuf);
    struct sockaddr_in *dst = calloc(flows, sizeof *dst);
    for (int i = 0; i < flows; i++) {
        dst[i].sin_family = AF_INET;
        dst[i].sin_port = htons(10000 + i);
        inet_pton(AF_INET, argv[1], &dst[i].sin_addr);
    }
    char buf[2048] = {0};
    struct iovec iov[BATCH];
    struct mmsghdr msgs[BATCH];
    memset(msgs, 0, sizeof msgs);
    for (int i = 0; i < BATCH; i++) {
        iov[i].iov_base = buf;
        iov[i].iov_len = payload;
        msgs[i].msg_hdr.msg_iov = &iov[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
        msgs[i].msg_hdr.msg_namelen = sizeof(struct sockaddr_in);
    }
    struct timespec t0, t;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    long sent = 0;
    int next = 0;
    for (;;) {
        for (int i = 0; i < BATCH; i++) {
            msgs[i].msg_hdr.msg_name = &dst[next];
            next = (next + 1) % flows;
        }
        int n = sendmmsg(fd, msgs, BATCH, 0);
        if (n > 0) sent += n;
        clock_gettime(CLOCK_MONOTONIC, &t);
        double el = (t.tv_sec - t0.tv_sec) + (t.tv_nsec - t0.tv_nsec) / 1e9;
        if (el >= seconds) { printf("%ld %.6f\n", sent, el); return 0; }
    }
}
