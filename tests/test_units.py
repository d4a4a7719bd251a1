"""Pure logic: the flow table's rules and the IPFIX encoder, checked by tshark."""

from __future__ import annotations

import contextlib
import struct
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from agent import flowtable
from agent.config import SETTINGS, env_name, flag
from agent.ipfix.flows import TEMPLATE_V4
from agent.ipfix.message import Strings, Template, encode_records, message, set_bytes, template_sets
from agent.records import FLOW_DTYPE, TCP_FIN

ROOT = Path(__file__).resolve().parents[1]


def flows(n: int, t: int = 1000, port0: int = 1) -> np.ndarray:
    f = np.zeros(n, FLOW_DTYPE)
    f["key"]["ip_version"] = 4
    f["key"]["proto"] = 17
    f["key"]["sport"] = np.arange(port0, port0 + n)
    f["packets"], f["octets"], f["first_ms"], f["last_ms"] = 1, 100, t, t
    f["min_ttl"] = f["max_ttl"] = 64
    return f


def test_counters_are_deltas_across_drains_and_records_tile_time():
    table = flowtable.FlowTable(active_timeout_s=10, idle_timeout_s=5)
    table.update(flows(3, t=1000))
    table.update(flows(3, t=9000))
    assert table.expire(10_000).size == 0
    out = table.expire(11_000)  # active timeout since 1000
    assert list(out["packets"]) == [2, 2, 2] and set(out["end_reason"]) == {2}
    assert list(out["first_ms"]) == [1000] * 3 and list(out["last_ms"]) == [9000] * 3
    table.update(flows(1, t=12_000))
    out = table.expire(17_000)  # idle since 12_000 for one, all others silent
    assert list(out["packets"]) == [1] and list(out["end_reason"]) == [1]
    assert list(out["first_ms"]) == [12_000]
    assert len(table) == 0


def test_an_interval_after_an_active_timeout_never_starts_before_the_last_one_ended():
    table = flowtable.FlowTable(active_timeout_s=10, idle_timeout_s=8)
    table.update(flows(1, t=1000))
    table.update(flows(1, t=9000))
    assert list(table.expire(11_000)["last_ms"]) == [9000]
    late = flows(1, t=13_000)
    late["first_ms"] = 1000  # a meter that keeps the flow's start (VPP)
    table.update(late)
    out = table.expire(19_000)
    assert (out["first_ms"][0], out["last_ms"][0], out["end_reason"][0]) == (9000, 13_000, 2)


def vpp_reports(n: int, step: int = 5010, t0: int = 0) -> np.ndarray:
    """One flow as flowprobe reports it: the start fixed at the entry's creation."""
    r = flows(n, t=t0)
    r["key"]["sport"] = 7
    r["last_ms"] = t0 + step * np.arange(1, n + 1)
    r["packets"], r["octets"] = np.arange(1, n + 1), 100 * np.arange(1, n + 1)
    return r


def test_vpp_reports_in_one_batch_leave_as_the_active_timeout_calls_for():
    from vpp_plugin.mediate import Continuity

    batch = vpp_reports(10)[np.random.default_rng(1).permutation(10)]  # any order
    batch = Continuity().apply(batch, now_ms=50_100)
    assert list(batch["first_ms"]) == [0] + [5010 * k for k in range(1, 10)]
    table = flowtable.FlowTable(active_timeout_s=20, idle_timeout_s=15)
    table.update(batch, reports=True)
    early = table.expire(50_100)
    assert list(early["end_reason"]) == [2, 2]
    assert list(zip(early["first_ms"], early["last_ms"])) == [(0, 20_040), (20_040, 40_080)]
    assert table.expire(60_000).size == 0
    [last] = table.expire(65_100)  # idle since the last report
    assert (last["first_ms"], last["last_ms"], last["end_reason"]) == (40_080, 50_100, 1)
    assert sum(early["packets"]) + last["packets"] == 55


def test_vpp_reports_one_poll_at_a_time_leave_the_same_records():
    from vpp_plugin.mediate import Continuity

    memory, table = Continuity(), flowtable.FlowTable(active_timeout_s=20, idle_timeout_s=15)
    out = []
    for report in vpp_reports(10):
        now = int(report["last_ms"]) + 300
        table.update(memory.apply(report[None], now_ms=now), reports=True)
        out.append(table.expire(now))
    out = np.concatenate(out)
    assert list(zip(out["first_ms"], out["last_ms"])) == [(0, 20_040), (20_040, 40_080)]


