"""The decoder and the `cniflow collector`, against real captures and real exporters."""

from __future__ import annotations

import subprocess
from collections import Counter
from pathlib import Path

import pytest

from agent.ipfix.decoder import Decoder, records, split_stream
from agent.ipfix.registry import VARLEN

CAPTURES = Path(__file__).resolve().parents[2] / "shared" / "captures"
PCAPS = sorted(CAPTURES.glob("*.pcap"))


def test_the_shared_captures_are_there():
    """The capture tests below are parametrized by these files: none would be a skip."""
    assert len(PCAPS) >= 16, f"{CAPTURES} is missing: shared/ must sit beside the checkout"

# tshark field -> our element names whose values it shows (forward and RFC 5103 reverse)
COMPARED = {
    "cflow.srcaddr": ["sourceIPv4Address"],
    "cflow.dstaddr": ["destinationIPv4Address"],
    "cflow.srcaddrv6": ["sourceIPv6Address"],
    "cflow.dstaddrv6": ["destinationIPv6Address"],
    "cflow.srcport": ["sourceTransportPort"],
    "cflow.dstport": ["destinationTransportPort"],
    "cflow.protocol": ["protocolIdentifier"],
    "cflow.octets": ["octetDeltaCount", "reverseOctetDeltaCount"],
    "cflow.packets": ["packetDeltaCount", "reversePacketDeltaCount"],
    # strings: a fixed-length one padded with NULs (Huawei's VRF name, Cisco's sampler
    # and interface names) reads as tshark shows it, without them
    "cflow.vrfname": ["VRFname"],
    "cflow.if_name": ["interfaceName"],
    "cflow.sampler_name": ["samplerName"],
    "cflow.selector_name": ["selectorName"],
}


def decode_args(pcap: Path) -> list[str]:
    args = []
    for port in (4739, 9991, 9992, 9995, 9997):
        args += ["-d", f"udp.port=={port},cflow", "-d", f"tcp.port=={port},cflow"]
    return args


def exporter_payloads(pcap: Path) -> list[tuple[bytes, str]]:
    """UDP payloads one by one; a TCP stream reassembled and framed into messages."""
    out = subprocess.run(["tshark", "-r", str(pcap), "-T", "fields", "-e", "udp.payload",
                          "-e", "tcp.payload", "-e", "ip.src", "-e", "udp.srcport",
                          "-e", "tcp.srcport"], capture_output=True, text=True, check=True).stdout
    msgs, streams = [], {}
    for line in out.splitlines():
        udp, tcp, src, usport, tsport = (line.split("\t") + [""] * 5)[:5]
        if udp:
            msgs.append((bytes.fromhex(udp), f"{src}:{usport}"))
        elif tcp:
            key = f"{src}:{tsport}"
            streams[key] = streams.get(key, b"") + bytes.fromhex(tcp)
    for key, data in streams.items():
        framed, rest = split_stream(data)
        if not framed:  # the other direction of the connection (the collector's): no IPFIX
            continue
        assert rest == b""
        msgs.extend((m, key) for m in framed)
    return msgs


def tshark_values(pcap: Path) -> dict[str, Counter]:
    cmd = ["tshark", "-r", str(pcap), *decode_args(pcap), "-T", "fields", "-E", "occurrence=a",
           "-E", "aggregator=|"]
    for f in COMPARED:
        cmd += ["-e", f]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    got = {f: Counter() for f in COMPARED}
    for line in out.splitlines():
        for f, col in zip(COMPARED, line.split("\t"), strict=False):
            for v in col.split("|") if col else []:
                got[f][v] += 1
    return got


def our_values(pcap: Path) -> tuple[dict[str, Counter], Decoder, int]:
    d = Decoder()
    got = {f: Counter() for f in COMPARED}
    n = 0
    for data, exporter in exporter_payloads(pcap):
        for rs in d.message(data, exporter):
            for row in records(rs):
                n += 1
                for key, v in row.items():  # "name#2": the same element again
                    for f, names in COMPARED.items():
                        if key.split("#")[0] in names:
                            got[f][str(v)] += 1
    return got, d, n


@pytest.mark.parametrize("pcap", PCAPS, ids=[p.name[:40] for p in PCAPS])
def test_every_capture_decodes_and_agrees_with_tshark(pcap):
    ours, decoder, n = our_values(pcap)
    assert n > 0 and not decoder.errors, dict(decoder.errors)
    theirs = tshark_values(pcap)
    for f in COMPARED:
        assert ours[f] == theirs[f], (f, ours[f] - theirs[f], theirs[f] - ours[f])


def test_an_ipfix_file_of_reduced_size_counters_decodes_whole():
    """CESNET's example file: 3979 records, reduced-size counters, 68 messages of which
    one is a bare 16-octet header (legal; python-ipfix refuses it)."""
    data = (CAPTURES / "cesnet-ipfixcol2-example_flows.ipfix").read_bytes()
    msgs, rest = split_stream(data)
    assert len(msgs) == 68 and rest == b"" and sum(len(m) == 16 for m in msgs) == 1
    d = Decoder()
    rows = [r for m in msgs for rs in d.message(m, "file") for r in records(rs)]
    assert len(rows) == 3979 and not d.errors
    assert d.stats["sequence_gaps"] == 1  # the one discontinuity the file is known for
    assert all(isinstance(r.get("octetDeltaCount", 0), int) for r in rows)


# ---- the running collector ----------------------------------------------------------

import contextlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import struct  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402

import netlab  # noqa: E402
import numpy as np  # noqa: E402
import oracles  # noqa: E402
from conftest import CNIFLOW, agent, terminate, wait_for  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from test_metering import send_udp  # noqa: E402


class RunningCollector:
    def __init__(self, netns: str, port: int, transport: str = "udp", metrics_port: int = 9478,
                 *extra: str):
        self.dir = Path(f"/tmp/cniflow-collector-{os.getpid()}-{port}")
        self.dir.mkdir(exist_ok=True)
        self.out = self.dir / "records.jsonl"
        self.out.unlink(missing_ok=True)
        self.netns, self.metrics_port = netns, metrics_port
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", netns, str(CNIFLOW), "collector", "--listen",
             f"127.0.0.1:{port}", "--transport", transport, "--output", str(self.out),
             "--metrics-address", f"127.0.0.1:{metrics_port}", *extra],
            stderr=(self.dir / "log").open("w"))
        oracles._wait_port(netns, port, "u" if transport == "udp" else "t", 15)

    def metrics(self) -> dict[str, float]:
        out = subprocess.run(["ip", "netns", "exec", self.netns, "curl", "-s",
                              f"127.0.0.1:{self.metrics_port}/metrics"],
                             capture_output=True, text=True).stdout
        vals = {}
        for line in out.splitlines():
            if line and not line.startswith("#"):
                k, _, v = line.rpartition(" ")
                vals[k] = float(v)
        return vals

    def records(self) -> list[dict]:
        if not self.out.exists():
            return []
        return [json.loads(line) for line in self.out.read_text().splitlines() if line]

    def stop(self) -> list[dict]:
        assert terminate(self.proc, self.dir / "log") == 0, (self.dir / "log").read_text()
        return self.records()


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_the_agents_export_read_by_cniflow_collector(node, transport):
    a, b = node.pods
    collector = RunningCollector(node.netns, 4739, transport)
    tshark = oracles.Tshark(node.netns, 4739, proto=transport)
    with agent(node, "--idle-timeout", "1", "--transport", transport):
        send_udp(node, 0, b.ipv4, 9800, count=7, size=100)
        send_udp(node, 0, b.ipv6, 9801, count=3, size=200)
        time.sleep(2.5)
    tshark.stop()
    rows = collector.stop()
    assert tshark.expert() == []
    flows = [r for r in rows if "octetDeltaCount" in r]
    v4 = [r for r in flows if r.get("destinationTransportPort") == 9800]
    v6 = [r for r in flows if r.get("destinationTransportPort") == 9801]
    def counts(rows):
        return sum(r["packetDeltaCount"] for r in rows), sum(r["octetDeltaCount"] for r in rows)

    assert counts(v4) == (7, 7 * 128) and counts(v6) == (3, 3 * 248)  # once, at the sender's
    assert {r["interfaceName"] for r in v4} == {a.host_if}
    assert {r["sourceIPv6Address"] for r in v6} == {a.ipv6}
    assert all(r["@domain"] == 1 and r["@template"] in (256, 257) for r in flows)
    # options records: the interface table and the export statistics (nothing lost)
    index = {name: int(netlab.sh(node.exec(f"cat /sys/class/net/{name}/ifindex")).stdout)
             for name in (a.host_if, b.host_if)}
    table = {r["interfaceName"]: r["ingressInterface"] for r in rows if r["@template"] == 262}
    assert table == index
    stats = [r for r in rows if r["@template"] == 261]
    assert stats and all(r["notSentFlowTotalCount"] == 0 for r in stats)
    if transport == "tcp":  # the data templates withdrawn before the connection closed
        out = subprocess.run(["tshark", "-r", str(tshark.pcap), *tshark.decode_args(),
                              "-Y", "cflow.template_field_count == 0", "-T", "fields",
                              "-e", "cflow.template_id", "-E", "occurrence=a",
                              "-E", "aggregator=,"], capture_output=True, text=True).stdout
        assert set(out.split()[-1].split(",")) == {"256", "257"}
    if transport == "udp":  # tshark reads the same datagrams: every record agrees
        def key(r):
            return (r.get("sourceIPv4Address") or r.get("sourceIPv6Address"),
                    r["destinationTransportPort"], r["packetDeltaCount"], r["octetDeltaCount"])
        theirs = sorted((t["src"], t["dport"], t["packets"], t["octets"])
                        for t in tshark.records() if t["proto"] in (6, 17))
        ours = sorted(key(r) for r in flows if r["protocolIdentifier"] in (6, 17))
        assert ours == theirs
        # nfdump and nfacctd, fed the same datagrams, agree record for record too
        other = netlab.up(node.prefix + "r", 0)
        try:
            nfcapd = oracles.Nfcapd(other.netns, 4741)
            nfacctd = oracles.Nfacctd(other.netns, 4742)
            oracles.replay(tshark.pcap, other.netns, 4741, decode_port=4739)
            oracles.replay(tshark.pcap, other.netns, 4742, decode_port=4739)
            time.sleep(0.5)
            by_nfdump, by_nfacctd = nfcapd.stop(), nfacctd.stop()
        finally:
            netlab.down(node.prefix + "r")

        def oracle_keys(rows, proto_key="proto"):
            return sorted((r["src"], r["dport"], r["packets"], r["octets"]) for r in rows
                          if r[proto_key] in (6, 17))

        assert oracle_keys(by_nfdump) == ours
        # nfacctd aggregates by its key (no interface): compare the sums per flow key
        agg = Counter()
        for r in flows:
            if r["protocolIdentifier"] in (6, 17):
                agg[key(r)[:2]] += r["packetDeltaCount"]
        got = Counter()
        for r in by_nfacctd:
            if r["proto"] in (6, 17):
                got[(r["src"], r["dport"])] += r["packets"]
        assert got == agg


