"""Information elements, read from elements.csv (the registry is data, not code).

elements.csv holds the IANA registry as Debian's python3-ipfix ships it
(iana.iespec), with tcpControlBits at 16 bits (RFC 7125), and Antrea's
enterprise elements (PEN 56506). RFC 5103 reverse elements are derived. The
workload elements have no number of their own (Antrea defines none, cniflow has
no registered PEN): they live under the enterprise number the user gives.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np

VARLEN = 0xFFFF
REVERSE_PEN = 29305  # RFC 5103
ANTREA_PEN = 56506

# abstract type -> (numpy dtype of the natural encoding, RFC 5610 type code); None: variable
TYPES: dict[str, tuple[np.dtype | None, int]] = {
    "octetArray": (None, 0),
    "unsigned8": (np.dtype("u1"), 1),
    "unsigned16": (np.dtype(">u2"), 2),
    "unsigned32": (np.dtype(">u4"), 3),
    "unsigned64": (np.dtype(">u8"), 4),
    "signed8": (np.dtype("i1"), 5),
    "signed16": (np.dtype(">i2"), 6),
    "signed32": (np.dtype(">i4"), 7),
    "signed64": (np.dtype(">i8"), 8),
    "float32": (np.dtype(">f4"), 9),
    "float64": (np.dtype(">f8"), 10),
    "boolean": (np.dtype("u1"), 11),
    "macAddress": (np.dtype(("u1", (6,))), 12),
    "string": (None, 13),
    "dateTimeSeconds": (np.dtype(">u4"), 14),
    "dateTimeMilliseconds": (np.dtype(">u8"), 15),
    "dateTimeMicroseconds": (np.dtype(">u8"), 16),
    "dateTimeNanoseconds": (np.dtype(">u8"), 17),
    "ipv4Address": (np.dtype(("u1", (4,))), 18),
    "ipv6Address": (np.dtype(("u1", (16,))), 19),
}


@dataclass(frozen=True)
class Element:
    pen: int
    id: int
    name: str
    type: str
    description: str = ""

    @property
    def dtype(self) -> np.dtype | None:
        return TYPES[self.type][0]

    @property
    def length(self) -> int:
        """Natural encoded length, VARLEN for strings and octet arrays."""
        dt = self.dtype
        return VARLEN if dt is None else dt.itemsize

    @property
    def type_code(self) -> int:
        return TYPES[self.type][1]


@cache
def elements() -> dict[str, Element]:
    path = Path(__file__).with_name("elements.csv")
    with path.open() as f:
        out = {
            r["name"]: Element(int(r["pen"]), int(r["id"]), r["name"], r["type"],
                               r.get("description") or "")
            for r in csv.DictReader(f)
        }
    return out


@cache
def by_id() -> dict[tuple[int, int], Element]:
    return {(e.pen, e.id): e for e in elements().values()}


def lookup(pen: int, ie: int) -> Element | None:
    """The element (pen, id): IANA, Antrea, or an RFC 5103 reverse of an IANA one."""
    e = by_id().get((pen, ie))
    if e is None and pen == REVERSE_PEN:
        fwd = by_id().get((0, ie))
        if fwd is not None:
            e = Element(pen, ie, "reverse" + fwd.name[0].upper() + fwd.name[1:], fwd.type)
    return e


# cniflow's workload elements: (id, name, description), under the user's enterprise number
WORKLOAD_ELEMENTS = (
    (1, "sourceWorkloadKind", "Kind of the source pod's workload: Deployment, StatefulSet, "
     "DaemonSet, Job, CronJob, another controller's kind, or Pod"),
    (2, "sourceWorkloadName", "Name of the source pod's workload"),
    (3, "destinationWorkloadKind", "Kind of the destination pod's workload"),
    (4, "destinationWorkloadName", "Name of the destination pod's workload"),
)


def workload_elements(pen: int) -> list[Element]:
    """The four workload elements (strings) under enterprise number pen."""
    return [Element(pen, i, name, "string", text) for i, name, text in WORKLOAD_ELEMENTS]


def element(name: str) -> Element:
    """By name; "reverseX" is RFC 5103's reverse of the IANA element x (PEN 29305)."""
    e = elements().get(name)
    if e is None and name.startswith("reverse") and len(name) > 7:
        fwd = elements().get(name[7].lower() + name[8:])
        if fwd is not None and fwd.pen == 0:
            e = Element(REVERSE_PEN, fwd.id, name, fwd.type)
    if e is None:
        raise KeyError(f"unknown information element {name!r}")
    return e