def test_a_quiet_gap_inside_a_batch_of_reports_ends_the_flow_before_it():
    table = flowtable.FlowTable(active_timeout_s=60, idle_timeout_s=5)
    r = vpp_reports(2)
    r["first_ms"][1] = r["last_ms"][0] + 7000  # a new VPP entry, created after 7 s of quiet
    r["last_ms"][1] = r["first_ms"][1] + 10
    table.update(r, reports=True)
    out = table.expire(int(r["last_ms"][1]))
    assert list(out["end_reason"]) == [1] and list(out["packets"]) == [1]
    assert list(table.flush()["packets"]) == [2]


def test_the_mediation_remembers_each_flows_last_report_bounded_and_not_forever():
    from vpp_plugin.mediate import Continuity

    memory = Continuity(forget_after_s=30, max_flows=4)
    first = vpp_reports(1)
    assert memory.apply(first, now_ms=5010)["first_ms"][0] == 0  # nothing before it
    assert memory.apply(vpp_reports(2)[1:], now_ms=10_020)["first_ms"][0] == 5010
    renewed = vpp_reports(1, t0=30_000)  # VPP's entry expired and came back: its own start
    assert memory.apply(renewed, now_ms=35_010)["first_ms"][0] == 30_000
    out_of_order = vpp_reports(1)  # ends before the remembered end: no later than its end
    assert memory.apply(out_of_order, now_ms=35_010)["first_ms"][0] == 5010
    others = flows(6, t=40_000, port0=100)
    memory.apply(others, now_ms=40_000)
    assert len(memory) == 4  # bounded: the oldest ends went first
    memory.apply(others[:0], now_ms=80_000)
    assert len(memory) == 0  # VPP's timers have certainly passed


def test_fin_ends_a_flow_after_one_quiet_poll():
    table = flowtable.FlowTable(end_grace_s=1)
    f = flows(1, t=1000)
    f["tcp_flags"] = TCP_FIN
    table.update(f)
    assert table.expire(1500).size == 0
    assert list(table.expire(2000)["end_reason"]) == [3]


def test_a_full_table_evicts_the_least_recent_with_reason_5():
    table = flowtable.FlowTable(max_flows=4)
    table.update(flows(4, t=1000))
    evicted = table.update(flows(2, t=2000, port0=100))
    assert len(table) == 4 and len(evicted) == 2 and set(evicted["end_reason"]) == {5}
    assert set(table.flush()["end_reason"]) == {4}


def test_colliding_hashes_never_merge_different_flows(monkeypatch):
    monkeypatch.setattr(flowtable, "key_hash", lambda w: np.zeros(len(w), np.uint64))
    table = flowtable.FlowTable()
    for _ in range(3):
        table.update(flows(5))
    out = table.flush()
    assert len(out) == 5 and list(out["packets"]) == [3] * 5


def test_duplicate_keys_in_one_batch_are_folded():
    b = np.concatenate([flows(2), flows(2, t=5000)])
    out = flowtable.aggregate(b)
    assert len(out) == 2 and list(out["packets"]) == [2, 2] and list(out["last_ms"]) == [5000] * 2


def pcap(messages: list[bytes], port: int = 4739) -> Path:
    """Classic pcap of IPv4/UDP datagrams carrying the messages."""
    out = struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1)
    for i, m in enumerate(messages):
        udp = struct.pack("!HHHH", 40000, port, 8 + len(m), 0) + m
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), i, 0, 64, 17, 0,
                         bytes([127, 0, 0, 1]), bytes([127, 0, 0, 1])) + udp
        s = sum(struct.unpack("!10H", ip[:20]))
        s = (s & 0xFFFF) + (s >> 16)
        ip = ip[:10] + struct.pack("!H", ~s & 0xFFFF) + ip[12:]
        frame = b"\0" * 12 + b"\x08\x00" + ip
        out += struct.pack("<IIII", 1, i, len(frame), len(frame)) + frame
    path = Path(tempfile.mkdtemp()) / "x.pcap"
    path.write_bytes(out)
    return path


