/* udpsink: receive UDP datagrams on PORTS consecutive ports from FIRST, as fast as
 * one core can (epoll + recvmmsg), until SIGTERM or SIGINT; prints datagrams read.
 * The receiving end of udpflood, for a path that ends in a socket as pod traffic does.
 * usage: udpsink FIRST PORTS */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#define BATCH 64

static volatile sig_atomic_t stop;
static void on_signal(int sig) { (void)sig; stop = 1; }

int main(int argc, char **argv) {
    if (argc != 3) { fprintf(stderr, "usage: udpsink FIRST PORTS\n"); return 2; }
    int first = atoi(argv[1]), ports = atoi(argv[2]);
    struct sigaction sa = {.sa_handler = on_signal};  /* no SA_RESTART: epoll_wait returns */
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    struct rlimit nofile;  /* a socket a port: the soft limit is often 1024 */
    if (getrlimit(RLIMIT_NOFILE, &nofile) == 0 && nofile.rlim_cur < nofile.rlim_max) {
        nofile.rlim_cur = nofile.rlim_max;
        setrlimit(RLIMIT_NOFILE, &nofile);
    }
    int ep = epoll_create1(0);
    for (int i = 0; i < ports; i++) {
        int fd = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK, 0);
        if (fd < 0) { perror("socket"); return 1; }
        struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(first + i)};
        if (bind(fd, (struct sockaddr *)&a, sizeof a) != 0) { perror("bind"); return 1; }
        struct epoll_event ev = {.events = EPOLLIN, .data.fd = fd};
        epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
    }
    printf("ready\n");
    fflush(stdout);
    static char bufs[BATCH][2048];
    struct iovec iov[BATCH];
    struct mmsghdr msgs[BATCH] = {0};
    for (int i = 0; i < BATCH; i++) {
        iov[i].iov_base = bufs[i];
        iov[i].iov_len = sizeof bufs[i];
        msgs[i].msg_hdr.msg_iov = &iov[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
    }
    struct epoll_event ready[256];
    long got = 0;
    while (!stop) {
        int n = epoll_wait(ep, ready, 256, 200);
        for (int i = 0; i < n; i++) {
            int r;
            while ((r = recvmmsg(ready[i].data.fd, msgs, BATCH, 0, NULL)) > 0)
                got += r;
        }
    }
    printf("%ld\n", got);
    return 0;
}
