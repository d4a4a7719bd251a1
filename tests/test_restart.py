"""Restart without loss: a pod sends numbered datagrams at a steady rate while its agent
is killed (SIGKILL) or handed over (SIGTERM with --handover) and a new one takes the
pinned maps, links and pending flows; the collector's totals equal what crossed the
veth, exactly. A clean SIGTERM leaves no pin and no link behind."""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import time
from pathlib import Path

import netlab
import numpy as np
import oracles
import pytest
from conftest import agent, own_bpffs, tcx_programs, wait_for
from test_collector import RunningCollector
from test_counting import ifindex_of, ingress_totals, settled
from test_metering import PY, pin_neighbours, quiet

_ids = itertools.count()
RATE = 500  # datagrams a second
PORT = 7700

SENDER = """
import socket, struct, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
dst, rate, seconds, ports = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
start, sent = time.monotonic(), 0
while (t := time.monotonic() - start) < seconds:
    while sent < t * rate:
        s.sendto(struct.pack("!Q", sent) + b"x" * 92, (dst, 7700 + sent % ports))
        sent += 1
    time.sleep(0.001)
print(sent)
"""


@pytest.fixture
def lab():
    """Two routed pods, and a bpffs of the test's own (mounted outside /sys, which
    `ip netns exec` replaces): no test adopts another's pins."""
    prefix = f"rst{os.getpid() % 1000}{next(_ids)}"
    node = netlab.up(prefix, 2)
    try:
        with own_bpffs(f"{prefix}-pins") as fs:
            yield node, str(fs / "cniflow")
    finally:
        netlab.down(prefix)


def start_sender(node, seconds: float, ports: int = 1) -> subprocess.Popen:
    code = node.in_pod(0, f"{PY} -c '{SENDER}' {node.pods[1].ipv4} {RATE} {seconds} {ports}")
    return subprocess.Popen(code, shell=True, stdout=subprocess.PIPE, text=True)


def cniflow_links(node, ifname: str) -> list[str]:
    return [n for hook in ("ingress", "egress") for n in tcx_programs(node.netns, ifname, hook)
            if n.startswith("cniflow_")]


def run_through(node, pins: str, stop_first, args: tuple[str, ...], ports: int = 1,
                late_collector: bool = False, oracle: bool = True,
                first_interfaces: tuple[str, ...] | None = None) -> dict:
    """Agent one (with args; first_interfaces: its --interface globs, none for
    --kubernetes) meters the traffic, is stopped by stop_first(agent, collector)
    mid-stream (the collector is None when it starts only after that), agent two takes
    over and is stopped with SIGTERM after the traffic; what was counted and sent."""
    a = node.pods[0]
    pin_neighbours(node, 0)
    quiet(node, a.host_if)
    collector = None if late_collector else RunningCollector(node.netns, 4739, "tcp")
    tshark = oracles.Tshark(node.netns, 4739, proto="tcp") if oracle else None
    # long timeouts: the flow stays in the table, so a restart must carry it over
    common = ("--transport", "tcp", "--pin-path", pins, "--idle-timeout", "30",
              "--active-timeout", "120")
    before = node.link_stats(a.host_if)
    with agent(node, *common, *args, interfaces=first_interfaces) as first:
        sender = start_sender(node, 8.0, ports)
        time.sleep(3)
        stop_first(first, collector)
    log_first = first.log.read_text()
    if collector is None:
        collector = RunningCollector(node.netns, 4739, "tcp")
    time.sleep(1)  # no agent at all: the pinned links and maps go on counting
    with agent(node, *common) as second:
        sent = int(sender.communicate(timeout=30)[0])
        quiet(node, a.host_if)
        log_second = second.log.read_text()
    after = node.link_stats(a.host_if)
    rows = settled(collector)
    packets = after["rx_packets"] - before["rx_packets"]
    return {"sent": sent, "packets": packets, "ports": ports,
            "octets": after["rx_bytes"] - before["rx_bytes"] - 14 * packets,
            "rows": rows, "ifindex": ifindex_of(node, a.host_if),
            "oracle": (tshark.records() if tshark.stop() else []) if tshark else None,
            "logs": (log_first, log_second), "errors": (collector.dir / "log").read_text()}