def test_strings_short_and_long_decode_in_tshark():
    t = Template.of(300, ["sourceTransportPort", "interfaceName"])
    names = ["veth0", "x" * 300, "z"]
    n = 6
    cols = {"sourceTransportPort": np.arange(n, dtype=np.uint16),
            "interfaceName": Strings(names, np.array([0, 1, 2, 0, 1, 2]))}
    groups = encode_records(t, cols, n)
    assert sum(g.data.size for g in groups) == n * 2 + 2 * (1 + 5) + 2 * (3 + 300) + 2 * 2
    body = b"".join(set_bytes(300, g.data.tobytes()) for g in groups)
    msgs = [message(template_sets([t]), 0, 0, 9), message(body, 0, 0, 9)]
    out = subprocess.run(["tshark", "-r", str(pcap(msgs)), "-T", "fields", "-E", "occurrence=a",
                          "-E", "aggregator=|", "-e", "cflow.if_name", "-e", "cflow.srcport",
                          "-e", "_ws.expert.message"], capture_output=True, text=True, check=True)
    line = out.stdout.rstrip("\n").splitlines()[-1].split("\t")
    pairs = sorted(zip(map(int, line[1].split("|")), line[0].split("|"), strict=True))
    assert pairs == [(i, names[i % 3]) for i in range(6)]
    assert len(line) < 3 or line[2] == ""


@pytest.mark.parametrize("which", ["agent", "collector"])
def test_the_readme_documents_every_setting(which):
    from agent.config import COLLECTOR_PREFIX, COLLECTOR_SETTINGS

    readme = (ROOT / "README.md").read_text()
    settings, prefix = (SETTINGS, "CNIFLOW_") if which == "agent" else (
        COLLECTOR_SETTINGS, COLLECTOR_PREFIX)
    for f in settings:
        row = [line for line in readme.splitlines() if line.startswith(f"| `{flag(f.name)}`")
               and f"`{env_name(f.name, prefix)}`" in line]
        assert row, f"README lacks a row for {flag(f.name)} ({env_name(f.name, prefix)})"
        if isinstance(f.default, bool):
            assert f" {str(f.default).lower()} " in row[0], (f.name, row[0])
        elif isinstance(f.default, (int, float, str)) and f.default != "":
            assert str(f.default) in row[0], (f.name, f.default, row[0])


def test_a_lone_record_makes_one_message_with_the_right_sequence():
    from agent.ipfix.flows import TEMPLATE_V4, columns
    from agent.ipfix.message import pack

    f = flows(1)
    groups = encode_records(TEMPLATE_V4, columns(f, {0: "eth0"}), 1)
    msgs = pack(256, groups, 1400, 0, 3, sequence=41)
    assert len(msgs) == 1 and list(msgs.counts) == [1] and list(msgs.rows) == [0]
    head = msgs.buf[:16].tobytes()
    assert struct.unpack("!HHIII", head) == (10, msgs.lengths[0], 0, 41, 3)


@pytest.mark.parametrize("size", [512, 1400, 9000])
def test_messages_fit_the_size_and_sequence_numbers_count_records(size):
    """Over a real UDP socket: every message within the limit, sequence numbers equal
    to the data records sent before it, all records delivered."""
    import socket

    from agent.exporter import Exporter
    from agent.metrics import Metrics
    from agent.transport import UdpTransport

    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    rx.bind(("127.0.0.1", 0))
    rx.settimeout(0.5)
    batch = flows(500)
    batch["key"]["ifindex"] = np.arange(500) % 3  # names of three lengths
    e = Exporter(UdpTransport(*rx.getsockname()), 1, Metrics(), max_message=size)
    e.export(batch, {0: "y" * 15, 1: "eth0", 2: ""})
    got = []
    try:
        while True:
            got.append(rx.recv(65535))
    except TimeoutError:
        pass
    assert all(len(m) <= size for m in got)
    assert all(struct.unpack("!H", m[2:4])[0] == len(m) for m in got)
    fixed = TEMPLATE_V4.fixed_dtype.itemsize
    expected = 1 + 3  # options records in the announcement: export statistics, 3 interfaces
    for m in got[1:]:  # the first carries the templates
        assert struct.unpack("!I", m[8:12])[0] == expected  # records sent before it
        off = 16
        while off < len(m):
            set_id, length = struct.unpack("!HH", m[off:off + 4])
            assert set_id == 256
            rec, end = off + 4, off + length
            while rec < end:  # fixed fields, then interfaceName: length octet + text
                rec += fixed + 1 + m[rec + fixed]
                expected += 1
            assert rec == end
            off += length
        assert off == len(m)
    assert expected == e.sequence == 504
    assert e.metrics.records_exported._value.get() == 500