def garbage(rng: random.Random) -> bytes:
    """Malformed IPFIX of the kinds the issue lists."""
    kind = rng.randrange(7)
    if kind == 0:
        return rng.randbytes(rng.randrange(1, 200))
    if kind == 1:  # truncated header
        return struct.pack("!HH", 10, 40)
    if kind == 2:  # length that lies
        return struct.pack("!HHIII", 10, 1000, 0, 0, 7) + rng.randbytes(20)
    if kind == 3:  # reserved set id
        return struct.pack("!HHIIIHH", 10, 24, 0, 0, 7, 4, 8) + b"\0" * 4
    if kind == 4:  # template with no fields... then one with far too many
        body = struct.pack("!HH", 300, 0) + struct.pack("!HH", 301, 5000)
        return struct.pack("!HHIIIHH", 10, 20 + 4 + len(body), 0, 0, 7, 2, 4 + len(body)) + body
    if kind == 5:  # a varlen template, then data whose length runs past the end
        tpl = struct.pack("!HHHH", 302, 1, 82, 0xFFFF)
        data = b"\xff\x10\x00abc"
        return (struct.pack("!HHIII", 10, 16 + 4 + len(tpl) + 4 + len(data), 0, 0, 7)
                + struct.pack("!HH", 2, 4 + len(tpl)) + tpl + struct.pack("!HH", 302, 4 + len(data))
                + data)
    return struct.pack("!HHIIIHH", 10, 24, 0, 0, 7, 999, 3)  # set shorter than its header


def test_bad_input_is_counted_and_never_harms_another_exporter(node):
    collector = RunningCollector(node.netns, 4739)
    pcap = CAPTURES / "pmacctd-1.7.7-nfprobe-ipfix-udp.pcap"
    good = [m for m, _ in exporter_payloads(pcap)]
    code = ("import socket,sys\n"
            "b=socket.socket(2,2);b.bind(('127.0.0.1',0))\n"
            "g=socket.socket(2,2);g.bind(('127.0.0.1',0))\n"
            "for line in sys.stdin:\n"
            "    who, hexdata = line.split()\n"
            "    (g if who == 'good' else b).sendto(bytes.fromhex(hexdata), ('127.0.0.1', 4739))\n")
    rng = random.Random(7)
    lines = []
    for m in good:
        lines += [f"bad {garbage(rng).hex()}" for _ in range(200)] + [f"good {m.hex()}"]
    subprocess.run(["ip", "netns", "exec", node.netns, "/usr/bin/python3", "-c", code],
                   input="\n".join(lines) + "\n", text=True, check=True)
    assert wait_for(lambda: sum(v for k, v in collector.metrics().items()
                                if k.startswith("cniflow_collector_records_total")) >= 13, 10)
    m = collector.metrics()
    errors = sum(v for k, v in m.items() if k.startswith("cniflow_collector_decode_errors_total"))
    assert errors > 500
    rows = collector.stop()
    assert len([r for r in rows if r["@domain"] == 7]) >= 13  # every good record (ODID 7)
    log = (collector.dir / "log").read_text()
    assert len(log.splitlines()) < 40  # bounded logging


def mutated(messages: list[bytes]):
    return st.sampled_from(messages).flatmap(lambda m: st.tuples(
        st.just(m), st.lists(st.tuples(st.integers(0, len(m) - 1), st.integers(0, 255)),
                             max_size=8), st.integers(0, len(m))))


SAMPLES = [m for p in PCAPS[:6] for m, _ in exporter_payloads(p)]
REAL = [([m for m, _ in exporter_payloads(p)], f"{p.stem[:20]}:1") for p in PCAPS]


def cniflow_messages(n: int) -> list[bytes]:
    """cniflow's own export: its IPv4 template with interface names of three lengths,
    the records of one length in sets of their own (string runs), after the template."""
    from test_units import flows

    from agent.ipfix.flows import TEMPLATE_V4, columns
    from agent.ipfix.message import encode_records, message, pack, template_sets

    f = flows(n)
    f["key"]["ifindex"] = np.arange(n) % 3 + 7
    names = {7: "cali1a2b3c4d5e6", 8: "lxc0123456789ab", 9: "veth12ab34cd"}
    msgs = pack(TEMPLATE_V4.id, encode_records(TEMPLATE_V4, columns(f, names), n), 1400,
                1_795_000_000, 9, 0)
    buf = msgs.buf.tobytes()
    return [message(template_sets([TEMPLATE_V4]), 1_795_000_000, 0, 9)] + [
        buf[o : o + ln] for o, ln in zip(msgs.offsets.tolist(), msgs.lengths.tolist(),
                                         strict=True)]


@settings(max_examples=3000, deadline=None, suppress_health_check=list(HealthCheck))
@given(mutated(SAMPLES), st.binary(max_size=64))
def test_fuzzed_messages_never_crash_the_decoder(case, noise):
    message, flips, cut = case
    data = bytearray(message)
    for pos, byte in flips:
        data[pos] = byte
    d = Decoder(hold_bytes=1 << 16)
    for blob in (message, bytes(data[:cut]) + noise, bytes(data)):
        for rs in d.message(blob, "fuzz"):
            records(rs)
    for s in d.sessions.values():
        assert s.held_bytes <= 1 << 16