def check_exact(node, r: dict) -> None:
    ports = range(PORT, PORT + r["ports"])
    udp = [x for x in r["rows"] if x.get("destinationTransportPort") in ports]
    assert sum(x["packetDeltaCount"] for x in udp) == r["sent"], r["logs"][1][-3000:]
    assert ingress_totals(r["rows"], r["ifindex"]) == (r["packets"], r["octets"])
    if r["oracle"] is not None:  # the second oracle: tshark's decode of the same stream
        mine = [x for x in r["oracle"] if x["dport"] in ports]
        assert sum(x["packets"] for x in mine) == r["sent"]
    assert r["sent"] >= 7 * RATE


def no_leftovers(node, pins: str) -> None:
    assert not os.path.exists(pins), os.listdir(pins)
    for p in node.pods:
        assert cniflow_links(node, p.host_if) == []


def test_an_agent_killed_mid_stream_loses_and_repeats_nothing(lab):
    """SIGKILL while a pod sends: the successor adopts the pinned maps and links (its
    program swapped into them), gets back the flow the dead agent had drained but not
    exported, and the collector's total is every datagram sent, once."""
    node, pins = lab

    def kill(first, _):
        first.proc.kill()
        first.proc.wait(10)
        assert cniflow_links(node, node.pods[0].host_if), "the links died with the agent"
        pinned = set(os.listdir(f"{pins}/v1"))
        assert {"flows_a", "commit"} <= pinned and pinned & {"ring0", "ring1"}

    r = run_through(node, pins, kill, ())
    assert "restored flows not yet exported" in r["logs"][1]
    assert "adopted pinned links" in r["logs"][1]
    check_exact(node, r)
    no_leftovers(node, pins)


def test_a_backlog_held_for_an_absent_collector_survives_a_sigkill(lab):
    """No collector: the records due wait in the exporter's backlog, which lives in the
    journal's due array; the agent is SIGKILLed, the collector comes up, the successor
    sends what the dead agent held, and the totals are exact."""
    node, pins = lab

    def kill(first, _):
        assert wait_for(lambda: first.metrics().get("cniflow_export_backlog_records", 0) > 50,
                        10), first.log.read_text()
        first.proc.kill()
        first.proc.wait(10)

    r = run_through(node, pins, kill, ("--active-timeout", "1", "--idle-timeout", "1"),
                    ports=40, late_collector=True)
    assert "the previous agent left records it had not sent" in r["logs"][1]
    check_exact(node, r)
    no_leftovers(node, pins)


def small_tcp_buffers(node) -> None:
    for key in ("net.ipv4.tcp_rmem", "net.ipv4.tcp_wmem"):
        subprocess.run(["ip", "netns", "exec", node.netns, "sysctl", "-qw",
                        f"{key}=4096 4096 4096"], check=True)


def stop_reading(node, first, collector) -> None:
    """SIGSTOP the collector and wait until the agent's socket is not writable, as the
    kernel judges it (sk_stream_is_writeable: free send buffer, tb less skmem's w, at
    least half of w): the export being written, or the next one (the next poll, within
    0.5 s), stops part-way. Octets merely queued are not enough (an export that fits
    leaves nothing unsent), nor is a full buffer needed: acknowledgements that arrive
    after a write filled it leave it below tb, and the writer still waits (both seen on
    a slower machine)."""
    collector.proc.send_signal(19)

    def stuck() -> bool:
        out = subprocess.run(node.exec("ss -tnmH state established dport = :4739").split(),
                             capture_output=True, text=True).stdout
        mem = re.search(r"tb(\d+),f\d+,w(\d+)", out)
        return mem is not None and int(mem[1]) - int(mem[2]) < int(mem[2]) >> 1
    assert wait_for(stuck, 20), first.log.read_text()


def test_an_agent_killed_while_its_export_is_stuck_in_the_socket_repeats_nothing(lab):
    """The collector stops reading (SIGSTOP) and the node's TCP buffers are 4 KB: the
    export's writes stop part-way through a message. The agent is SIGKILLed there; the
    kernel still delivers what it had written when the collector reads again, and the
    successor sends exactly the rest, from the first message not written whole (the
    collector drops the cut one): no record twice, none lost."""
    node, pins = lab
    small_tcp_buffers(node)

    def stuck(first, collector):
        stop_reading(node, first, collector)
        time.sleep(1)  # within the 2 s send timeout, past the next poll's export
        first.proc.kill()
        first.proc.wait(10)
        collector.proc.send_signal(18)  # SIGCONT

    r = run_through(node, pins, stuck, ("--active-timeout", "1", "--idle-timeout", "1"),
                    ports=200, oracle=False)
    assert "the previous agent left records it had not sent" in r["logs"][1]
    check_exact(node, r)
    no_leftovers(node, pins)


