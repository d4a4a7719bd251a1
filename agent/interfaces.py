"""Resolve interface names and globs to ifindexes, as interfaces come and go."""

from __future__ import annotations

import fnmatch

from pyroute2 import IPRoute


class InterfaceError(ValueError):
    """A named (non-glob) interface does not exist."""


def is_glob(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


def links(ipr: IPRoute) -> dict[int, str]:
    """ifindex -> name of every interface here (one netlink dump)."""
    return {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}


class InterfaceSet:
    """The --interface names and globs."""

    def __init__(self, patterns: list[str]) -> None:
        self.patterns = patterns

    def desired(self, present: dict[int, str]) -> dict[int, str]:
        return {i: n for i, n in present.items()
                if any(fnmatch.fnmatchcase(n, p) for p in self.patterns)}

    def check_named(self, present: dict[int, str]) -> None:
        """Exact names must exist when the agent starts: a typo is an error, not a wait."""
        names = set(present.values())
        missing = [p for p in self.patterns if not is_glob(p) and p not in names]
        if missing:
            raise InterfaceError(f"no such interface: {', '.join(missing)}")