def test_a_udp_collector_that_restarts_loses_nothing_and_gets_templates_first(node):
    """While the node-local collector is away, every datagram is refused (ICMP port
    unreachable, back within the send): the agent keeps those records in its backlog
    instead of counting them exported, and when the collector is back it sends its
    templates first, then everything it kept. Over several polls of absence, with
    traffic throughout, the collectors together get every packet, once."""
    a, b = node.pods
    first = RunningCollector(node.netns, 4739)
    with agent(node, "--idle-timeout", "0.5", "--active-timeout", "1") as running:
        send_udp(node, 0, b.ipv4, 9860, count=5, size=10)
        assert wait_for(lambda: first.metrics().get(
            'cniflow_collector_records_total{exporter="127.0.0.1"}'), 10)
        rows = first.stop()
        for port in range(9861, 9866):  # five polls' worth, none of them taken
            send_udp(node, 0, b.ipv4, port, count=5, size=10)
            time.sleep(0.8)
        m = running.metrics()
        assert m["cniflow_export_errors_total"] > 0 and m["cniflow_export_backlog_records"] > 0, m
        second = RunningCollector(node.netns, 4739)
        send_udp(node, 0, b.ipv4, 9866, count=150, size=10)
        assert wait_for(lambda: sum(r["packetDeltaCount"] for r in second.records() if
                                    r.get("destinationTransportPort") == 9866) == 150, 10)
        assert wait_for(lambda: running.metrics()["cniflow_export_backlog_records"] == 0, 5)
        time.sleep(1)
        # exported counts what a collector received, nothing more
        exported = running.metrics()["cniflow_records_exported_total"]
        flows = [r for r in rows + second.records() if "packetDeltaCount" in r]
        assert exported == len(flows)  # (options records: interface names, types)
        assert second.metrics().get("cniflow_collector_dropped_sets_total", 0) == 0
    rows += second.stop()
    by_port = Counter()
    for r in rows:
        if 9860 <= r.get("destinationTransportPort", 0) <= 9866:
            by_port[r["destinationTransportPort"]] += r["packetDeltaCount"]
    assert by_port == {9860: 5, 9861: 5, 9862: 5, 9863: 5, 9864: 5, 9865: 5, 9866: 150}


def test_a_udp_collector_restarted_between_two_exports_decodes_the_next_one(node):
    """A collector that restarts while the agent has nothing to export sees no refusal
    (nothing was sent): templates go with every export, so the next records decode at
    once rather than after a template refresh."""
    a, b = node.pods
    first = RunningCollector(node.netns, 4739)
    with agent(node, "--idle-timeout", "0.5") as running:
        send_udp(node, 0, b.ipv4, 9870, count=5, size=10)
        assert wait_for(lambda: [r for r in first.records()
                                 if r.get("destinationTransportPort") == 9870], 10)
        time.sleep(1.5)  # everything exported: no export until new traffic
        errors = running.metrics()["cniflow_export_errors_total"]
        first.stop()
        second = RunningCollector(node.netns, 4739)  # back before any export
        send_udp(node, 0, b.ipv4, 9871, count=5, size=10)
        got = wait_for(lambda: sum(r["packetDeltaCount"] for r in second.records()
                                   if r.get("destinationTransportPort") == 9871) == 5, 5)
        assert running.metrics()["cniflow_export_errors_total"] == errors  # none refused
    second.stop()
    assert got


