"""Attach the classifier to interfaces with pyroute2 (clsact + cls_bpf direct-action).

cniflow's filters carry a handle and priority of their own and return
TC_ACT_UNSPEC, so a CNI's filters on the same hook still run. It removes only
what it added: its filters always, the clsact qdisc only if it created it and
nothing else hangs on it any more.
"""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

log = logging.getLogger(__name__)

HANDLE = 0xCF10
PARENT_INGRESS = 0xFFFFFFF2  # clsact ffff:fff2
PARENT_EGRESS = 0xFFFFFFF3  # clsact ffff:fff3
GONE = (errno.ENODEV, errno.ENOENT, errno.EINVAL)


class AttachError(RuntimeError):
    """The kernel refused a qdisc or filter on an interface that exists."""


@dataclass
class Attachment:
    ifindex: int
    name: str
    created_clsact: bool


class Attacher:
    def __init__(self, program, priority: int = 1, ipr: IPRoute | None = None) -> None:
        self.program = program
        self.priority = priority
        self.ipr = ipr or IPRoute()
        self.attached: dict[int, Attachment] = {}

    def attach(self, ifindex: int, name: str) -> Attachment:
        """Idempotent: a filter of ours left by a crashed run is replaced, not doubled."""
        if ifindex in self.attached:
            return self.attached[ifindex]
        created = False
        try:
            self.ipr.tc("add", "clsact", ifindex)
            created = True
        except NetlinkError as e:
            if e.code != errno.EEXIST:
                raise AttachError(f"{name}: adding clsact failed: {e}") from e
        try:
            for parent, fn in (
                (PARENT_INGRESS, self.program.ingress),
                (PARENT_EGRESS, self.program.egress),
            ):
                self.ipr.tc(
                    "replace-filter",
                    "bpf",
                    ifindex,
                    HANDLE,
                    fd=fn.fd,
                    name=fn.name.decode() if isinstance(fn.name, bytes) else fn.name,
                    parent=parent,
                    prio=self.priority,
                    classid=1,
                    direct_action=True,
                )
        except NetlinkError as e:
            att = Attachment(ifindex, name, created)
            self._remove(att)
            raise AttachError(f"{name}: adding the bpf filter failed: {e}") from e
        att = Attachment(ifindex, name, created)
        self.attached[ifindex] = att
        log.info("attached", extra={"interface": name, "ifindex": ifindex})
        return att

    def detach(self, ifindex: int) -> None:
        att = self.attached.pop(ifindex, None)
        if att is not None:
            self._remove(att)
            log.info("detached", extra={"interface": att.name, "ifindex": ifindex})

    def forget(self, ifindex: int) -> None:
        """The interface vanished: the kernel took our filters with it."""
        self.attached.pop(ifindex, None)

    def detach_all(self) -> None:
        for ifindex in list(self.attached):
            self.detach(ifindex)

    def _remove(self, att: Attachment) -> None:
        for parent in (PARENT_INGRESS, PARENT_EGRESS):
            try:
                self.ipr.tc(
                    "del-filter", "bpf", att.ifindex, HANDLE, parent=parent, prio=self.priority
                )
            except NetlinkError as e:
                if e.code not in GONE:
                    log.warning(
                        "removing filter failed", extra={"interface": att.name, "err": str(e)}
                    )
        if att.created_clsact and not self._other_filters(att.ifindex):
            try:
                self.ipr.tc("del", "clsact", att.ifindex)
            except NetlinkError as e:
                if e.code not in GONE:
                    log.warning(
                        "removing clsact failed", extra={"interface": att.name, "err": str(e)}
                    )

    def _other_filters(self, ifindex: int) -> bool:
        try:
            for parent in (PARENT_INGRESS, PARENT_EGRESS):
                if list(self.ipr.get_filters(ifindex, parent=parent)):
                    return True
        except NetlinkError:
            return False
        return False

    def close(self) -> None:
        self.ipr.close()
