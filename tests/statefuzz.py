"""Stateful IPFIX fuzzing: sequences of messages that build, rename, collide, withdraw and
reuse state across messages of one exporter, interleaved with a well-behaved exporter.
Used by tests/test_collector.py (bounded) and bench/fuzz.py (millions of messages).

The hostile exporter's moves: templates and options templates over known, enterprise
and unknown elements (fixed and variable length, repeated), RFC 5610 type records that
teach names colliding with registry names, with each other or with the numbered names
of repeated elements ("x#2"), or names that are empty, long or unprintable, with any
type code; data sets for any template id, of any length; withdrawals of one, all, or
unknown templates; the same template id redefined; lengths that lie.
"""

from __future__ import annotations

import random
import struct

HEADER = struct.Struct("!HHIII")
NAMES = ["octetDeltaCount", "sourceIPv4Address", "informationElementName", "x", "x#2",
         "x#3", "", "a" * 300, "\x00\x01", "flowType", "sourcePodName", "é"]
ELEMENTS = [(0, 1, 8), (0, 2, 8), (0, 8, 4), (0, 12, 4), (0, 4, 1), (0, 7, 2), (0, 82, 65535),
            (0, 152, 8), (56506, 101, 65535), (56506, 137, 1), (56506, 9999, 4),
            (29305, 1, 8), (12345, 7, 3), (0, 303, 2), (0, 341, 65535), (0, 339, 1)]


def message(sets: list[bytes], seq: int, domain: int = 1, lie: int = 0) -> bytes:
    body = b"".join(sets)
    return HEADER.pack(10, min(0xFFFF, max(0, 16 + len(body) + lie)), 1_700_000_000, seq,
                       domain) + body


def set_(set_id: int, body: bytes) -> bytes:
    return struct.pack("!HH", set_id, 4 + len(body)) + body


def field(pen: int, ie: int, length: int) -> bytes:
    if pen:
        return struct.pack("!HHI", 0x8000 | ie, length, pen)
    return struct.pack("!HH", ie, length)


def varlen(data: bytes) -> bytes:
    return bytes([len(data)]) + data if len(data) < 255 else b"\xff" + struct.pack(
        "!H", len(data)) + data


# RFC 5610 type records: options template with informationElementId (303), PEN (346),
# data type (339), name (341), scope 2
RFC5610_TEMPLATE = (struct.pack("!HHH", 300, 4, 2) + field(0, 303, 2) + field(0, 346, 4)
                    + field(0, 339, 1) + field(0, 341, 65535))


def rfc5610_record(ie: int, pen: int, code: int, name: str) -> bytes:
    return struct.pack("!HIB", ie, pen, code) + varlen(name.encode("utf-8", "replace"))


class Hostile:
    """One hostile exporter's next message, from a seeded generator."""

    def __init__(self, rng: random.Random) -> None:
        self.rng, self.seq = rng, 0
        self.tids: list[int] = [256]

    def next(self) -> bytes:
        r = self.rng
        sets = [self._one() for _ in range(r.randint(1, 4))]
        self.seq = (self.seq + r.randint(0, 50)) & 0xFFFFFFFF
        lie = r.choice([0] * 12 + [-3, 5, 1000, -20])
        return message(sets, self.seq, r.choice([1, 1, 1, 2, 0xFFFFFFFF]), lie)

    def _one(self) -> bytes:
        r = self.rng
        kind = r.choice(["template", "template", "options", "names", "names", "data", "data",
                         "data", "withdraw", "raw"])
        tid = r.choice(self.tids + [r.randint(256, 300), r.randint(0, 65535)])
        if kind == "template":
            n = r.randint(1, 8)
            fields = [r.choice(ELEMENTS) for _ in range(n)]
            self.tids = (self.tids + [tid])[-32:]  # ids it defined lately
            return set_(2, struct.pack("!HH", tid, n) + b"".join(field(*f) for f in fields))
        if kind == "options":
            return set_(3, RFC5610_TEMPLATE if r.random() < 0.7 else struct.pack(
                "!HHH", tid, 2, r.choice([0, 1, 2, 3])) + field(0, 1, 8) + field(0, 303, 2))
        if kind == "names":
            pen, ie, _ = r.choice(ELEMENTS)
            recs = b"".join(rfc5610_record(ie if r.random() < 0.8 else r.randint(0, 40000),
                                           pen, r.randint(0, 30), r.choice(NAMES))
                            for _ in range(r.randint(1, 5)))
            return set_(300, recs)
        if kind == "data":
            return set_(tid, r.randbytes(r.randint(0, 120)))
        if kind == "withdraw":
            return set_(r.choice([2, 3]), struct.pack("!HH", r.choice([tid, 2, 3, 65535]), 0))
        return r.randbytes(r.randint(0, 40))  # not even a set


# The well-behaved exporter: one template, one record of known values per message.
GOOD_TEMPLATE = set_(2, struct.pack("!HH", 400, 3) + field(0, 8, 4) + field(0, 2, 8)
                     + field(0, 1, 8))


def good(seq: int, packets: int) -> bytes:
    data = set_(400, bytes([10, 0, 0, 1]) + struct.pack("!QQ", packets, packets * 100))
    return message([GOOD_TEMPLATE, data] if seq % 5 == 0 else [data], seq)