def test_a_collector_that_stalls_past_the_send_timeout_gets_every_record_once(lab):
    """The collector stops reading for 5 s: the agent's writes time out (2 s), it resets
    the connection (SO_LINGER 0: the kernel discards what the collector has not
    acknowledged, rather than deliver it later) and queues those records again for the
    next connection. When the collector reads again it gets every record once."""
    node, pins = lab
    small_tcp_buffers(node)

    def stall(first, collector):
        stop_reading(node, first, collector)
        time.sleep(5)
        collector.proc.send_signal(18)
        time.sleep(1)

    r = run_through(node, pins, stall, ("--active-timeout", "1", "--idle-timeout", "1",
                                        "--handover", "true"), ports=200, oracle=False)
    assert "records sent again: the connection broke" in r["logs"][0]
    check_exact(node, r)


def test_records_a_reset_discarded_are_journaled_again_before_the_next_poll(lab):
    """The collector stops reading; the agent's writes time out and it resets the
    connection, which discards what the collector had not acknowledged. Those records
    are held again (in the journal) in that same export: the agent SIGKILLed right
    after the reset, seconds before its next poll, loses none of them."""
    node, pins = lab
    small_tcp_buffers(node)

    def reset_then_kill(first, collector):
        stop_reading(node, first, collector)

        def reset() -> bool:
            return not subprocess.run(node.exec("ss -tnH state established dport = :4739")
                                      .split(), capture_output=True, text=True).stdout.strip()
        assert wait_for(reset, 15), first.log.read_text()
        first.proc.kill()
        first.proc.wait(10)
        collector.proc.send_signal(18)  # SIGCONT

    r = run_through(node, pins, reset_then_kill, ("--active-timeout", "1", "--idle-timeout",
                                                  "1", "--poll-interval", "5"),
                    ports=200, oracle=False)
    assert "records sent again: the connection broke" in r["logs"][0]
    check_exact(node, r)
    no_leftovers(node, pins)


NEXT_PROGRAM = "int next(struct __sk_buff *skb) { return -1; }"  # TCX_NEXT


def test_a_link_left_half_pinned_by_a_killed_agent_is_removed(lab):
    """An agent killed while moving its link to the head of the chain (bpf/attach.py
    keep_first) leaves the new link pinned under its temporary name, attached beside
    the old one: two cniflow links would count every packet twice. The successor
    unpins it, which detaches it; one link per hook, every packet once. (The link
    planted here runs a program that only says "next", so the totals stay exact
    whichever agent is right; its removal is what is checked.)"""
    from bcc import BPF
    from fakeapi import in_netns

    from bpf import syscall
    node, pins = lab
    a = node.pods[0]
    planted = {}

    def kill_mid_move(first, _):
        first.proc.kill()
        first.proc.wait(10)
        b = BPF(text=NEXT_PROGRAM.encode())
        prog = b.load_func(b"next", BPF.SCHED_CLS)
        ifindex = ifindex_of(node, a.host_if)
        link = in_netns(node.netns, lambda: syscall.link_create(
            prog.fd, ifindex, syscall.TCX_INGRESS, syscall.F_BEFORE))
        syscall.obj_pin(link, f"{pins}/links/{ifindex}-ingress_next")
        os.close(link)  # the pin holds it now, as after the agent's death
        planted.update(bpf=b, id=syscall.prog_id(prog.fd), ifindex=ifindex)
        assert tcx_programs(node.netns, a.host_if, "ingress")[0] == "next"

    r = run_through(node, pins, kill_mid_move, ())
    assert "a link an earlier agent was moving to the head is removed" in r["logs"][1]
    assert "next" not in tcx_programs(node.netns, a.host_if, "ingress")
    planted["bpf"].cleanup()
    check_exact(node, r)
    no_leftovers(node, pins)


def test_a_handover_on_sigterm_leaves_everything_to_the_next_agent(lab):
    """--handover: a SIGTERM exports nothing early and leaves maps, links and the pending
    flow pinned; the next agent continues them; its own plain SIGTERM then exports all,
    detaches and unpins."""
    node, pins = lab

    def handover(first, _):
        first.proc.send_signal(15)
        assert first.proc.wait(30) == 0
        assert len(cniflow_links(node, node.pods[0].host_if)) == 2
        assert os.listdir(f"{pins}/links")

    r = run_through(node, pins, handover, ("--handover", "true"))
    assert "pins left for the next agent" in r["logs"][0]
    assert "restored flows not yet exported" in r["logs"][1]
    # a handover forced nothing out: the UDP flow was reported once, at the end
    udp = [x for x in r["rows"] if x.get("destinationTransportPort") == PORT]
    assert len(udp) == 1 and udp[0]["flowEndReason"] == 4
    check_exact(node, r)
    no_leftovers(node, pins)