def test_udp_templates_go_first_and_again_after_the_refresh_interval():
    import socket

    from agent.exporter import Exporter
    from agent.metrics import Metrics
    from agent.transport import UdpTransport

    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    rx.settimeout(0.3)
    now = [1000.0]
    e = Exporter(UdpTransport(*rx.getsockname()), 1, Metrics(), template_refresh_s=30,
                 clock=lambda: now[0])

    def set_ids():
        out = []
        try:
            while True:
                m = rx.recv(65535)
                out.append(struct.unpack("!H", m[16:18])[0])
        except TimeoutError:
            return out

    e.export(flows(2), {})
    assert set_ids() == [3, 256]  # options templates (and records, templates), then data
    now[0] += 29
    e.export(flows(2), {})
    assert set_ids() == [256]
    now[0] += 2
    e.export(flows(2), {})
    assert set_ids() == [3, 256]  # refreshed after 30 s


def test_opt_in_rules_pod_first_then_namespace_and_bad_values_named():
    from agent.kube import Pod
    from agent.optin import decide

    def pod(name, ns, value=None, host=False):
        return Pod(name, ns, name, ("10.0.0.1",), host, value)

    pods = [pod("a", "on"), pod("b", "on", "false"), pod("c", "off", "true"),
            pod("d", "off"), pod("e", "on", "True"), pod("f", "bad"), pod("g", "on", host=True)]
    d = decide(pods, {"on": "true", "off": None, "bad": "yes"})
    assert [p.name for p in d.metered] == ["a", "c"]
    assert [p.name for p in d.host_network] == ["g"]
    assert sorted(who for who, _ in d.invalid) == ["namespace/bad", "pod/on/e"]
    assert "'True'" in dict(d.invalid)["pod/on/e"]


def test_the_collectors_output_rotates_by_size_and_keeps_n_files(tmp_path):
    from agent.jsonlines import Lines
    from agent.outputs import FileOutput

    out = FileOutput(str(tmp_path / "r.jsonl"), rotate_bytes=1000, keep=3)
    for i in range(100):
        out.write(Lines(f'{{"n":{i},"pad":"{"x" * 80}"}}\n'.encode(), 1))
    out.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["r.jsonl", "r.jsonl.1", "r.jsonl.2", "r.jsonl.3"]
    newest_old = (tmp_path / "r.jsonl.1").read_text().splitlines()
    current = (tmp_path / "r.jsonl").read_text().splitlines()
    assert all(len(p.read_text()) <= 1100 for p in tmp_path.iterdir())
    last = [int(line.split(",")[0][5:]) for line in newest_old + current]
    assert last == sorted(last) and last[-1] == 99


def test_a_rotation_that_cannot_make_the_new_file_loses_no_line_and_no_old_file(tmp_path):
    """A real file system with no inode left (tmpfs, nr_inodes=2): the rotation renames
    the file and cannot make a new one. Lines go on to the renamed file, which no later
    rotation shifts down over the older ones; once an inode is free, the next piece
    makes the file at the path again and rotation goes on."""
    from agent.jsonlines import Lines
    from agent.outputs import FileOutput

    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,nr_inodes=2", "cniflow-test",
                    str(tmp_path)], check=True)
    out = None
    try:
        out = FileOutput(str(tmp_path / "r.jsonl"), rotate_bytes=1000, keep=3)
        line = [f'{{"n":{i},"pad":"{"x" * 80}"}}\n'.encode() for i in range(60)]
        for i in range(30):
            out.write(Lines(line[i], 1))
        assert sorted(p.name for p in tmp_path.iterdir()) == ["r.jsonl.1"]
        assert (tmp_path / "r.jsonl.1").read_bytes() == b"".join(line[:30])
        subprocess.run(["mount", "-o", "remount,nr_inodes=10", str(tmp_path)], check=True)
        for i in range(30, 60):
            out.write(Lines(line[i], 1))
        out.close()
        out = None
        files = sorted(tmp_path.iterdir())  # two rotations: the first 30 lines in .3
        assert [p.name for p in files] == ["r.jsonl", "r.jsonl.1", "r.jsonl.2", "r.jsonl.3"]
        assert b"".join(p.read_bytes() for p in reversed(files)) == b"".join(line)
    finally:
        if out is not None:
            out.close()
        subprocess.run(["umount", str(tmp_path)], check=True)


