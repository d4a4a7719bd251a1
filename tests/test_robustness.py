"""Coexistence with a CNI's tc filters, bad input, and a collector that is away."""

from __future__ import annotations

import os
import struct
import subprocess
import time

import pytest
from conftest import CNIFLOW, agent, filters, tcx_programs, wait_for
from test_metering import ping, send_udp

CNI_LIKE = """
#include <uapi/linux/pkt_cls.h>
BPF_ARRAY(count, u64, 1);
int cni(struct __sk_buff *skb) {
    int k = 0;
    u64 *c = count.lookup(&k);
    if (c)
        __sync_fetch_and_add(c, 1);
    return TC_ACT_OK;  /* a CNI's verdict: pass, and nothing after it runs */
}
"""


@pytest.mark.parametrize("mode", ["tcx", "tc"])
def test_a_filter_added_before_cniflow_keeps_seeing_every_packet_and_survives_it(node, mode):
    """A CNI's own direct-action program, with its own counter, at another priority:
    cniflow's TCX link runs before it and says "next"; its cls_bpf filter runs beside it."""
    from bcc import BPF
    from pyroute2 import IPRoute

    a, b = node.pods
    cni = BPF(text=CNI_LIKE)
    fn = cni.load_func("cni", BPF.SCHED_CLS)
    with IPRoute(netns=node.netns) as ipr:
        idx = ipr.link_lookup(ifname=a.host_if)[0]
        ipr.tc("add", "clsact", idx)
        ipr.tc("add-filter", "bpf", idx, 7, fd=fn.fd, name="cni", parent=0xFFFFFFF2, prio=100,
               classid=1, direct_action=True)
    seen = lambda: cni["count"][0].value  # noqa: E731

    def both() -> tuple[int, int]:
        """The CNI's count and the veth's rx counter at one instant: a stray frame (the
        pod's IPv6 neighbour discovery) between two readings would tell them apart."""
        while True:
            rx = node.link_stats(a.host_if)["rx_packets"]
            time.sleep(0.05)  # a frame the veth counted has left its backlog
            count = seen()
            if node.link_stats(a.host_if)["rx_packets"] == rx:
                return count, rx

    with agent(node, "--attach", mode):
        before, rx0 = both()
        ping(node, 0, b.ipv4, 5)
        send_udp(node, 0, b.ipv4, 9500, count=20, size=30)
        time.sleep(0.3)  # the last frames may still wait in the veth's backlog
        after, rx1 = both()
        assert after - before == rx1 - rx0 >= 25
        assert "cniflow_ingress" in filters(node, a.host_if)
    remaining = filters(node, a.host_if)
    assert "cni" in remaining and "cniflow" not in remaining
    qdiscs = subprocess.run(node.exec(f"tc qdisc show dev {a.host_if}").split(),
                            capture_output=True, text=True).stdout
    assert "clsact" in qdiscs  # not ours: left alone
    ping(node, 0, b.ipv4, 2)
    assert seen() - after >= 2  # and it still works
    # on the other veth the qdisc was cniflow's own, and it is gone
    assert "clsact" not in subprocess.run(node.exec(f"tc qdisc show dev {b.host_if}").split(),
                                          capture_output=True, text=True).stdout
    cni.cleanup()


def run_cli(node, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", node.netns, str(CNIFLOW), "agent", *args],
                          capture_output=True, text=True, timeout=60)