def test_a_pin_path_without_bpffs_is_refused(lab):
    node, _ = lab
    r = subprocess.run(node.exec(f"cniflow agent --interface {node.pods[0].host_if} "
                                 "--pin-path /tmp/not-bpffs").split(), capture_output=True,
                       text=True, env={**os.environ, "PATH": f"{os.path.dirname(PY)}:"
                                       f"{Path(__file__).parents[1] / '.venv/bin'}"})
    assert r.returncode == 2
    assert "--pin-path /tmp/not-bpffs: not on a bpffs" in r.stderr


def test_the_journal_recovers_a_committed_poll_exactly(lab):
    """The journal's maps, directly (real pinned maps on the test's bpffs): a flow that
    came and went within one poll (never in the ring), a poll
    whose export failed before the next commit, and a successor that finds the last
    poll committed but not exported: pending is the table, the due records are exactly
    the last poll's, and the idle map the commit named is emptied."""
    from agent.flowtable import FlowTable
    from agent.records import FLOW_DTYPE
    from bpf.journal import Journal
    from bpf.pins import PinDir

    _, pins = lab

    def flows(ports):
        b = np.zeros(len(ports), FLOW_DTYPE)
        b["key"]["ifindex"], b["key"]["ip_version"], b["key"]["proto"] = 7, 4, 17
        b["key"]["dport"] = ports
        b["packets"], b["octets"], b["first_ms"], b["last_ms"] = 2, 200, 1000, 2000
        return b

    def by_port(rows):
        return {int(r["key"]["dport"]): (int(r["packets"]), int(r["end_reason"]))
                for r in rows}

    j = Journal(PinDir(pins), 2)
    table = FlowTable(active_timeout_s=3600, idle_timeout_s=3600)
    batch = flows([1, 2, 3])
    table.update(batch, unique=True)
    j.commit(table, batch[:0], 0)
    j.exported()
    batch = flows([1, 4])  # 4 is new: it comes and goes within the poll
    table.update(batch, unique=True)
    out = table.flush()
    j.commit(table, out, 1)  # the export fails: no exported()
    batch = flows([5, 6, 7])
    table.update(batch, unique=True)
    j.commit(table, batch[:0], 0)  # committed, then the agent is killed
    emptied = []
    again = Journal(PinDir(pins), 2)
    rows, due = again.recover(emptied.append, nothing)
    assert by_port(rows) == {5: (2, 0), 6: (2, 0), 7: (2, 0)}
    assert len(due) == 0 and emptied == [0]
    table.update(batch := flows([5]), unique=True)
    out = table.flush()
    again.commit(table, out, 1)
    third = Journal(PinDir(pins), 2)
    rows, due = third.recover(emptied.append, nothing)
    assert len(rows) == 0 and emptied == [0, 1]
    assert by_port(due) == {5: (4, 4), 6: (2, 4), 7: (2, 4)}
    assert due.tobytes() == out.tobytes()
    for x in (j, again, third):
        x.close()


@pytest.fixture
def pinfs():
    """A bpffs of the test's own, no namespaces: the journal's maps alone."""
    with own_bpffs(f"jr2{os.getpid() % 1000}{next(_ids)}-pins") as fs:
        yield str(fs / "cniflow")


def _rows(ports, direction, now, rng):
    from agent.records import FLOW_DTYPE

    b = np.zeros(len(ports), FLOW_DTYPE)
    b["key"]["ifindex"], b["key"]["ip_version"], b["key"]["proto"] = 7, 4, 17
    b["key"]["direction"] = direction
    b["key"]["sport"] = np.where(direction == 0, 9, ports)  # partners: (9, p) and (p, 9)
    b["key"]["dport"] = np.where(direction == 0, ports, 9)
    b["packets"] = rng.integers(1, 50, len(ports))
    b["octets"] = b["packets"] * 100
    b["first_ms"] = now - rng.integers(0, 900, len(ports))
    b["last_ms"] = now
    b["tcp_flags"] = np.where(rng.random(len(ports)) < 0.1, 1, 0)  # FIN: ends early
    return b