@pytest.mark.parametrize("max_message", [512, 1400])
def test_templates_and_options_fit_the_message_size_with_300_pods(node, max_message):
    """300 pods' interfaces (long names) and the RFC 5610 type records: templates and
    options are split over messages of at most --max-message-size octets, sequence
    numbers count them, and every interface arrives, read by cniflow's decoder and by
    tshark (no expert warning)."""
    import numpy as np
    from fakeapi import in_netns

    from agent.exporter import Exporter
    from agent.ipfix.decoder import Decoder, records
    from agent.metrics import Metrics
    from agent.records import FLOW_DTYPE
    from agent.transport import UdpTransport

    sink = in_netns(node.netns, lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
    sink.bind(("127.0.0.1", 4739))
    tshark = oracles.Tshark(node.netns, 4739)
    ifnames = {1000 + i: f"lxc{i:04d}abcdef01" for i in range(300)}
    transport = in_netns(node.netns, lambda: UdpTransport("127.0.0.1", 4739))
    exporter = Exporter(transport, 1, Metrics(), max_message=max_message, with_pods=True)
    exporter._send_templates_if_due(ifnames)
    ifnames[2000] = "lxc-late-one"  # a pod more: the options again, at once
    exporter.export(np.zeros(0, FLOW_DTYPE), ifnames, None)
    exporter._send_options_if_changed(ifnames)
    sink.settimeout(1)
    datagrams = []
    with contextlib.suppress(TimeoutError):
        while True:
            datagrams.append(sink.recv(65536))
    sink.close()
    transport.close()
    tshark.stop()
    assert len(datagrams) > 3 and max(map(len, datagrams)) <= max_message
    d = Decoder()
    table: dict[int, str] = {}
    for msg in datagrams:
        for rs in d.message(msg, "agent"):
            if rs.spec.id == 262:
                table.update((r["ingressInterface"], r["interfaceName"]) for r in records(rs))
    assert table == ifnames and not d.errors and d.stats["sequence_gaps"] == 0
    assert {258, 259, 260, 261, 262} <= set(d.sessions[("agent", 1)].templates)
    assert tshark.expert() == []


def test_a_hostile_exporters_sequences_never_touch_the_process_or_another_exporter(tmp_path):
    """Stateful fuzzing (tests/statefuzz.py): 20,000 messages of a hostile exporter that
    builds, renames (RFC 5610 names colliding with registry names, with each other and
    with numbered repeats), withdraws and reuses state across messages, interleaved
    with a good exporter. Nothing escapes the collector, every good record arrives with
    its values, the hostile one's errors are counted, and its state stays bounded."""
    import random

    import statefuzz

    from agent.collector import Collector
    from agent.config import CollectorConfig
    from agent.outputs import FileOutput

    out = tmp_path / "out.jsonl"
    collector = Collector(CollectorConfig(), [FileOutput(str(out), 0, 1)])
    rng = random.Random(7)
    hostile = [statefuzz.Hostile(random.Random(rng.random())) for _ in range(3)]
    sent = 0
    for i in range(20_000):
        batch = [(h.next(), f"10.0.0.{k}:4739") for k, h in enumerate(hostile)]
        if i % 10 == 0:
            sent += 1
            batch.insert(rng.randint(0, 3), (statefuzz.good(i // 10 * 5, sent), "10.9.9.9:4739"))
        collector.handle(batch)
    collector.outputs[0].close()
    good = [json.loads(line) for line in out.read_text().splitlines()
            if '"@exporter":"10.9.9.9:4739"' in line]
    assert [(r["sourceIPv4Address"], r["packetDeltaCount"], r["octetDeltaCount"])
            for r in good] == [("10.0.0.1", n, n * 100) for n in range(1, sent + 1)]
    d = collector.decoder
    assert sum(d.errors.values()) > 1000 and len(d.errors) < 60, d.errors
    assert all(len(n) <= 1024 for n in d.names.values())
    assert d.templates_total <= 4096


def test_a_set_that_fails_to_format_costs_only_its_own_records(tmp_path, monkeypatch):
    """A table that fails to format is formatted again a set at a time: the other
    exporters' lines arrive whole and in order, the failing set is its exporter's
    counted error. A table that fails after a piece of it was written goes on from the
    set that was cut short: that one is the error (its lines written stay, once), the
    sets after it are formatted alone. An output's own error is not a formatting error:
    its lines are counted lost, the other outputs go on. The failures are made up: the
    decoder's checks let through nothing that fails. (cniflow's string runs are made
    tables at once here, as the layouts of a long-running collector are.)"""
    from agent import jsonlines
    from agent.collector import Collector
    from agent.config import CollectorConfig
    from agent.ipfix import decoder
    from agent.outputs import FileOutput

    monkeypatch.setattr(decoder, "ADMIT", 0)

    group, emit = jsonlines._group, jsonlines._Out.emit

    def failing(sets, out):
        if any(rs.exporter.startswith("10.0.0.66:") for rs in sets):
            raise ValueError("made up")
        return group(sets, out)

    def alone(exporter: str) -> bytes:
        return jsonlines.encode(Decoder().messages([(m, exporter) for m in OWN[:4]])[0]).text

    monkeypatch.setattr(jsonlines, "_group", failing)
    exporters = ("10.0.0.1:4739", "10.0.0.66:4739", "10.0.0.2:4739")
    batch = [(m, e) for e in exporters for m in OWN[:4]]
    out = tmp_path / "out.jsonl"
    collector = Collector(CollectorConfig(), [FileOutput(str(out), 0, 1)])
    errors = collector.decoder.errors
    collector.handle(batch)
    expected = alone(exporters[0]) + alone(exporters[2])
    assert out.read_bytes() == expected and expected.count(b"\n") > 100
    assert len(Decoder().messages(batch[4:8])[0]) == 1  # one set an exporter
    assert errors["unexpected ValueError formatting"] == 1

    # a failure after the table's first piece went out
    monkeypatch.setattr(jsonlines, "_group", group)
    monkeypatch.setattr(jsonlines, "_PIECE", 4096)  # pieces of a few lines
    calls = []

    def second_piece_fails(self, text, count, keys):
        calls.append(count)
        if len(calls) == 2:
            raise ValueError("made up")
        return emit(self, text, count, keys)

    monkeypatch.setattr(jsonlines._Out, "emit", second_piece_fails)
    collector.handle([(m, e) for e in ("10.0.0.3:4739", "10.0.0.4:4739") for m in OWN[:4]])
    lines = out.read_bytes()[len(expected):]
    cut = alone("10.0.0.3:4739").splitlines(keepends=True)
    assert 0 < calls[0] < len(cut)
    assert lines == b"".join(cut[:calls[0]]) + alone("10.0.0.4:4739")
    assert errors["unexpected ValueError formatting"] == 2

    # an output that fails: its lines counted lost, the other output misses none, no
    # exporter blamed; encode() itself hands the output's error on as it is
    def disk_full(lines):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(jsonlines._Out, "emit", emit)
    full = type("Full", (), {"write": staticmethod(disk_full), "name": "full"})()
    collector.outputs.append(full)
    collector.handle([(m, "10.0.0.5:4739") for m in OWN[:4]])
    collector.outputs[0].close()
    assert out.read_bytes()[len(expected) + len(lines):] == alone("10.0.0.5:4739")
    lost = collector.metrics.registry.get_sample_value(
        "cniflow_collector_output_failed_lines_total", {"output": "full"})
    assert lost == alone("10.0.0.5:4739").count(b"\n")
    assert sum(errors.values()) == 2
    sets = Decoder().messages([(m, "10.0.0.5:4739") for m in OWN[:4]])[0]
    with pytest.raises(OSError, match="No space left"):
        jsonlines.encode(sets, sink=disk_full, failed=lambda rs, e: errors.update(x=1))
    assert "x" not in errors


def test_a_full_disk_loses_only_the_lines_it_cannot_hold(tmp_path):
    """A real full file system (a tmpfs of 256 KB, most of it taken): the file keeps
    whole lines only (a piece the disk took part of is cut back off), the other output
    gets every line, what the full one missed is counted, and once there is room again
    the lines go on to the same file."""
    from agent.collector import Collector
    from agent.config import CollectorConfig
    from agent.outputs import FileOutput

    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "cniflow-test", str(small)],
                   check=True)
    outputs: list[FileOutput] = []
    try:
        filler = small / "filler"
        filler.write_bytes(b"x" * 160_000)
        on_full, on_disk = small / "out.jsonl", tmp_path / "all.jsonl"
        outputs += [FileOutput(str(on_full), 0, 1), FileOutput(str(on_disk), 0, 1)]
        collector = Collector(CollectorConfig(), outputs)

        def batch(n: int, exporters: int = 8) -> None:
            collector.handle([(m, f"10.0.{n}.{k}:4739") for k in range(exporters)
                              for m in OWN[:4]])

        for n in range(3):
            batch(n)
        lost = collector.metrics.registry.get_sample_value(
            "cniflow_collector_output_failed_lines_total", {"output": str(on_full)})
        kept = on_full.read_bytes()
        assert lost and kept.endswith(b"\n")
        every = on_disk.read_bytes().splitlines()
        assert len(kept.splitlines()) + lost == len(every)
        assert [json.loads(x) for x in kept.splitlines()]  # whole lines, each
        left = iter(every)  # in the order they came, a subsequence of every line
        assert all(any(x == y for y in left) for x in kept.splitlines())

        filler.unlink()  # room again: the next batch goes to the same file, whole
        batch(3, exporters=1)
        after = on_full.read_bytes()[len(kept):].splitlines()
        assert after == on_disk.read_bytes().splitlines()[len(every):] and after
        assert collector.metrics.registry.get_sample_value(
            "cniflow_collector_output_failed_lines_total", {"output": str(on_full)}) == lost
    finally:
        for output in outputs:
            output.close()
        subprocess.run(["umount", str(small)], check=True)


def _by_layout(sets) -> dict:
    """Records by exporter, domain and layout (template, field names and lengths; a set
    of rows, records in no run, apart), in order, each with its export time."""
    out: dict = {}
    for rs in sets:
        layout = ("rows", rs.spec.id) if rs.array is None else (rs.spec.id, tuple(
            (f.name, f.length) for f in rs.spec.fields))
        times = np.broadcast_to(np.asarray(rs.export_time), (len(rs),)).tolist()
        rows = out.setdefault((rs.exporter, rs.domain, layout), [])
        rows += [(t, repr(r)) for t, r in zip(times, records(rs), strict=True)]
    return out


OWN = cniflow_messages(2000)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.integers(0, 2**32), st.integers(1, 64))
def test_a_batch_decodes_as_its_messages_one_by_one(seed, size):
    """Decoder.messages(), which gathers single-data-set messages of known templates
    into one array per layout, against message() on each message in turn, over
    batches of hostile (statefuzz), well-behaved and real exporters' messages (16
    captures, cniflow's own string runs among them): the same records of each exporter
    and layout in the same order, export times included, the same counts by exporter,
    statistics and errors, and the same exporters told of their errors."""
    import random

    import statefuzz

    rng = random.Random(seed)
    hostile = [statefuzz.Hostile(random.Random(rng.random())) for _ in range(2)]
    real = rng.sample(REAL, 2) + [(OWN, "10.8.8.8:4739")]
    stream, good, at = [], 0, [0] * len(real)  # each real exporter from its first message
    for _ in range(400):
        pick = rng.random()
        if pick < 0.2:
            k = rng.randrange(2)
            stream.append((hostile[k].next(), f"10.0.0.{k}:4739"))
        elif pick < 0.4:
            good += 1
            stream.append((statefuzz.good(good, good), "10.9.9.9:4739"))
        else:
            k = rng.randrange(len(real))
            msgs, exporter = real[k]
            stream.append((msgs[at[k] % len(msgs)], exporter))
            at[k] += 1
    one, batched = Decoder(hold_bytes=1 << 14), Decoder(hold_bytes=1 << 14)
    want_sets, want_counts, want_told = [], {}, []
    for data, exporter in stream:
        messages, faults = one.stats["messages"], one.faults
        got = one.message(data, exporter)
        c = want_counts.setdefault(exporter, [0, 0, 0])
        c[0] += 1
        c[1] += one.stats["messages"] - messages
        c[2] += sum(map(len, got))
        want_sets += got
        if one.faults != faults:
            want_told.append(exporter)
    got_sets, got_counts, told = [], {}, []
    for start in range(0, len(stream), size):
        sets, counts = batched.messages(stream[start : start + size], told.append)
        got_sets += sets
        for exporter, c in counts.items():
            total = got_counts.setdefault(exporter, [0, 0, 0])
            total[:] = [a + b for a, b in zip(total, c, strict=True)]
    assert _by_layout(got_sets) == _by_layout(want_sets)
    assert got_counts == want_counts and told == want_told
    assert batched.stats == one.stats and batched.errors == one.errors
    assert want_counts["10.8.8.8:4739"][2] > 0  # cniflow's own records among them


def test_a_batchs_metrics_are_what_counting_message_by_message_made_them(caplog):
    """The collector counts once a batch: records and messages by exporter address
    (ports folded), messages of addresses past the label cap counted as such, an
    error counted by reason and logged as the exporter's that sent it."""
    import statefuzz

    from agent.collector import MAX_EXPORTER_LABELS, Collector
    from agent.config import CollectorConfig

    collector = Collector(CollectorConfig(), [])
    batch = [(statefuzz.good(0, 1), "10.0.0.1:1000"), (statefuzz.good(1, 2), "10.0.0.1:1000"),
             (statefuzz.good(0, 3), "10.0.0.1:2000"),  # another port: its own session
             (statefuzz.message([], 0, lie=9), "10.0.0.2:1")]  # longer than its data
    batch += [(statefuzz.good(0, 1), f"10.1.{i >> 8}.{i & 255}:1")
              for i in range(MAX_EXPORTER_LABELS)]  # the last two past the cap
    with caplog.at_level("WARNING", logger="agent.collector"):
        collector.handle(batch)
    value = collector.metrics.registry.get_sample_value
    for label, rows, messages in (("10.0.0.1", 3, 3), ("10.1.0.253", 1, 1),
                                  ("other", 2, 2), ("10.0.0.2", None, None)):
        assert value("cniflow_collector_records_total", {"exporter": label}) == rows
        assert value("cniflow_collector_messages_total", {"exporter": label}) == messages
    assert value("cniflow_collector_exporters_over_cap_total") == 2
    assert value("cniflow_collector_decode_errors_total",
                 {"reason": "message length beyond the data"}) == 1
    assert [r.exporter for r in caplog.records] == ["10.0.0.2:1"]


def test_gathered_records_keep_their_own_message_s_export_time_and_exporter():
    """Messages of one layout from two exporters, interleaved, with export times that
    differ: gathered into arrays, each JSON line still carries its own message's
    exporter, export time and values (the C formatter and polars alike)."""
    import statefuzz

    from agent.jsonlines import encode

    def msg(seq: int, t: int, value: int) -> bytes:
        data = statefuzz.set_(400, bytes([10, 0, 0, 1]) + struct.pack("!QQ", value, value))
        body = (statefuzz.GOOD_TEMPLATE if seq == 0 else b"") + data
        return statefuzz.HEADER.pack(10, 16 + len(body), t, seq, 1) + body

    batch = [(msg(i // 2, 1_700_000_000 + 7 * i, i), f"10.0.0.{i % 2}:1") for i in range(8)]
    d = Decoder()
    sets, _ = d.messages(batch)
    assert any(np.ndim(rs.export_time) == 1 for rs in sets)  # gathered, times per record
    got = sorted((o["@exporter"], o["@exportTime"], o["octetDeltaCount"])
                 for o in map(json.loads, encode(sets).split()))
    assert got == sorted((f"10.0.0.{i % 2}:1", 1_700_000_000 + 7 * i, i) for i in range(8))


@pytest.mark.parametrize("pcap", PCAPS, ids=[p.name[:40] for p in PCAPS])
def test_json_lines_say_exactly_what_the_decoder_says(pcap):
    from agent.jsonlines import encode, flow_key

    d = Decoder()
    sets = [rs for data, exp in exporter_payloads(pcap) for rs in d.message(data, exp)]
    got = encode(sets, keys=True)
    out = [json.loads(line) for line in got.split()]
    assert got.count == len(out) == len(got.keys)
    assert got.keys == [flow_key(o) for o in out]  # the table's keys are the rows' keys
    # a batch is formatted a layout at a time: each exporter's records of one template
    # and string lengths keep their order, and every record is there with its own
    # exporter and template
    expected = [{"@exporter": rs.exporter, "@domain": rs.domain, "@template": rs.spec.id,
                 "@exportTime": rs.export_time, **r} for rs in sets for r in records(rs)]

    varlen = {f.name for rs in sets if rs.array is None for f in rs.spec.fields
              if f.length == VARLEN}  # and those a run of records decoded as an array:
    varlen |= {name.split("#")[0] for rs in sets if rs.array is not None
               for at, _ in rs.spec.length_octets for name, (_, offset) in
               rs.array.dtype.fields.items() if offset == at + 1}

    def by_layout(rows):
        def layout(r):
            return (r["@exporter"], r["@domain"], r["@template"],
                    tuple((k, len(str(v))) for k, v in r.items() if k.split("#")[0] in varlen))
        return {t: [r for r in rows if layout(r) == t] for t in {layout(r) for r in rows}}

    assert by_layout(out) == by_layout([json.loads(json.dumps(r)) for r in expected])


@pytest.fixture
def pki(tmp_path):
    """A CA, the collector's certificate for 127.0.0.1, an agent certificate, and an
    agent certificate from another CA."""
    def run(*args):
        subprocess.run(["openssl", *args], cwd=tmp_path, check=True, capture_output=True)

    for ca in ("ca", "rogue-ca"):
        run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
            f"/CN={ca}", "-keyout", f"{ca}.key", "-out", f"{ca}.pem")
    (tmp_path / "san.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    (tmp_path / "other.cnf").write_text("subjectAltName=IP:127.0.0.2,DNS:elsewhere\n")
    for name, ca, san in (("collector", "ca", "san"), ("agent", "ca", "san"),
                          ("rogue", "rogue-ca", "san"), ("rogue-collector", "rogue-ca", "san"),
                          ("misnamed-collector", "ca", "other")):
        run("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout",
            f"{name}.key", "-out", f"{name}.csr")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
            "-CAcreateserial", "-days", "2", "-extfile", f"{san}.cnf", "-out", f"{name}.pem")
    return tmp_path


@pytest.mark.parametrize("case", ["collector for another name", "collector of another CA",
                                  "agent without a certificate"])
def test_tls_refusals_are_counted_logged_and_send_nothing(node, pki, case):
    """The agent refuses a collector whose certificate names another address or comes
    from a CA it does not trust; a collector that requires a client certificate refuses
    an agent that has none. Either way nothing is decoded, the refusal is logged and
    counted, and both keep running."""
    a, b = node.pods
    cert = {"collector for another name": "misnamed-collector",
            "collector of another CA": "rogue-collector"}.get(case, "collector")
    out = pki / f"{cert}.jsonl"
    proc = subprocess.Popen(
        ["ip", "netns", "exec", node.netns, str(CNIFLOW), "collector", "--listen",
         "127.0.0.1:4740", "--transport", "tls", "--tls-cert", str(pki / f"{cert}.pem"),
         "--tls-key", str(pki / f"{cert}.key"), "--tls-ca", str(pki / "ca.pem"), "--output",
         str(out), "--metrics-address", "127.0.0.1:9478"], stderr=(pki / "log").open("w"))
    oracles._wait_port(node.netns, 4740, "t", 15)
    mine = () if case == "agent without a certificate" else (
        "--tls-cert", str(pki / "agent.pem"), "--tls-key", str(pki / "agent.key"))
    try:
        with agent(node, "--idle-timeout", "0.5", "--transport", "tls", "--tls-ca",
                   str(pki / "ca.pem"), *mine, collector="127.0.0.1:4740") as running:
            for _ in range(4):
                send_udp(node, 0, b.ipv4, 9870, count=3, size=50)
                time.sleep(1)
            assert wait_for(lambda: running.metrics()["cniflow_export_errors_total"] > 0, 10)
            log = running.log.read_text()
            assert running.proc.poll() is None and proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    assert not out.exists() or not out.read_text().strip()
    if case == "agent without a certificate":
        assert "tls handshake failed" in (pki / "log").read_text()
    else:
        assert "CERTIFICATE_VERIFY_FAILED" in log and (
            "IP address mismatch" in log if cert == "misnamed-collector"
            else "unable to get local issuer certificate" in log), log


def test_over_tls_with_certificates_both_ways(node, pki):
    a, b = node.pods
    collector_dir = pki
    out = collector_dir / "records.jsonl"
    proc = subprocess.Popen(
        ["ip", "netns", "exec", node.netns, str(CNIFLOW), "collector", "--listen",
         "127.0.0.1:4740", "--transport", "tls", "--tls-cert", str(pki / "collector.pem"),
         "--tls-key", str(pki / "collector.key"), "--tls-ca", str(pki / "ca.pem"), "--output",
         str(out), "--metrics-address", "127.0.0.1:9478"], stderr=(pki / "log").open("w"))
    oracles._wait_port(node.netns, 4740, "t", 15)
    tls = ("--transport", "tls", "--tls-ca", str(pki / "ca.pem"))
    rogue = subprocess.Popen(  # another CA's certificate: refused, and harmless
        ["ip", "netns", "exec", node.netns, str(CNIFLOW), "agent", "--interface", "lo",
         "--collector", "127.0.0.1:4740", *tls, "--tls-cert", str(pki / "rogue.pem"),
         "--tls-key", str(pki / "rogue.key"), "--metrics-address", "127.0.0.1:9479",
         "--poll-interval", "0.5"], stderr=subprocess.DEVNULL)
    try:
        with agent(node, "--idle-timeout", "1", *tls, "--tls-cert", str(pki / "agent.pem"),
                   "--tls-key", str(pki / "agent.key"), collector="127.0.0.1:4740"):
            send_udp(node, 0, b.ipv4, 9850, count=9, size=50)
            subprocess.run(node.in_pod(0, "ping -c 3 -i 0.2 -q 127.0.0.1").split(),
                           stdout=subprocess.DEVNULL)
            time.sleep(3)
            assert rogue.poll() is None
    finally:
        rogue.send_signal(signal.SIGTERM)
        assert rogue.wait(30) == 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    sent = [r for r in rows if r.get("destinationTransportPort") == 9850]
    assert sum(r["packetDeltaCount"] for r in sent) == 9  # once, at the sender's veth
    assert sum(r["octetDeltaCount"] for r in sent) == 9 * 78
    assert {r["interfaceName"] for r in sent} == {a.host_if}
    assert "tls handshake failed" in (pki / "log").read_text()
    assert not [r for r in rows if r.get("interfaceName") == "lo"]


def test_biflows_read_by_cniflow_collector_tshark_and_nfdump(node):
    a, b = node.pods
    collector = RunningCollector(node.netns, 4739)
    tshark = oracles.Tshark(node.netns, 4739)
    with agent(node, "--idle-timeout", "1", "--biflow"):
        subprocess.run(node.in_pod(0, f"ping -c 4 -i 0.1 -q {b.ipv4}").split(),
                       stdout=subprocess.DEVNULL)
        assert node.tcp_transfer(0, 1, 1 << 20) == 1 << 20
        time.sleep(3)
    pcap = tshark.stop()
    rows = collector.stop()
    assert tshark.expert() == []
    on_a = [r for r in rows if r.get("interfaceName") == a.host_if and "octetDeltaCount" in r]
    echo = [r for r in on_a if r["protocolIdentifier"] == 1]
    assert [(r["sourceIPv4Address"], r["icmpTypeCodeIPv4"], r["packetDeltaCount"],
             r["reversePacketDeltaCount"], r["octetDeltaCount"], r["reverseOctetDeltaCount"],
             r["biflowDirection"]) for r in echo] == [(a.ipv4, 0x0800, 4, 4, 336, 336, 1)]
    tcp = [r for r in on_a if r["protocolIdentifier"] == 6]
    assert tcp and all(r["sourceIPv4Address"] == a.ipv4 and r["destinationTransportPort"] == 5201
                       and r["biflowDirection"] == 1 and r["reversePacketDeltaCount"] > 0
                       for r in tcp)
    assert sum(r["octetDeltaCount"] for r in tcp) > 1 << 20
    # nfdump keeps RFC 5103 reverse counters as out_bytes / out_packets
    other = netlab.up(node.prefix + "x", 0)
    try:
        nfcapd = oracles.Nfcapd(other.netns, 4741)
        oracles.replay(pcap, other.netns, 4741, decode_port=4739)
        time.sleep(0.5)
        nf = nfcapd.stop()
    finally:
        netlab.down(node.prefix + "x")
    raw = subprocess.run(["nfdump", "-R", str(nfcapd.dir), "-o", "csv", "-q"],
                         capture_output=True, text=True, check=True).stdout
    assert nf and raw
    # csv: ts,te,td,sa,da,sp,dp,pr,flg,fwd,stos,ipkt,ibyt,opkt,obyt,in,...
    icmp_rows = [line.split(",") for line in raw.splitlines()
                 if line.split(",")[3] == a.ipv4 and line.split(",")[7].strip() == "ICMP"
                 and int(line.split(",")[15]) > 0]
    assert [(int(c[11]), int(c[12]), int(c[13]), int(c[14])) for c in icmp_rows] == [
        (4, 336, 4, 336)]


def test_data_before_its_template_is_held_then_released_or_dropped():
    from test_units import flows

    from agent.ipfix.flows import TEMPLATE_V4, columns
    from agent.ipfix.message import encode_records, message, set_bytes, template_sets

    now = [0.0]
    d = Decoder(hold_seconds=5, clock=lambda: now[0])
    groups = encode_records(TEMPLATE_V4, columns(flows(3), {0: "eth0"}), 3)
    data = message(b"".join(set_bytes(256, g.data.tobytes()) for g in groups), 0, 0, 5)
    tmpl = message(template_sets([TEMPLATE_V4]), 0, 3, 5)
    assert d.message(data, "e:1") == [] and d.stats["template_misses"] == 1
    out = d.message(tmpl, "e:1")  # the template arrives: the held records come out
    assert sum(len(rs) for rs in out) == 3
    d.message(data, "other:2")  # another exporter's data, never given a template
    now[0] = 6
    d.message(struct.pack("!HHIII", 10, 16, 0, 0, 5), "other:2")
    assert d.stats["dropped_sets"] == 1
    assert not d.sessions[("other:2", 5)].held


def test_datagrams_the_kernel_drops_are_counted(node):
    """The collector stopped (SIGSTOP) while 20,000 datagrams arrive: its socket
    overflows, and the drops show in cniflow_collector_socket_drops."""
    collector = RunningCollector(node.netns, 4739)
    collector.proc.send_signal(signal.SIGSTOP)
    code = ("import socket\ns=socket.socket(2,2)\n"
            "for _ in range(20000):\n"
            "    s.sendto(b'\\x00\\x0a' + b'\\x00' * 1398, ('127.0.0.1', 4739))\n")
    subprocess.run(["ip", "netns", "exec", node.netns, "/usr/bin/python3", "-c", code], check=True)
    collector.proc.send_signal(signal.SIGCONT)
    assert wait_for(lambda: collector.metrics().get("cniflow_collector_socket_drops", 0) > 0, 15)
    collector.stop()


@pytest.mark.root
def test_the_receive_buffer_passes_rmem_max_with_net_admin_and_says_so_without(tmp_path):
    """--receive-buffer four times net.core.rmem_max (212,992 octets on most nodes, where
    a poll's burst from the agent overflows the socket): with CAP_NET_ADMIN the socket
    gets all of it (SO_RCVBUFFORCE), as the kernel's own count of the socket (ss) says;
    without it (a bounding set without NET_ADMIN) the kernel caps it at rmem_max, and the
    collector says so in its log and its metric."""
    from broker import free_port

    rmem_max = int(Path("/proc/sys/net/core/rmem_max").read_text())
    want = 4 * rmem_max
    no_net_admin = ["setpriv", "--bounding-set=-net_admin", "--inh-caps=-net_admin"]
    for prefix, got in (([], want), (no_net_admin, rmem_max)):
        port, metrics_port = free_port(), free_port()
        log = tmp_path / f"log{len(prefix)}"
        proc = subprocess.Popen(
            [*prefix, str(CNIFLOW), "collector", "--listen", f"127.0.0.1:{port}", "--output",
             str(tmp_path / "out.jsonl"), "--metrics-address", f"127.0.0.1:{metrics_port}",
             "--receive-buffer", str(want)], stderr=log.open("w"))
        try:
            def metric(metrics_port: int = metrics_port) -> float | None:
                try:
                    text = urllib.request.urlopen(
                        f"http://127.0.0.1:{metrics_port}/metrics", timeout=1).read().decode()
                except OSError:
                    return None
                for line in text.splitlines():
                    if line.startswith("cniflow_collector_receive_buffer_bytes "):
                        return float(line.split()[1])
                return None

            assert wait_for(lambda log=log: "collector listening" in log.read_text(), 15), \
                log.read_text()  # ready: its socket made and the gauge set
            assert metric() == got
            ss = subprocess.run(["ss", "-lumnH", f"sport = :{port}"], capture_output=True,
                                text=True, check=True).stdout
            assert f",rb{2 * got}," in ss, ss  # the kernel's count: twice, for its overhead
            warned = "the UDP receive buffer is smaller than asked" in log.read_text()
            assert warned == (got < want), log.read_text()
        finally:
            proc.terminate()
            proc.wait(10)


# Every type and length format_lines() prints: unsigned of 1 to 8 octets (3, 5, 6 and
# 7 are reduced-size encodings), signed (RFC 5610 teaches them), NTP times, addresses,
# MAC, boolean, seconds and milliseconds, and a string.
_PRINTED = [("unsigned64", 8), ("unsigned64", 3), ("unsigned64", 7), ("unsigned8", 1),
            ("unsigned16", 2), ("unsigned32", 4), ("unsigned64", 5), ("unsigned64", 6),
            ("signed64", 8), ("signed32", 4), ("signed8", 1), ("signed64", 3),
            ("signed16", 2), ("dateTimeNanoseconds", 8), ("dateTimeMicroseconds", 8),
            ("ipv4Address", 4), ("ipv6Address", 16), ("macAddress", 6), ("boolean", 1),
            ("string", 9), ("string", 2), ("dateTimeMilliseconds", 8), ("dateTimeSeconds", 4),
            # hex: octet arrays (MPLS label stacks, route distinguishers, enterprise
            # elements), and lengths a type has no other form for
            ("octetArray", 3), ("octetArray", 0), ("octetArray", 16), ("ipv4Address", 3),
            ("float64", 2), ("dateTimeMicroseconds", 4)]


def _message(fields: list[tuple[int, int]], data: bytes) -> bytes:
    """A template 300 of these (element id, length) fields and one data set, domain 5."""
    import statefuzz

    template = struct.pack("!HH", 300, len(fields)) + b"".join(
        statefuzz.field(0, ie, n) for ie, n in fields)
    return statefuzz.message([statefuzz.set_(2, template), statefuzz.set_(300, data)], 0, 5)


def test_the_c_formatter_prints_every_ipv4_octet_and_every_width_of_digits():
    """Every octet value (one to three digits) in every place of a dotted quad, and
    unsigned values of every width from 1 to 20 digits, against Python's own: what a
    random draw reaches only by chance (the quad is printed from a table of 256)."""
    from agent import jsonlines
    from agent.ipfix.decoder import Field, RecordSet, Spec, _dtype

    fields = [Field(0, 8, 4, "sourceIPv4Address", "ipv4Address"),
              Field(0, 1000, 8, "n", "unsigned64")]
    spec = Spec(300, fields, 0, _dtype(fields), 12)
    arr = np.zeros(256, spec.dtype)
    octets = np.arange(256, dtype=np.uint8)
    arr["sourceIPv4Address"] = np.stack(  # each value in each place, beside others
        [octets, octets[::-1], (octets * 7).astype(np.uint8), octets], axis=1
    ).view(">u4").ravel()
    numbers = [0, *(10 ** k - 1 for k in range(1, 20)), *(10 ** k for k in range(1, 20)),
               2 ** 64 - 1]
    arr["n"][: len(numbers)] = numbers
    lines = [json.loads(x) for x in jsonlines.encode(
        [RecordSet("10.0.0.1:4739", 5, 1_795_000_000, spec, arr)]).split()]
    quads = [".".join(str(int(o)) for o in (i, 255 - i, i * 7 % 256, i)) for i in range(256)]
    assert [x["sourceIPv4Address"] for x in lines] == quads
    assert [x["n"] for x in lines[: len(numbers)]] == numbers


@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.data())
def test_the_c_formatter_writes_what_polars_writes_for_any_octets(data):
    """format_lines() against polars' NDJSON writer, octet for octet: random values of
    every field kind it prints (extremes, signs, NTP times before 1970, IPv4-mapped
    IPv6, booleans that are neither 1 nor 2), records of several exporters in one
    table; fixed-length strings padded with NULs (a VRF name), printed without them; a
    string needing escapes goes to polars instead, and reads back right."""
    from agent import jsonlines
    from agent.ipfix.decoder import Field, RecordSet, Spec, _dtype

    kinds = data.draw(st.lists(st.sampled_from(_PRINTED), min_size=1, max_size=12)
                      .filter(lambda ks: any(n for _, n in ks)))  # a record of 0 octets: none
    fields = [Field(0, 1000 + i, n, f"f{i}", t) for i, (t, n) in enumerate(kinds)]
    spec = Spec(300, fields, 0, _dtype(fields), sum(n for _, n in kinds))
    n = data.draw(st.integers(1, 40))
    strings = [f"f{i}" for i, (t, _) in enumerate(kinds) if t == "string"]
    plain = data.draw(st.booleans())
    pad = data.draw(st.integers(0, 3))  # NUL padding at the end, its length row by row
    sets = []
    for i in range(data.draw(st.integers(1, 3))):
        arr = np.frombuffer(bytearray(data.draw(st.binary(min_size=n * spec.dtype.itemsize,
                                                          max_size=n * spec.dtype.itemsize))),
                            spec.dtype)
        for name in strings if plain else ():  # as pod and interface names are
            text = arr[name].view(np.uint8) if arr[name].ndim == 2 else None
            if text is not None:
                text[(text < 0x20) | (text > 0x7E) | (text == 0x22) | (text == 0x5C)] = 0x61
                width = text.shape[1]
                for row in range(len(text)):
                    text[row, width - (row * pad) % (width + 1):] = 0
        sets.append(RecordSet(f"10.0.0.{i}:4739", 5 + i, 1_795_000_000 + i, spec, arr))
    group = jsonlines._groups(sets)[0]
    arr = jsonlines._joined(group)
    c, polars = jsonlines._Out(None, False), jsonlines._Parts()
    piece = jsonlines._PIECE
    jsonlines._PIECE = data.draw(st.sampled_from([1, 1000, piece]))  # a line a piece, a few
    try:
        printed = jsonlines._formatted(group, arr, c, None)
    finally:
        jsonlines._PIECE = piece
    jsonlines._table(group, arr).write_ndjson(polars)
    if printed:
        assert c.result().text == b"".join(polars.parts) and c.result().count == len(arr)
    else:  # a string with octets JSON escapes
        assert not all(jsonlines._plain(arr[name]) for name in strings)
    lines = [json.loads(x) for x in jsonlines.encode(sets).split()]
    assert [(x["@exporter"], x["@domain"]) for x in lines] == [
        (rs.exporter, rs.domain) for rs in sets for _ in range(n)]
    assert lines == [{"@exporter": rs.exporter, "@domain": rs.domain, "@template": 300,
                      "@exportTime": rs.export_time, **json.loads(json.dumps(r))}
                     for rs in sets for r in records(rs)]


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.tuples(st.one_of(st.integers(0, 2), st.integers(0, 300)), st.integers(0, 1),
                          st.integers(0, 2**32 - 1), st.integers(1, 12), st.booleans()),
                min_size=1, max_size=8),
       st.integers(0, 6), st.booleans())
