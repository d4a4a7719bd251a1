"""Resolve interface names and globs to ifindexes, as interfaces come and go."""

from __future__ import annotations

import fnmatch

from pyroute2 import IPRoute


class InterfaceError(ValueError):
    """A named (non-glob) interface does not exist."""


def is_glob(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


class InterfaceSet:
    def __init__(self, patterns: list[str], ipr: IPRoute) -> None:
        self.patterns = patterns
        self.ipr = ipr

    def scan(self) -> dict[int, str]:
        """ifindex -> name of every present interface the patterns match (one netlink dump)."""
        out = {}
        for link in self.ipr.get_links():
            name = link.get_attr("IFLA_IFNAME")
            if any(fnmatch.fnmatchcase(name, p) for p in self.patterns):
                out[link["index"]] = name
        return out

    def check_named(self) -> None:
        """Exact names must exist when the agent starts: a typo is an error, not a wait."""
        present = set(self.scan().values())
        missing = [p for p in self.patterns if not is_glob(p) and p not in present]
        if missing:
            raise InterfaceError(f"no such interface: {', '.join(missing)}")