def nothing():
    """No drain buffers: what recover() reads when the record says DRAINING."""
    from agent.records import FLOW_DTYPE

    return np.zeros(0, FLOW_DTYPE)


def _canon(rows) -> list[bytes]:
    return sorted(r.tobytes() for r in rows)


def test_the_journal_log_and_snapshots_replay_to_the_table_at_every_kill_point(pinfs):
    """A random run of polls (new, repeated and ended flows, evictions from a full table,
    idle and active timeouts, biflow partners, flushes, exports cut short) through real
    pinned maps, with an exporter's backlog: after every step a successor opens the
    pins as a SIGKILL would leave them. Before the commit (the ring's free space and the
    idle due array half written with garbage) it finds exactly the table of the previous
    commit and what was left unsent then; after the commit, the table now and every
    record held, in sending order; after each write of the export, the records not yet
    sent. The run crosses appends, compactions, a ring that wraps, rings and due arrays
    grown and shrunk into the other pin."""
    from agent.flowtable import FlowTable
    from agent.records import FLOW_DTYPE
    from bpf.journal import Journal
    from bpf.pins import PinDir

    rng = np.random.default_rng(13)
    pins = PinDir(pinfs)
    j = Journal(pins, 64)  # a ring of 4096 rows at first
    table = FlowTable(active_timeout_s=4, idle_timeout_s=3, max_flows=7000, end_grace_s=1)
    now, state, backlog, ring_sizes, due_sizes, modes, laps = (
        1_000_000, [], np.zeros(0, FLOW_DTYPE), set(), set(), set(), 0.0)

    def successor(rows_then, left_then, slot_if_committed):
        emptied = []
        dead = Journal(pins, 64)
        rows, left = dead.recover(emptied.append, nothing)
        assert _canon(rows) == rows_then, poll
        assert left.tobytes() == left_then.tobytes(), poll  # the same records, same order
        assert emptied == slot_if_committed, poll
        dead.close()

    for poll in range(80):
        now += 1000
        size = int(rng.choice([0, 3, 40, 400, 2500, 9000], p=[.1, .2, .3, .2, .15, .05]))
        ports = rng.choice(20_000 if size > 2000 else 600, size, replace=False)
        batch = _rows(ports, rng.integers(0, 2, size), now, rng)
        evicted = table.update(batch, unique=True)
        due = table.flush() if rng.random() < 0.05 else table.expire(now)
        due = np.concatenate([due, table.partners(due)])
        out = np.concatenate([evicted, due]) if len(evicted) else due
        # killed before the commit: garbage where the commit writes, S as before
        junk = rng.bytes(min(len(j.rows) - (j.end - j.base), 3000) * FLOW_DTYPE.itemsize)
        j._write(j.end, np.frombuffer(junk, FLOW_DTYPE))
        idle = j._due(1 - j.dwhich)
        if idle is not None:
            idle[:min(len(idle), 500)] = np.frombuffer(rng.bytes(500 * 88), FLOW_DTYPE)[
                :min(len(idle), 500)]
        successor(state, backlog, [poll % 2 ^ 1] if j.phase == 1 else [])
        # the exporter's order: the backlog and this poll's records, shuffled by encoding
        held = np.concatenate([backlog, out])
        held = held[rng.permutation(len(held))]
        before = (j.base, j.end, len(j.rows))
        j.commit(table, held, poll % 2)
        if (j.base, j.end, len(j.rows)) != before:
            modes.add("resize" if len(j.rows) != before[2] else
                      "compact" if j.base != before[0] else "append")
        ring_sizes.add(len(j.rows))
        if len(held):
            due_sizes.add(len(j._due(j.dwhich)))
        laps = max(laps, j.end / len(j.rows))
        state = _canon(table.flows)
        committed = [poll % 2] if j.phase == 1 else []
        successor(state, held, committed)  # killed after the commit, before any write
        # the export: some writes, maybe cut short (the collector away), and the oldest
        # dropped from a full backlog of 3000
        cut = len(held) if rng.random() < 0.7 else int(rng.integers(0, len(held) + 1))
        for sent in sorted(set(rng.integers(0, cut + 1, 3).tolist()) | {cut}):
            j.progress(sent)
            successor(state, held[sent:], committed)  # killed after this write
        backlog = held[cut:]
        if len(backlog) > 3000:
            backlog = backlog[len(backlog) - 3000:]
            j.progress(len(held) - 3000)
        j.exported()
        successor(state, backlog, [])
    assert modes >= {"append", "compact", "resize"}, modes
    assert len(ring_sizes) >= 3 and len(due_sizes) >= 2, (ring_sizes, due_sizes)
    assert laps > 2, laps  # positions wrapped around a ring
    j.close()
    assert set(os.listdir(pins.maps)) == {"commit", f"ring{j.which}", "due0", "due1"}