def test_records_with_strings_decode_as_the_record_by_record_reading_does(streaks, pad, cut):
    """Runs of MIN_RUN or more records whose strings have the same lengths become
    arrays (layouts admitted at once here), shorter ones stay as they came; the records,
    in order, are exactly what reading them one by one gives: lengths of 255 and more
    (the three-octet form), short lengths in the three-octet form too (RFC 7011 allows
    it: never in a run, whose layout has one-octet lengths), empty strings, padding
    after the last record, a set cut inside a record (lost whole, as before)."""
    import itertools

    from agent.ipfix import decoder
    from agent.ipfix.decoder import MIN_RUN, read_record, reason
    from agent.ipfix.decoder import records as rows_of
    from agent.jsonlines import encode

    recs = [(length, other, long or length >= 255, (value + k) % 2**32)
            for length, other, value, repeat, long in streaks for k in range(repeat)]

    fields = [(10, 4), (82, 65535), (1, 8), (83, 65535)]
    # ingressInterface, interfaceName (variable length), octetDeltaCount, description
    data = b"".join(
        struct.pack("!I", value)
        + (b"\xff" + struct.pack("!H", length) if long else bytes([length]))
        + bytes(0x61 + (i + value) % 26 for i in range(length))
        + struct.pack("!Q", value * 7)
        + bytes([other]) + b"x" * other
        for length, other, long, value in recs) + b"\x00" * pad
    if cut:
        data = data[:-(pad + 2)]  # the last record loses its last octets
    d, admit = Decoder(), decoder.ADMIT
    decoder.ADMIT = 0
    try:
        got = d.message(_message(fields, data), "10.0.0.1:4739")
    finally:
        decoder.ADMIT = admit
    expected, off, body = [], 0, memoryview(data)
    spec = d.sessions[("10.0.0.1:4739", 5)].templates[300]
    try:
        while len(body) - off >= spec.min_length:
            row, off = read_record(spec, body, off)
            expected.append(row)
    except Exception as e:  # noqa: BLE001
        expected, why = None, reason(str(e))  # the set is malformed: lost whole, counted
    if expected is None:
        assert got == [] and d.errors == {why: 1}  # for the reason reading it gives
        return
    assert [r for rs in got for r in rows_of(rs)] == expected
    whole = recs[: len(expected)]  # a record cut short under the minimum is padding
    runs = [(long, len(list(g))) for (_, _, long), g in
            itertools.groupby(whole, key=lambda r: r[:3])]
    assert [len(rs.array) for rs in got if rs.array is not None] == [
        n for long, n in runs if n >= MIN_RUN and not long]
    lines = [json.loads(line) for line in encode(got).split()]  # a table a layout
    assert sorted(lines, key=json.dumps) == sorted(
        ({"@exporter": "10.0.0.1:4739", "@domain": 5, "@template": 300,
          "@exportTime": 1_700_000_000, **r} for r in expected), key=json.dumps)