def test_records_lost_while_the_collector_is_away_are_reported_in_export_statistics():
    """RFC 7011 4.3: the backlog overflowed, so the statistics record says how much."""
    import socket

    from agent.exporter import Exporter
    from agent.ipfix.decoder import Decoder, records, split_stream
    from agent.metrics import Metrics
    from agent.transport import TcpTransport

    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nobody listens yet
    e = Exporter(TcpTransport("127.0.0.1", port, backoff_min=0.01), 1, Metrics(),
                 backlog_limit=10)
    lost = flows(25)
    e.export(lost, {})  # refused: kept in a backlog of 10, 15 dropped
    assert e.backlog_records == 10 and e.lost["flows"] == 15 and e.lost["packets"] == 15
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", port))
    srv.listen()
    time.sleep(0.05)
    e.export(flows(0), {3: "veth3"})
    conn, _ = srv.accept()
    e.close()
    data = b""
    while chunk := conn.recv(65536):
        data += chunk
    d = Decoder()
    rows = [r for m in split_stream(data)[0] for rs in d.message(m, "x") for r in records(rs)]
    stats = [r for r in rows if "notSentFlowTotalCount" in r]
    assert [(r["notSentFlowTotalCount"], r["notSentPacketTotalCount"],
             r["notSentOctetTotalCount"]) for r in stats] == [(15, 15, 1500)]
    assert sum(1 for r in rows if "octetDeltaCount" in r) == 10
    assert {r["interfaceName"]: r["ingressInterface"] for r in rows if "interfaceName" in r
            and "octetDeltaCount" not in r} == {"veth3": 3}
    templates = {tid for s in d.sessions.values() for tid in s.templates}
    assert templates == {261, 262}  # data templates withdrawn at close; options stay


def test_biflow_pairs_partners_on_one_interface_initiator_first():
    from agent.biflow import pair
    from agent.records import EGRESS, INGRESS

    f = flows(4, t=1000)
    k = f["key"]
    k["ifindex"] = 5
    k["src"][:, :4], k["dst"][:, :4] = [10, 0, 0, 1], [10, 0, 0, 2]
    # 0: a UDP request (ingress), 1: its reply (egress), arriving 5 ms later
    k["sport"][0], k["dport"][0], k["direction"][0] = 4000, 53, INGRESS
    k["src"][1, :4], k["dst"][1, :4] = [10, 0, 0, 2], [10, 0, 0, 1]
    k["sport"][1], k["dport"][1], k["direction"][1] = 53, 4000, EGRESS
    f["first_ms"][1], f["last_ms"][1], f["packets"][1], f["octets"][1] = 1005, 1005, 2, 900
    # 2: an ICMP echo reply seen first in the batch, 3: its request, earlier
    k["proto"][2:] = 1
    k["src"][2, :4], k["dst"][2, :4] = [10, 0, 0, 2], [10, 0, 0, 1]
    k["sport"][2:], k["dport"][2], k["direction"][2] = 0, 0x0000, EGRESS
    k["dport"][3], k["direction"][3] = 0x0800, INGRESS
    f["first_ms"][3] = 990
    out = pair(f)
    assert len(out) == 2
    udp, icmp = sorted(out, key=lambda r: r["key"]["proto"], reverse=True)
    assert (udp["key"]["sport"], udp["key"]["dport"], udp["packets"], udp["rev_packets"],
            udp["rev_octets"], udp["biflow_direction"], udp["last_ms"]) == (
                4000, 53, 1, 2, 900, 1, 1005)
    assert (icmp["key"]["dport"], icmp["biflow_direction"], icmp["rev_packets"]) == (0x0800, 1, 1)
    lone = pair(f[:1])
    assert lone["biflow_direction"][0] == 0 and lone["rev_packets"][0] == 0