def test_bad_input_is_one_clear_line_exit_2_and_attaches_nothing(node):
    a = node.pods[0]
    cases = {
        ("--interface", a.host_if, "--bogus"): "unrecognized arguments: --bogus",
        ("--interface", "nosuch0"): "no such interface: nosuch0",
        ("--interface", a.host_if, "--collector", "nowhere.invalid:4739"): "does not resolve",
        ("--interface", a.host_if, "--collector", "127.0.0.1"): "--collector",
        ("--interface", a.host_if, "--idle-timeout", "0"): "--idle-timeout",
        ("--interface", a.host_if, "--transport", "sctp"): "must be one of udp, tcp",
        ("--interface", a.host_if, "--entry-points", "eth0,auto"): "--entry-points",
        ("--interface", a.host_if, "--entry-points", "eth0,,eth1"): "--entry-points",
        ("--interface", a.host_if, "--entry-points", "a/b"): "--entry-points",
        (): "nothing to meter",
    }
    for args, message in cases.items():
        r = run_cli(node, *args)
        assert r.returncode == 2, (args, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (args, r.stderr)
        assert "cniflow" not in filters(node, a.host_if)


def test_a_sigterm_while_the_agent_starts_stops_it_cleanly(node, tmp_path):
    """The kubelet may stop a pod that is still starting (a rollout, a node drain). A
    SIGTERM that comes while the agent loads its program (seconds on a slow node) ends
    it cleanly once it is up: exit 0, "agent stopped", nothing left on the hooks; not the
    signal's default action halfway through."""
    a = node.pods[0]
    log = tmp_path / "agent.log"
    proc = subprocess.Popen(["ip", "netns", "exec", node.netns, str(CNIFLOW), "agent",
                             "--interface", f"{node.prefix}v*", "--pin-path", "off",
                             "--metrics-address", "off"], stderr=log.open("w"))
    try:
        caught = 1 << (15 - 1)  # SIGTERM in /proc's SigCgt mask
        assert wait_for(lambda: proc.poll() is None and int(next(
            x for x in open(f"/proc/{proc.pid}/status") if x.startswith("SigCgt:")
        ).split()[1], 16) & caught, 30, 0.005), log.read_text()
        proc.terminate()
        at_signal = log.read_text()
        assert proc.wait(60) == 0, log.read_text()
    finally:
        proc.kill()
        proc.wait()
    assert '"program loaded"' not in at_signal  # the handler was in before the start-up
    assert '"agent stopped"' in log.read_text(), log.read_text()
    assert "cniflow" not in filters(node, a.host_if, "ingress") + \
        filters(node, a.host_if, "egress")


def test_a_dead_udp_collector_is_counted_never_fatal(node):
    a, b = node.pods
    with agent(node, "--idle-timeout", "0.5", collector="127.0.0.1:4999") as running:
        for _ in range(3):
            ping(node, 0, b.ipv4, 2)
            time.sleep(1)
        errors = wait_for(lambda: running.metrics().get("cniflow_export_errors_total"), 5)
        assert errors and errors > 0
        assert running.proc.poll() is None


def test_over_tcp_the_agent_waits_for_the_collector_then_delivers_with_templates(node):
    a, b = node.pods
    with agent(node, "--transport", "tcp", "--idle-timeout", "0.5",
               collector="127.0.0.1:4799") as running:
        ping(node, 0, b.ipv4, 3)  # the collector is not there yet: metering goes on
        time.sleep(1.5)
        assert running.metrics()["cniflow_export_backlog_records"] > 0
        listener = subprocess.Popen(  # the collector appears, in the node namespace
            ["ip", "netns", "exec", node.netns, "/usr/bin/python3", "-c",
             "import socket,sys;s=socket.socket();s.setsockopt(1,2,1);"
             "s.bind(('127.0.0.1',4799));s.listen();c,_=s.accept();c.settimeout(8)\n"
             "try:\n  while True:\n    d=c.recv(65536)\n    if not d: break\n"
             "    sys.stdout.buffer.write(d);sys.stdout.flush()\nexcept OSError: pass"],
            stdout=subprocess.PIPE)
        assert wait_for(lambda: running.metrics()["cniflow_export_backlog_records"] == 0, 40)
    data = listener.communicate(timeout=20)[0]
    msgs, off = [], 0
    while off + 16 <= len(data):
        length = struct.unpack("!H", data[off + 2:off + 4])[0]
        msgs.append(data[off:off + length])
        off += length
    assert off == len(data) and msgs
    first_set = struct.unpack("!H", msgs[0][16:18])[0]
    assert first_set in (2, 3)  # templates first on the new connection
    assert struct.unpack("!I", msgs[0][8:12])[0] == 0  # sequence restarts per session
    records = sum(1 for _ in msgs[1:])
    assert records >= 1


def test_a_restarted_agent_replaces_what_an_earlier_one_left(node, tmp_path):
    """An agent killed with SIGKILL leaves its cls_bpf filters; another still running (a
    rolling update) holds TCX links. A new agent replaces both: one cniflow program per
    hook, every packet counted once, and nothing of cniflow's left when it stops."""
    import signal
    import socket as sock

    import oracles
    from fakeapi import in_netns

    from bpf import syscall
    from bpf.program import FlowProgram

    a, b = node.pods
    with agent(node, "--attach", "tc") as killed:
        killed.proc.send_signal(signal.SIGKILL)
        killed.proc.wait()
    assert "cniflow_ingress" in filters(node, a.host_if).split("tcx:")[0]  # left behind
    older = FlowProgram(1024)  # an earlier cniflow, still running, its links on a's hooks
    ifindex = in_netns(node.netns, lambda: sock.if_nametoindex(a.host_if))
    links = [in_netns(node.netns, lambda h=h, p=p: syscall.link_create(p.fd, ifindex, h))
             for h, p in ((syscall.TCX_INGRESS, older.ingress),
                          (syscall.TCX_EGRESS, older.egress))]
    assert tcx_programs(node.netns, a.host_if) == ["cniflow_ingress"]
    tshark = oracles.Tshark(node.netns, 4739)
    try:
        with agent(node, "--idle-timeout", "1", wait_attached=False) as running:
            # (what was left would satisfy a wait on the hooks: wait for the log instead)
            assert wait_for(lambda: running.log.read_text().count('"msg": "attached"') == 2,
                            30), running.log.read_text()
            for parent in ("ingress", "egress"):
                hooks = filters(node, a.host_if, parent)
                assert "cniflow" not in hooks.split("tcx:")[0], hooks  # no filter of ours
                assert hooks.split("tcx:")[1].split() == [f"cniflow_{parent}"], hooks
            send_udp(node, 0, b.ipv4, 9800, count=5, size=20)
            time.sleep(2)
        tshark.stop()
        assert sum(r["packets"] for r in tshark.records() if r["dport"] == 9800) == 5
        for p in node.pods:
            for parent in ("ingress", "egress"):
                assert "cniflow" not in filters(node, p.host_if, parent)
    finally:
        for fd in links:
            os.close(fd)
        older.close()


def test_a_refused_attach_is_tried_again_with_backoff(node):
    """The kernel refuses cniflow's link while the TCX chain is full (64 programs): the
    attach is counted, tried again after 1, 2, 4 ... s, and succeeds once there is room."""
    import errno
    import socket as sock

    from bcc import BPF
    from fakeapi import in_netns

    from bpf import syscall

    a, b = node.pods
    src = "".join(f"int p{i}(struct __sk_buff *skb) {{ return -1; }}\n" for i in range(64))
    progs = BPF(text=src.encode(), cflags=["-w"])
    fns = [progs.load_func(f"p{i}".encode(), BPF.SCHED_CLS) for i in range(64)]
    ifindex = in_netns(node.netns, lambda: sock.if_nametoindex(a.host_if))
    links: list[int] = []
    for f in fns:  # until the kernel says the chain is full
        try:
            links.append(in_netns(node.netns, lambda f=f: syscall.link_create(
                f.fd, ifindex, syscall.TCX_INGRESS, 0)))
        except OSError as e:
            assert e.errno == errno.ERANGE, e
            break
    assert len(links) >= 60
    try:
        with agent(node, "--attach", "tcx", interfaces=(a.host_if,),
                   wait_attached=False) as running:
            assert wait_for(lambda: running.metrics().get(
                "cniflow_attach_failures_total", 0) >= 2, 15), running.log.read_text()
            assert "cniflow_ingress" not in tcx_programs(node.netns, a.host_if)
            os.close(links.pop())  # room for one
            assert wait_for(lambda: "cniflow_ingress" in tcx_programs(node.netns, a.host_if),
                            15), running.log.read_text()
            assert tcx_programs(node.netns, a.host_if)[0] == "cniflow_ingress"
            log = running.log.read_text()
            assert '"retry_in_s": 1.0' in log and '"retry_in_s": 2.0' in log, log
    finally:
        for fd in links:
            os.close(fd)
        progs.cleanup()


LOSSY = """
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/in.h>
BPF_ARRAY(on, u32, 1);
int lossy(struct __sk_buff *skb) {  /* loopback: drop TCP segments to port 4739 while on */
    int k = 0;
    u32 *v = on.lookup(&k);
    void *data = (void *)(long)skb->data, *end = (void *)(long)skb->data_end;
    struct iphdr *ip = data + sizeof(struct ethhdr);
    struct tcphdr *tcp = (void *)(ip + 1);
    if (!v || !*v || (void *)(tcp + 1) > end || ip->protocol != IPPROTO_TCP)
        return TC_ACT_UNSPEC;
    return tcp->dest == __constant_htons(4739) ? TC_ACT_SHOT : TC_ACT_UNSPEC;
}
"""


def test_records_in_a_connection_that_breaks_unacknowledged_are_sent_again(node):
    """Over TCP a record counts as exported once the collector's kernel acknowledged it.
    The path to the collector loses everything for a while, records are written into the
    connection meanwhile, then the connection is torn down: those records are sent again
    on the next connection, and the collector gets every one exactly once."""
    import socket as sock

    from bcc import BPF
    from fakeapi import in_netns
    from test_collector import RunningCollector

    from bpf import syscall

    a, b = node.pods
    lossy = BPF(text=LOSSY.encode(), cflags=["-w"])
    fn = lossy.load_func(b"lossy", BPF.SCHED_CLS)
    link = in_netns(node.netns, lambda: syscall.link_create(
        fn.fd, sock.if_nametoindex("lo"), syscall.TCX_EGRESS, 0))
    collector = RunningCollector(node.netns, 4739, "tcp")
    try:
        with agent(node, "--transport", "tcp", "--idle-timeout", "0.5") as running:
            send_udp(node, 0, b.ipv4, 9880, count=5, size=10)
            assert wait_for(lambda: [r for r in collector.records()
                                     if r.get("destinationTransportPort") == 9880], 10)
            lossy[b"on"][0] = lossy[b"on"].Leaf(1)  # nothing reaches the collector now
            send_udp(node, 0, b.ipv4, 9881, count=5, size=10)
            assert wait_for(lambda: running.metrics()["cniflow_records_exported_total"] >= 1
                            and _queued(node) > 0, 10)  # written, not acknowledged
            exported = running.metrics()["cniflow_records_exported_total"]
            subprocess.run(node.exec("ss -K dst 127.0.0.1 dport = 4739").split(), check=True,
                           capture_output=True)  # the agent's connection torn down
            lossy[b"on"][0] = lossy[b"on"].Leaf(0)
            send_udp(node, 0, b.ipv4, 9882, count=3, size=10)
            assert wait_for(lambda: running.metrics()["cniflow_records_resent_total"] >= 1, 15)
            assert wait_for(lambda: {9881, 9882} <= {r.get("destinationTransportPort")
                                                     for r in collector.records()}, 15)
            time.sleep(1)
            assert running.metrics()["cniflow_records_exported_total"] >= exported
    finally:
        os.close(link)
        lossy.cleanup()
    rows = collector.stop()
    for port, count in ((9880, 5), (9881, 5), (9882, 3)):
        assert sum(r["packetDeltaCount"] for r in rows
                   if r.get("destinationTransportPort") == port) == count, port


def _queued(node) -> int:
    """Octets waiting in the send queue of the agent's connection to the collector."""
    out = subprocess.run(node.exec("ss -tnH dst 127.0.0.1 dport = 4739").split(),
                         capture_output=True, text=True).stdout.split()
    return int(out[2]) if len(out) > 2 else 0