def test_string_layouts_kept_are_bounded(monkeypatch):
    """Each combination of string lengths a run has is a layout the decoder keeps: at
    most MAX_LAYOUTS of them, the least recently used given up, records still exact.
    (Made at once here: ADMIT 0.)"""
    from agent.ipfix import decoder
    from agent.ipfix.decoder import MAX_LAYOUTS, MIN_RUN

    monkeypatch.setattr(decoder, "ADMIT", 0)

    d = Decoder()
    for n in range(MAX_LAYOUTS + 100):
        name = b"n" * (n % 250)
        data = struct.pack("!I", n) + bytes([len(name)]) + name + bytes([n % 7]) + b"y" * (n % 7)
        (rs,) = d.message(_message([(10, 4), (82, 65535), (83, 65535)], data * MIN_RUN),
                          "10.0.0.1:1")
        assert rs.array is not None and records(rs) == [
            {"ingressInterface": n, "interfaceName": name.decode(),
             "interfaceDescription": "y" * (n % 7)}] * MIN_RUN
    assert len(d.layouts) == MAX_LAYOUTS


# (type, length) of fields for records in no run: every class format_records() tells
# apart, fixed and variable-length, and what it leaves to Python (floats, integers
# over 8 octets, text beyond ASCII)
_VARYING = [("unsigned32", 4), ("unsigned64", VARLEN), ("signed16", 2), ("signed32", VARLEN),
            ("string", VARLEN), ("string", 6), ("octetArray", VARLEN), ("octetArray", 3),
            ("ipv4Address", VARLEN), ("ipv6Address", 16), ("ipv6Address", VARLEN),
            ("float64", VARLEN), ("float32", 4), ("boolean", VARLEN), ("macAddress", VARLEN),
            ("dateTimeMicroseconds", VARLEN), ("dateTimeMilliseconds", 8),
            ("basicList", VARLEN)]