def test_the_previous_commit_record_is_migrated(pinfs):
    """An agent of the previous journal (a 56-octet commit record, its records due in
    the ring after the table's log) killed after a commit: the successor finds the table
    and those records, and the record in its new layout."""
    import struct

    from agent.flowtable import FlowTable
    from bpf import syscall
    from bpf.journal import Journal
    from bpf.pins import PinDir

    rng = np.random.default_rng(3)
    pins = PinDir(pinfs)
    j = Journal(pins, 8)
    table = FlowTable(active_timeout_s=3600, idle_timeout_s=3600)
    table.update(rows := _rows(np.arange(20), np.zeros(20, int), 5000, rng), unique=True)
    j.commit(table, rows[:0], 1)
    due = _rows(np.arange(100, 105), np.ones(5, int), 5000, rng)
    j._write(j.end, due)  # where the previous layout kept them
    old = syscall.map_create(syscall.MAP_ARRAY, 4, 56, 1, 0, "cniflow_commit")
    syscall.update(old, struct.pack("<I", 0), struct.pack(
        "<QQQQQQQ", j.gen, 1, 1, j.which, j.base, j.end, len(due)))
    j.close()
    os.unlink(pins.map_path("commit"))
    syscall.obj_pin(old, pins.map_path("commit"))
    os.close(old)
    emptied = []
    again = Journal(pins, 8)
    got, left = again.recover(emptied.append, nothing)
    assert _canon(got) == _canon(rows) and left.tobytes() == due.tobytes() and emptied == [1]
    assert syscall.map_info(again.record)[2] == 72
    assert "commit_new" not in os.listdir(pins.maps)
    again.progress(5)
    again.close()
    third = Journal(pins, 8)
    assert len(third.recover(emptied.append, nothing)[1]) == 0
    third.close()


def test_the_previous_layouts_pending_flows_are_migrated(pinfs):
    """An agent of the previous layout (pending hash, log array, 40-octet journal) killed
    after a commit: its pending rows with the log applied (a changed row, a removed one)
    become the table, its logged records are due, its maps are unpinned; a second
    successor finds the migrated journal, not the old maps."""
    import struct

    from agent.records import FLOW_DTYPE, KEY_DTYPE
    from bpf import syscall
    from bpf.journal import GONE, REST, ROW, Journal
    from bpf.journal import _rows as mapped
    from bpf.pins import PinDir

    rng = np.random.default_rng(5)
    pins = PinDir(pinfs)
    table = _rows(np.arange(10), np.zeros(10, int), 5000, rng)
    pending = syscall.map_create(syscall.MAP_HASH, KEY_DTYPE.itemsize, REST, 64,
                                 syscall.F_NO_PREALLOC, "cniflow_pending")
    r = table.view(ROW)
    keys, rest = np.ascontiguousarray(r["key"]), np.ascontiguousarray(r["rest"])
    syscall.update_batch(pending, keys.ctypes.data, rest.ctypes.data, len(table))
    logfd = syscall.map_create(syscall.MAP_ARRAY, 4, FLOW_DTYPE.itemsize, 16,
                               syscall.F_MMAPABLE, "cniflow_log")
    logged = mapped(logfd, 16)
    changed, removed = table[3:4].copy(), table[4:5].copy()
    changed["packets"] = 0
    removed["end_reason"] = GONE
    records = _rows(np.arange(100, 103), np.ones(3, int), 5000, rng)
    logged[:5] = np.concatenate([changed, removed, records])
    jfd = syscall.map_create(syscall.MAP_ARRAY, 4, 40, 1, 0, "cniflow_journal")
    syscall.update(jfd, struct.pack("<I", 0), struct.pack("<QQQQQ", 9, 1, 1, 2, 3))
    for name, fd in (("pending", pending), ("log", logfd), ("journal", jfd)):
        syscall.obj_pin(fd, pins.map_path(name))
        os.close(fd)
    del logged
    emptied = []
    j = Journal(pins, 8)
    rows, due = j.recover(emptied.append, nothing)
    expect = np.concatenate([table[:3], changed, table[5:]])
    assert _canon(rows) == _canon(expect)
    assert _canon(due) == _canon(records) and emptied == [1]
    assert not {"pending", "log", "journal"} & set(os.listdir(pins.maps))
    j.progress(len(due))
    j.exported()
    j.close()
    again = Journal(pins, 8)
    rows, due = again.recover(emptied.append, nothing)
    assert _canon(rows) == _canon(expect) and len(due) == 0 and emptied == [1]
    again.close()