def test_a_reported_flow_takes_its_partner_along_for_biflows():
    from agent.records import EGRESS

    table = flowtable.FlowTable(idle_timeout_s=5)
    f = flows(2, t=1000)
    f["key"]["sport"][1], f["key"]["dport"][1] = f["key"]["dport"][0], f["key"]["sport"][0]
    f["key"]["direction"][1] = EGRESS
    f["last_ms"][1] = 4000  # the reply went on later
    table.update(f)
    due = table.expire(6500)  # only the first is idle
    assert len(due) == 1
    partners = table.partners(due)
    assert len(partners) == 1 and partners["end_reason"][0] == 1 and len(table) == 0


def test_biflow_ties_in_one_millisecond_go_to_the_request_or_the_client_port():
    from agent.biflow import pair
    from agent.records import EGRESS

    f = flows(4, t=1000)  # all four in the same millisecond
    k = f["key"]
    k["sport"][0], k["dport"][0] = 80, 40000  # server's answer, listed first
    k["sport"][1], k["dport"][1], k["direction"][1] = 40000, 80, EGRESS
    k["proto"][2:], k["sport"][2:] = 58, 0
    k["dport"][2], k["dport"][3], k["direction"][3] = 129 << 8, 128 << 8, EGRESS  # reply first
    out = pair(f)
    got = sorted((int(r["key"]["proto"]), int(r["key"]["sport"]), int(r["key"]["dport"]))
                 for r in out)
    assert got == [(17, 40000, 80), (58, 0, 128 << 8)]


def test_a_pods_traffic_series_go_when_the_pod_goes():
    from agent.kube import Pod
    from agent.metrics import Metrics
    from agent.records import EGRESS

    m = Metrics()
    web = Pod("u1", "shop", "web", ("10.0.0.1",), False, "true")
    batch = flows(3)
    batch["key"]["ifindex"] = 4
    batch["key"]["direction"][2] = EGRESS
    m.pod_traffic(batch, {4: web})
    get = m.registry.get_sample_value
    assert get("cniflow_pod_bytes_total", {"namespace": "shop", "pod": "web",
                                           "direction": "sent"}) == 200
    assert get("cniflow_pod_packets_total", {"namespace": "shop", "pod": "web",
                                             "direction": "received"}) == 1
    m.pod_traffic(batch[:0], {})  # the pod is gone
    assert get("cniflow_pod_bytes_total", {"namespace": "shop", "pod": "web",
                                           "direction": "sent"}) is None


@pytest.mark.parametrize("hz", [100, 250, 300, 1000])
def test_jiffies_become_wall_clock_milliseconds_at_any_hz(hz):
    """The drain's clock: HZ measured from readings, and a flow's jiffies placed in
    wall-clock time. The stored jiffies are past 2**32 (as on Linux from boot on), the
    readings only their low 32 bits."""
    from bpf.drain import Jiffies

    base = (1 << 32) - 5 * hz

    def read() -> int:
        return (base + int(time.monotonic() * hz)) & 0xFFFFFFFF

    clock = Jiffies(read, seconds=0.1)
    assert clock.hz == hz
    now_j = base + int(time.monotonic() * hz)  # 64-bit jiffies, as the program stores them
    place = clock.placer()
    t = np.array([now_j, now_j - hz, now_j - 10 * hz], np.uint64)
    place(t)
    now_ms = time.time() * 1000
    tick = 1000 / hz
    assert abs(t[0] - now_ms) <= tick + 5
    assert list(np.diff(t.astype(np.int64))) == [-1000, -9000]