_KEYED = [("sourceIPv4Address", "ipv4Address", 4), ("destinationIPv4Address", "ipv4Address", 4),
          ("sourceTransportPort", "unsigned16", 2), ("destinationTransportPort", "unsigned16", 2),
          ("protocolIdentifier", "unsigned8", 1)]
_TEXT = st.one_of(st.sampled_from(b"ab~ \"\\\x00\x01\n\t\x1f\x7f"), st.integers(0, 255))


@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.data())
def test_records_in_no_run_are_written_by_c_as_python_writes_them(data):
    """format_records() against reading each record into a dict and json.dumps() it,
    octet for octet, flow keys too: every class of value at lengths value() reads one
    way and others (0 octets, odd lengths, the three-octet length form), text with
    quotes, controls and trailing NULs, values it leaves to Python between its own,
    an element named like the line's own keys, the 5-tuple's fields (or one of them
    variable-length, or an address 3 octets long), an output buffer of one octet and
    calls of a record or two."""
    from agent import jsonlines
    from agent.ipfix.decoder import Field, RecordSet, Spec, _names

    kinds = data.draw(st.lists(st.sampled_from(_VARYING), min_size=1, max_size=8))
    fields = [Field(0, 1000 + i, n, data.draw(st.sampled_from([f"f{i}", "f0", "@domain"])), t)
              for i, (t, n) in enumerate(kinds)]
    if data.draw(st.booleans()):  # the 5-tuple, somewhere among them
        at = data.draw(st.integers(0, len(fields)))
        fields[at:at] = [Field(0, 8 + i, data.draw(st.sampled_from([n, n, VARLEN])), name, t)
                         for i, (name, t, n) in enumerate(_KEYED)]
    spec = Spec(300, fields, 0, None, sum(1 if f.length == VARLEN else f.length
                                          for f in fields))
    raw = b""
    n = data.draw(st.integers(1, 12))
    for _ in range(n):
        for f in fields:
            length = f.length if f.length != VARLEN else data.draw(
                st.sampled_from([0, 1, 2, 3, 4, 6, 8, 9, 16, 300]))
            if f.type == "string":
                value = bytes(data.draw(st.lists(_TEXT, min_size=length, max_size=length)))
            else:
                value = data.draw(st.binary(min_size=length, max_size=length))
            if f.length == VARLEN:
                value = (bytes([length]) if length < 255 else b"\xff" + struct.pack("!H", length)
                         ) + value
            raw += value
    rs = RecordSet("10.0.0.9:4739", 7, 1_795_000_123, spec, raw=raw, count=n)
    keys = data.draw(st.booleans())
    held, piece, most = jsonlines._held[0], jsonlines._PIECE, jsonlines._MAX_RECORDS
    if data.draw(st.booleans()):  # a buffer too small for any record, grown as needed
        jsonlines._held[0], jsonlines._PIECE = np.empty(1, np.uint8), 1
    jsonlines._MAX_RECORDS = data.draw(st.sampled_from([1, 2, most]))
    try:
        c = jsonlines._Out(None, keys)
        jsonlines._records(rs, c)
    finally:
        jsonlines._held[0], jsonlines._PIECE, jsonlines._MAX_RECORDS = held, piece, most
    python = jsonlines._Out(None, keys)
    meta = json.dumps(jsonlines._meta(rs), separators=(",", ":"))[:-1]
    jsonlines._python(rs, 0, n, meta, python)
    got, expected = c.result(), python.result()
    assert got.count == expected.count == n
    assert got.text == expected.text
    assert got.keys == expected.keys
    rows = records(rs)  # and what the lines say is what the decoder says
    names = [f"{k}#2" if k in jsonlines.META else k for k in _names(fields)]
    if len(set(names)) == len(names):
        assert [json.loads(line) for line in got.split()] == [
            {**json.loads(meta + "}"), **json.loads(json.dumps(jsonlines._unclash(r)))}
            for r in rows]