@pytest.mark.parametrize("shared", [True, False])
def test_a_poll_killed_after_its_drain_is_restored_from_the_pinned_buffers(pinfs, shared):
    """The drain empties the kernel map into pinned buffers (no delete by key after the
    commit); a successor of an agent killed after that drain, before its commit, folds
    what the buffers hold into the table, commits it, and never reads them again; one
    killed after DRAINING was recorded but before the flip finds the counts still in
    the kernel map. Real maps: a FlowProgram's, shared and per-CPU."""
    from agent.flowtable import FlowTable
    from agent.records import KEY_DTYPE
    from bpf import syscall
    from bpf.drain import VAL_DTYPE, BatchDrain
    from bpf.journal import EXPORTED, Journal
    from bpf.pins import PinDir
    from bpf.program import FlowProgram

    pins = PinDir(pinfs)
    prog = FlowProgram(256, shared=shared, pins=pins)

    def fill(fd, n, packets):
        keys = np.zeros(n, KEY_DTYPE)
        keys["ifindex"], keys["ip_version"], keys["proto"] = 7, 4, 17
        keys["sport"], keys["dport"] = 9, np.arange(n) + 1
        vals = np.zeros((n, prog.value_copies), VAL_DTYPE)
        vals["packets"][:, -1], vals["octets"][:, -1] = packets, 100 * packets
        now = prog.jiffies() + (1 << 32)
        vals["first"][:, -1], vals["last"][:, -1] = now - 50, now
        syscall.update_batch(fd, keys.ctypes.data, vals.ctypes.data, n)

    def packets(rows):
        return {int(r["key"]["dport"]): int(r["packets"]) for r in rows}

    def successor():
        d = BatchDrain(prog, keep=True)
        j = Journal(pins, 256)
        d.before = j.draining
        return d, j, j.recover(d.empty, d.read_pinned)

    drain, j, _ = successor()
    table = FlowTable(active_timeout_s=3600, idle_timeout_s=3600)
    fill(drain.fds[drain.active], 40, 3)
    table.update(batch := drain.drain(), unique=True)
    j.commit(table, batch[:0], drain.idle)
    j.exported()
    fill(drain.fds[drain.active], 60, 5)  # 40 known keys, 20 new
    assert len(drain.drain()) == 60  # ... and the agent is killed before the commit
    assert syscall.lookup_batch(drain.fds[drain.idle], KEY_DTYPE.itemsize,
                                VAL_DTYPE.itemsize * prog.value_copies, 256) == []
    drain, j, (rows, due) = successor()
    assert packets(rows) == {p: 8 if p <= 40 else 5 for p in range(1, 61)} and not len(due)
    assert j.phase == EXPORTED  # committed at once: the next drain may overwrite them
    drain, j, (rows, due) = successor()  # killed again before any poll: not read twice
    assert packets(rows) == {p: 8 if p <= 40 else 5 for p in range(1, 61)}
    slot = drain.active
    fill(drain.fds[slot], 10, 7)
    drain._pin()  # keys zeroed, DRAINING recorded; killed before the flip and the drain
    drain, j, (rows, due) = successor()
    assert packets(rows) == {p: 8 if p <= 40 else 5 for p in range(1, 61)}
    assert drain.active == slot and packets(drain.drain()) == {p: 7 for p in range(1, 11)}
    j.close()
    prog.close()