def test_a_service_as_the_api_serves_it_names_what_kube_proxy_translates():
    """ClusterIPs (dual-stack), external IPs and load balancer IPs in VIP mode are the
    node's to translate; an ingress in Proxy mode is the load balancer's own (kube-proxy
    leaves it alone) and a headless Service has no ClusterIP."""
    from agent.kube import service_from

    svc = service_from({
        "metadata": {"namespace": "shop", "name": "db"},
        "spec": {"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10", "fd00:96::10"],
                 "externalIPs": ["192.0.2.7"], "ports": [{"name": "sql", "port": 80,
                                                          "protocol": "UDP", "nodePort": 30080}]},
        "status": {"loadBalancer": {"ingress": [{"ip": "198.51.100.1", "ipMode": "VIP"},
                                                {"ip": "198.51.100.2", "ipMode": "Proxy"},
                                                {"hostname": "lb.example"}]}}})
    assert svc.addresses == ("10.96.0.10", "fd00:96::10", "192.0.2.7", "198.51.100.1")
    assert svc.cluster_ips == ("10.96.0.10", "fd00:96::10")
    assert [(p.name, p.protocol, p.port, p.node_port) for p in svc.ports] == [
        ("sql", "UDP", 80, 30080)]
    headless = service_from({"metadata": {"namespace": "shop", "name": "h"},
                             "spec": {"clusterIP": "None", "ports": []}})
    assert (headless.addresses, headless.cluster_ips) == ((), ())


def test_a_collector_away_costs_a_probe_and_the_journal_always_holds_what_is_unsent():
    """Over UDP to a port nobody listens on: everything waits. The next export encodes
    only the first 1,000 records (the probe) and leaves the rest in the order they
    came; what is committed before anything leaves ends, after the export, with
    exactly the backlog (progress says how many of it left). When the collector is
    back, the probe goes, the rest is committed again in its new order and goes."""
    import socket

    from agent.exporter import PROBE, Exporter
    from agent.ipfix.decoder import Decoder, records
    from agent.metrics import Metrics
    from agent.transport import UdpTransport

    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    port = rx.getsockname()[1]
    rx.close()  # nobody listens yet
    e = Exporter(UdpTransport("127.0.0.1", port), 1, Metrics())
    commits: list[bytes] = []
    sent: list[int] = []

    def export(recs):
        e.export(recs, {}, commit=lambda held: commits.append(held.tobytes()),
                 progress=sent.append)
        committed = np.frombuffer(commits[-1], FLOW_DTYPE)
        assert committed[sent[-1]:].tobytes() == e.backlog.tobytes()  # the unsent tail

    export(flows(5000))
    assert len(e.backlog) == 5000 and sent[-1] == 0
    before = e.backlog.copy()
    export(flows(10, port0=9000))  # still away: the probe alone was encoded
    assert len(commits) == 2 and len(e.backlog) == 5010
    assert e.backlog[PROBE:].tobytes() == np.concatenate([before[PROBE:],
                                                          flows(10, port0=9000)]).tobytes()
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", port))
    rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    rx.settimeout(0.3)
    export(flows(0))  # back: the probe, then the rest committed again and sent
    assert len(commits) == 4 and len(e.backlog) == 0
    assert len(np.frombuffer(commits[-1], FLOW_DTYPE)) == 5010 - PROBE
    d, ports = Decoder(), []
    with contextlib.suppress(TimeoutError):
        while True:
            for rs in d.message(rx.recv(65535), "x"):
                ports += [r["sourceTransportPort"] for r in records(rs) if "packetDeltaCount" in r]
    assert sorted(ports) == sorted(list(range(1, 5001)) + list(range(9000, 9010)))


def test_a_signal_always_stops_a_process_waiting_on_its_stop():
    """SIGTERM lands at any point of a loop of Stop.wait(0), the worst case of the
    agent's 20 ms waits (with threading.Event, over half of these processes hung: the
    handler's set() waited for the lock the interrupted wait() held). SIGUSR1 first
    writes the stacks to stderr and the process goes on."""
    import random
    import signal
    import sys

    code = ("from agent.stopping import Stop, on_signals\n"
            "s = Stop(); on_signals(s); print('ready', flush=True)\n"
            "while not s.wait(0): pass\n")
    rng = random.Random(5)
    for i in range(20):
        p = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        try:
            assert p.stdout.readline() == "ready\n"
            if i == 0:
                p.send_signal(signal.SIGUSR1)
                time.sleep(0.2)
            time.sleep(rng.random() * 0.01)
            p.send_signal(signal.SIGTERM)
            assert p.wait(5) == 0
            if i == 0:
                assert "in <module>" in p.stderr.read()  # the main thread's stack
        finally:
            p.kill()
            p.wait()