def test_a_layout_is_made_for_string_lengths_only_once_they_recur(monkeypatch):
    """A combination of string lengths becomes a layout (an array, a table) once runs
    of it have held ADMIT records within WINDOW records with strings; before, its
    records stay as they came, read the same. A window that ends starts the counts
    anew, and batches decide as message by message does."""
    import statefuzz

    from agent.ipfix import decoder
    from agent.ipfix.decoder import ADMIT, MIN_RUN

    fields = [(10, 4), (82, 65535)]

    def run(n: int, length: int, d=None) -> list:
        """A message of n records of one name length, the template first; d: a message
        of the data set alone (what the batch path gathers), decoded as a batch."""
        name = b"n" * length
        data = b"".join(struct.pack("!I", k) + bytes([length]) + name for k in range(n))
        if d is None:
            return one.message(_message(fields, data), "10.0.0.1:1")
        alone = statefuzz.message([statefuzz.set_(300, data)], 0, 5)
        return d.messages([(alone, "10.0.0.1:1")])[0]

    one = Decoder()
    for sent in range(0, ADMIT, MIN_RUN):  # runs of MIN_RUN: a layout at the ADMIT-th
        (rs,) = run(MIN_RUN, 5)
        assert (rs.array is not None) == (sent + MIN_RUN >= ADMIT)
        assert records(rs) == [{"ingressInterface": k, "interfaceName": "nnnnn"}
                               for k in range(MIN_RUN)]
    (rs,) = run(MIN_RUN - 1, 5)  # admitted, but fewer than MIN_RUN are no run
    assert rs.array is None and len(rs) == MIN_RUN - 1

    monkeypatch.setattr(decoder, "WINDOW", ADMIT + 100)
    one = Decoder()
    (rs,) = run(ADMIT - 1, 4)  # one record short of ADMIT
    assert rs.array is None
    (rs,) = run(100, 6)  # the window ends: counts start anew
    assert rs.array is None
    (rs,) = run(MIN_RUN, 4)
    assert rs.array is None  # MIN_RUN records counted, not ADMIT - 1 + MIN_RUN
    (rs,) = run(ADMIT - MIN_RUN, 4)
    assert rs.array is not None

    # a batch of such messages (the batch path gathers a run that is a whole message)
    # makes the same choices as each message alone, and counts alike, where a window
    # ends too (on a run that had all but reached ADMIT: 7 below)
    for window in (ADMIT + 100, 3 * ADMIT, 400):
        monkeypatch.setattr(decoder, "WINDOW", window)
        one, batched = Decoder(), Decoder()
        batched.message(_message(fields, b""), "10.0.0.1:1")  # the template
        shape = [(200, 7), (150, 8), (100, 7), (ADMIT - 1, 4), (MIN_RUN, 4), (100, 6),
                 (MIN_RUN, 4), (ADMIT, 4), (ADMIT, 6)] * 3
        alone, together = [], []
        for n, length in shape:
            alone += [(rs.array is not None, len(rs)) for rs in run(n, length)]
            together += [(rs.array is not None, len(rs)) for rs in run(n, length, batched)]
            assert (batched.window, sorted(batched.seen.values())) == (
                one.window, sorted(one.seen.values()))
        assert together == alone and any(a for a, _ in alone) and not all(a for a, _ in alone)