def test_an_entry_points_link_is_adopted_across_a_kill():
    """The remote host sends to a pod through an uplink whose CNI program puts packets
    into the pod's peer, past its veth (Cilium's BPF host routing), and the agent is
    SIGKILLed meanwhile: the pinned entry link keeps counting, the successor adopts it
    (its program swapped in), every datagram is counted once, and nothing of cniflow's
    is left on the uplink after a SIGTERM."""
    import cnilab
    from fakeapi import FakeApiServer

    prefix = f"rse{os.getpid() % 1000}"
    node = netlab.up(prefix, 2, remote=True)
    fs = Path(f"/run/cniflow-lab/{prefix}-pins")
    fs.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "bpf", "bpf", str(fs)], check=True)
    server, standin, uplink, pins = FakeApiServer(node.netns), None, f"{prefix}up", str(
        fs / "cniflow")
    db = node.pods[1]
    try:
        server.namespace("shop", {"cniflow.io/export": "true"})
        for name, pod in zip(("web", "db"), node.pods, strict=True):
            server.pod("shop", name, "node-a", [pod.ipv4, pod.ipv6])
        standin = cnilab.StandIn(node.netns, [uplink], mode="redirect",
                                 targets={db.ipv4: db.host_if})
        collector = RunningCollector(node.netns, 4739, "tcp")
        common = ("--kubernetes", "--node-name", "node-a", "--kubeconfig",
                  str(server.kubeconfig(Path(f"/tmp/{prefix}-kubeconfig"))),
                  "--transport", "tcp", "--pin-path", pins, "--idle-timeout", "30",
                  "--active-timeout", "120")
        with agent(node, *common, interfaces=()) as first:
            assert wait_for(lambda: first.metrics().get("cniflow_entry_points") == 1, 10)
            sender = subprocess.Popen(
                node.in_remote(f"{PY} -c '{SENDER}' {db.ipv4} {RATE} 6 1"), shell=True,
                stdout=subprocess.PIPE, text=True)
            time.sleep(2.5)
            first.proc.kill()
            first.proc.wait(10)
            assert tcx_programs(node.netns, uplink, "ingress")[0] == "cniflow_entry"
            link = head_link(node.netns, uplink)
        time.sleep(1)  # no agent at all: the pinned entry link goes on counting
        with agent(node, *common, interfaces=()) as second:
            sent = int(sender.communicate(timeout=30)[0])
            time.sleep(1)
            now = head_link(node.netns, uplink)
        # the same link, adopted, running the successor's program
        assert now[1] == link[1] and now[0] != link[0], (link, now)
        log = second.log.read_text()
        rows = settled(collector)
        left = [n for n in tcx_programs(node.netns, uplink, "ingress")
                if n.startswith("cniflow_")]
        assert standin.attached(uplink)
    finally:
        if standin is not None:
            standin.close()
        server.stop()
        subprocess.run(["umount", str(fs)], check=False)
        fs.rmdir()
        netlab.down(prefix)
    assert "adopted pinned links" in log
    got = [x for x in rows if x.get("destinationTransportPort") == PORT]
    assert sum(x["packetDeltaCount"] for x in got) == sent >= 5 * RATE
    assert {(x["flowDirection"], x["destinationPodName"]) for x in got} == {(1, "db")}
    assert left == [] and not os.path.exists(pins)


def head_link(netns: str, ifname: str) -> tuple[int, int]:
    """(program id, link id) of the first link on an interface's TCX ingress."""
    import socket

    from fakeapi import in_netns

    from bpf import syscall

    return in_netns(netns, lambda: syscall.query(socket.if_nametoindex(ifname),
                                                 syscall.TCX_INGRESS)[0])


def test_an_earlier_agents_pod_addresses_go_with_their_pods(pinfs):
    """The pod address map is pinned and adopted like every other: addresses of pods
    deleted while no agent ran are removed at the successor's first reconcile, before
    their interface indexes can name another pod's traffic; the rest is rewritten only
    where it changed."""
    from bpf import syscall
    from bpf.pins import PinDir
    from bpf.program import ADDR_KEY_SIZE, FlowProgram, addr_key

    first = FlowProgram(4096, pins=PinDir(pinfs))
    first.pod_addresses({addr_key("10.1.0.5"): 7, addr_key("fd00::6"): 8,
                         addr_key("10.1.0.7"): 9})
    first.close()
    second = FlowProgram(4096, pins=PinDir(pinfs))
    try:
        assert second.adopted
        second.pod_addresses({addr_key("fd00::6"): 8, addr_key("10.1.0.8"): 7})
        held = {k: int.from_bytes(v, "little") for k, v in syscall.lookup_batch(
            second._pod_addrs, ADDR_KEY_SIZE, 4, 64)}
        assert held == {addr_key("fd00::6"): 8, addr_key("10.1.0.8"): 7}
    finally:
        second.close()
        PinDir(pinfs).remove()
