"""The decoder and the `cniflow collector`, against real captures and real exporters."""

from __future__ import annotations

import subprocess
from collections import Counter
from pathlib import Path

import pytest

from agent.ipfix.decoder import Decoder, records, split_stream

CAPTURES = Path(__file__).resolve().parents[2] / "shared" / "captures"
PCAPS = sorted(CAPTURES.glob("*.pcap"))

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
