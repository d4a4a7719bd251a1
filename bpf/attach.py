"""Attach the classifier to interfaces: TCX links at the head of the chain where the
kernel has TCX (6.6+), clsact + cls_bpf direct-action elsewhere.

On TCX a program's verdict other than "next" ends the hook: a CNI that attaches with
TCX (Cilium does on current kernels) and passes or redirects would hide every packet
from a cls_bpf filter, which runs after all TCX programs. cniflow's links go to the
head of the chain and return "next" (TC_ACT_UNSPEC), so the CNI's programs still run,
after it, on every packet. On cls_bpf (no TCX) the same holds for a CNI's filters at
cniflow's priority (1, the first there is): the kernel puts a filter added to a
priority at the head of its list, and cniflow's is added after the CNI's.

An entry point (bpf/entry.py) gets one hook, its ingress, with cniflow_entry.

cniflow removes only what it added: its links, its filters, the clsact qdisc only if it
created it and nothing else hangs on it. What an earlier cniflow left (a filter under
cniflow's handle, a link to a program named cniflow_*) is replaced, never doubled.

With a pin directory every TCX link is pinned, and an agent that finds pinned links
adopts them: BPF_LINK_UPDATE swaps its program into each at once (the old program
counts into the same maps until that instant), so a restart leaves no gap. cls_bpf
filters outlive the agent anyway, and `replace` on the same handle swaps them too (a
filter left under the other handle by a move goes after the new one is in).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import NamedTuple

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from agent import netlink
from bpf import syscall
from bpf.pins import HOOKS as HOOK_NAMES
from bpf.pins import PinDir

log = logging.getLogger(__name__)

HANDLE = 0xCF10
SPARE_HANDLE = 0xCF11  # cniflow's filter after a move to the head (they take turns)
PARENT_INGRESS = 0xFFFFFFF2  # clsact ffff:fff2
PARENT_EGRESS = 0xFFFFFFF3  # clsact ffff:fff3
PARENTS = (PARENT_INGRESS, PARENT_EGRESS)


class Hook(NamedTuple):
    name: str  # the program's role, and its link pin's name (bpf/pins.py)
    tcx: int  # TCX attach type
    parent: int  # clsact parent


POD_HOOKS = (Hook("ingress", syscall.TCX_INGRESS, PARENT_INGRESS),
             Hook("egress", syscall.TCX_EGRESS, PARENT_EGRESS))
ENTRY_HOOKS = (Hook("entry", syscall.TCX_INGRESS, PARENT_INGRESS),)
GONE = (errno.ENODEV, errno.ENOENT, errno.EINVAL)
RTM_GETTFILTER = 46
TCMSG = struct.Struct("=BxxxiIII")  # struct tcmsg: family, ifindex, handle, parent, info
TCA_KIND, TCA_OPTIONS, TCA_BPF_NAME = 1, 2, 7
PREFIX = "cniflow_"  # the names cniflow's programs are loaded with
MODES = ("auto", "tcx", "tc")
# A program that takes the head of a hook's chain again and again is left there after
# this many moves of cniflow's link back in front within the window (said once).
HEAD_MOVES, HEAD_WINDOW_S = 3, 600.0


def _text(buf: bytes, span: tuple[int, int] | None) -> str:
    return bytes(buf[slice(*span)]).rstrip(b"\0").decode(errors="replace") if span else ""


def _describe(f: tuple[int, int, str, str]) -> str:
    handle, prio, kind, name = f
    return f"{kind} {name} handle {handle:#x} pref {prio}"


class AttachError(RuntimeError):
    """The kernel refused a qdisc, filter or link on an interface that exists."""


@dataclass
class Attachment:
    ifindex: int
    name: str
    created_clsact: bool = False
    links: list[int] = field(default_factory=list)  # TCX link fds, one a hook, in order
    # which copy of the program runs (TCX) or which handle the filter has (cls_bpf)
    spare: list[bool] = field(default_factory=lambda: [False, False])
    entry: bool = False  # an entry point: its ingress only, with cniflow_entry

    @property
    def hooks(self) -> tuple[Hook, ...]:
        return ENTRY_HOOKS if self.entry else POD_HOOKS

    def handle(self, i: int) -> int:
        return SPARE_HANDLE if self.spare[i] else HANDLE


def choose_mode(mode: str) -> str:
    """"tcx" or "tc" for --attach auto|tcx|tc; tcx asked of a kernel without it fails."""
    tcx = syscall.supports(syscall.TCX_INGRESS)
    if mode == "tcx" and not tcx:
        raise AttachError("--attach tcx: this kernel has no TCX (Linux 6.6 or later)")
    return "tcx" if mode == "tcx" or (mode == "auto" and tcx) else "tc"


class Attacher:
    def __init__(self, program, mode: str = "auto", priority: int = 1,
                 ipr: IPRoute | None = None, dedup: bool = True,
                 pins: PinDir | None = None) -> None:
        self.program = program
        self.mode = choose_mode(mode)
        self.tcx = syscall.supports(syscall.TCX_INGRESS)  # leftovers to sweep either way
        self.priority = priority
        self.ipr = ipr or IPRoute()
        self.dedup = dedup
        self.attached: dict[int, Attachment] = {}
        # each hook's program: the first copy, and the second (moves to the head)
        self.progs = {hook: (prog, spare) for hook, prog, spare in zip(
            HOOK_NAMES, (program.ingress, program.egress, program.entry), program.spares,
            strict=True)}
        self.ours = {syscall.prog_id(p.fd) for pair in self.progs.values() for p in pair}
        self.pins = pins
        self.adopted: dict[tuple[int, str], int] = {}  # (ifindex, hook name) -> link fd
        self.moves: dict[tuple[int, str], list[float]] = {}  # (ifindex, hook name) -> when
        self.yielded: set[tuple[int, str]] = set()
        self.sock: socket.socket | None = None  # raw netlink, for the filter dumps (tc)
        self.lower: set[tuple[int, str]] = set()  # hooks a lower-priority filter was said of
        log.info("attach mode", extra={"mode": self.mode, "tcx": self.tcx})
        if pins is not None:
            if not dedup and program.adopted and program.unmeter_pods():
                log.info("an earlier agent's deduplication is off: --dedup false")
            self._adopt()

    def _adopt(self) -> None:
        """Take over the links an earlier agent pinned: those still on an interface run
        this agent's program from now on (atomically); defunct ones are unpinned. With
        --attach tc they are left for the sweep, which removes them at attach."""
        if self.pins.drop_unfinished():
            log.warning("a link an earlier agent was moving to the head is removed")
        for ifindex, hook, path in self.pins.link_pins():
            fd = syscall.obj_get(path)
            _, dev, _ = syscall.link_info(fd)
            if dev != ifindex:  # the interface is gone (0), or the pin is not what it says
                os.close(fd)
                os.unlink(path)
                continue
            if self.mode == "tcx":
                syscall.link_update(fd, self.progs[hook][0].fd)
            self.adopted[(ifindex, hook)] = fd
        if self.adopted:
            log.info("adopted pinned links", extra={"links": len(self.adopted),
                                                    "path": self.pins.links})

    def prune(self) -> None:
        """Adopted links no interface claimed (opted out, or gone, while no agent ran):
        detached and unpinned."""
        for ifindex, hook in list(self.adopted):
            self._drop_adopted(ifindex, hook)
            if ifindex not in self.attached:
                self._unmeter(ifindex)

    def _drop_adopted(self, ifindex: int, hook: str) -> None:
        """An adopted link detached and unpinned."""
        fd = self.adopted.pop((ifindex, hook))
        self._unpin(ifindex, hook)
        try:
            syscall.link_detach(fd)
        except OSError:
            pass
        finally:
            os.close(fd)

    def _unpin(self, ifindex: int, hook: str) -> None:
        if self.pins is not None:
            try:
                os.unlink(self.pins.link_path(ifindex, hook))
            except FileNotFoundError:
                pass

    def attach(self, ifindex: int, name: str, entry: bool = False) -> Attachment:
        """Idempotent: what an earlier cniflow left is replaced, not doubled. entry: as an
        entry point (an interface that was a pod's, or the reverse, is attached anew)."""
        if ifindex in self.attached:
            if self.attached[ifindex].entry == entry:
                return self.attached[ifindex]
            self.detach(ifindex)
        self._sweep(ifindex, name)
        att = Attachment(ifindex, name, entry=entry)
        roles = {hook.name for hook in att.hooks}
        for role in [r for (i, r) in self.adopted if i == ifindex and r not in roles]:
            self._drop_adopted(ifindex, role)  # an earlier agent's, as a pod or entry point
        if self.mode == "tcx":
            self._attach_tcx(att)
        else:
            self._attach_tc(att)
        # only once it counts: no packet skipped and not counted
        if entry or self.dedup:
            self.program.meter(ifindex, True, entry)
        self.attached[ifindex] = att
        log.info("attached", extra={"interface": name, "ifindex": ifindex, "mode": self.mode,
                                    "as": "entry point" if entry else "pod"})
        return att

    def _attach_tcx(self, att: Attachment) -> None:
        ifindex = att.ifindex
        try:
            for hook in att.hooks:
                fd = self.adopted.pop((ifindex, hook.name), None)  # runs our program already
                if fd is None:
                    fd = syscall.link_create(self.progs[hook.name][0].fd, ifindex, hook.tcx,
                                             syscall.F_BEFORE)
                    if self.pins is not None:
                        self._unpin(ifindex, hook.name)
                        syscall.obj_pin(fd, self.pins.link_path(ifindex, hook.name))
                att.links.append(fd)
        except OSError as e:
            self._remove(att)
            raise AttachError(f"{att.name}: attaching with TCX failed: {e.strerror}") from e

    def keep_first(self) -> int:
        """A program put in front of cniflow's after it was attached runs first, and a
        verdict of its that ends the hook hides the packet from cniflow: on TCX a link
        attached with BPF_F_BEFORE, on cls_bpf a filter added later at cniflow's
        priority (the kernel puts it at the head of that priority's list). cniflow's
        is moved back to the head: TCX, a new link in front (the other copy of the
        program: a chain holds a program once), pinned in place of the old one, then the
        old one detached; cls_bpf, a filter under the other handle, then the old one
        deleted. In the microseconds between, a packet the other program ends is counted
        once; one it passes on to the next, twice. Another program that keeps taking the
        head is left there after HEAD_MOVES moves in HEAD_WINDOW_S, said once. Returns
        the moves."""
        moved, now = 0, time.monotonic()
        for att in self.attached.values():
            for i, hook in enumerate(att.hooks):
                ahead = self._ahead_tcx(att, i, hook) if self.mode == "tcx" else \
                    self._ahead_tc(att, i, hook)
                if ahead is None:
                    continue
                key = (att.ifindex, hook.name)
                when = self.moves[key] = [t for t in self.moves.get(key, [])
                                          if now - t < HEAD_WINDOW_S]
                where = {"interface": att.name, "hook": hook.name, "program": ahead,
                         "mode": self.mode}
                if len(when) >= HEAD_MOVES:
                    if key not in self.yielded:
                        self.yielded.add(key)
                        log.error("another program keeps taking the head of the hook: left "
                                  "there; packets it ends are not counted", extra=where)
                    continue
                self.yielded.discard(key)
                try:
                    if self.mode == "tcx":
                        self._move_to_head(att, i, hook)
                    else:
                        self._move_filter_to_head(att, i)
                except (OSError, NetlinkError) as e:
                    log.warning("moving cniflow's program to the head failed",
                                extra={**where, "err": str(e)})
                    continue
                when.append(now)
                moved += 1
                log.warning("a program was put before cniflow's: moved back to the head of "
                            "the hook", extra=where)
        return moved

    def _ahead_tcx(self, att: Attachment, i: int, hook: Hook) -> str | None:
        """The name of the program that runs before cniflow's link, or None."""
        try:
            entries = syscall.query(att.ifindex, hook.tcx)
        except OSError:  # the interface is going: the next reconcile forgets it
            return None
        if not entries or entries[0][0] in self.ours or i >= len(att.links):
            return None
        try:
            return syscall.prog_name(entries[0][0])
        except OSError:
            return f"id {entries[0][0]}"

    def _ahead_tc(self, att: Attachment, i: int, hook: Hook) -> str | None:
        """The filter that runs before cniflow's at its priority on the clsact hook, or
        None. One at a lower priority (a lower --tc-priority's) runs first whatever
        cniflow does: said once. Of cniflow's own two handles, one that is not the
        attachment's (a move half made) is taken as the attachment's, the other
        deleted: never two left on a hook."""
        try:
            filters = self.filters(att.ifindex, hook.parent)
        except OSError:  # the interface is going: the next reconcile forgets it
            return None
        key = (att.ifindex, hook.name)
        lower = [f for f in filters if f[1] < self.priority]
        if lower and key not in self.lower:
            self.lower.add(key)
            log.error("a filter at a lower --tc-priority runs before cniflow's: packets it "
                      "ends are not counted", extra={"interface": att.name,
                                                     "program": _describe(lower[0])})
        first = next((f for f in filters if f[1] >= self.priority), None)
        if first is None or first[0] == att.handle(i):
            return None
        if first[0] in (HANDLE, SPARE_HANDLE):
            with contextlib.suppress(NetlinkError):
                self._del_filter(att.ifindex, hook.parent, att.handle(i))
            att.spare[i] = first[0] == SPARE_HANDLE
            return None
        return _describe(first)

    def filters(self, ifindex: int, parent: int) -> list[tuple[int, int, str, str]]:
        """(handle, priority, kind, bpf name) of the filters on a clsact hook, in the
        order the kernel runs them (its dump's). A raw dump: pyroute2 took 0.3 ms a
        hook, every reconcile (each second), for every interface."""
        if self.sock is None:
            self.sock = netlink.route_socket()
        out = []
        try:  # read to the dump's end: what is left unread would answer the next dump
            for _, buf, start, end in netlink.dump(self.sock, RTM_GETTFILTER, TCMSG.pack(
                    socket.AF_UNSPEC, ifindex, 0, parent, 0), "filters"):
                _, _, handle, _, info = TCMSG.unpack_from(buf, start + netlink.HDR.size)
                if not handle:  # a priority's own entry, not a filter
                    continue
                a = netlink.attrs(buf, start + netlink.HDR.size + TCMSG.size, end)
                kind = _text(buf, a.get(TCA_KIND)) or "?"
                o = netlink.attrs(buf, *a[TCA_OPTIONS]) if TCA_OPTIONS in a else {}
                name = _text(buf, o.get(TCA_BPF_NAME)) if kind == "bpf" else ""
                out.append((handle, info >> 16, kind, name))
        except Exception as e:  # a dump cut short: a new socket for the next one
            self.sock.close()
            self.sock = None
            if isinstance(e, OSError):
                raise
            raise OSError(f"filter dump: {e}") from e
        return out

    def _move_filter_to_head(self, att: Attachment, i: int) -> None:
        """cniflow's filter again under the other handle (at the head of its priority's
        list), then the old one deleted; never two left on the hook."""
        hook = att.hooks[i]
        parent, fn = hook.parent, self.progs[hook.name][0]
        old = att.handle(i)
        new = HANDLE if old == SPARE_HANDLE else SPARE_HANDLE
        self._filter(att.ifindex, parent, fn, new, "add-filter")
        try:
            self._del_filter(att.ifindex, parent, old)
        except NetlinkError as e:
            if e.code not in GONE:  # the old one stays: the new one goes
                with contextlib.suppress(NetlinkError):
                    self._del_filter(att.ifindex, parent, new)
                raise
        att.spare[i] = new == SPARE_HANDLE

    def _filter(self, ifindex: int, parent: int, fn, handle: int, command: str) -> None:
        name = fn.name.decode() if isinstance(fn.name, bytes) else fn.name
        self.ipr.tc(command, "bpf", ifindex, handle, fd=fn.fd, name=name, parent=parent,
                    prio=self.priority, classid=1, direct_action=True)

    def _del_filter(self, ifindex: int, parent: int, handle: int) -> None:
        self.ipr.tc("del-filter", "bpf", ifindex, handle, parent=parent, prio=self.priority)

    def _move_to_head(self, att: Attachment, i: int, hook: Hook) -> None:
        """The other copy of the program in front, then the old link detached: where the
        program in between ends the hook, every packet is counted once throughout."""
        prog = self.progs[hook.name][not att.spare[i]]
        new = syscall.link_create(prog.fd, att.ifindex, hook.tcx, syscall.F_BEFORE)
        try:
            if self.pins is not None:  # the pin names the new link at once
                self.pins.pin_link(new, att.ifindex, hook.name)
        except OSError:  # never two cniflow links on one hook: the new one goes
            with contextlib.suppress(OSError):
                syscall.link_detach(new)
            os.close(new)
            raise
        att.spare[i] = not att.spare[i]
        old, att.links[i] = att.links[i], new
        try:
            syscall.link_detach(old)
        finally:
            os.close(old)

    def _attach_tc(self, att: Attachment) -> None:
        ifindex, name = att.ifindex, att.name
        try:
            self.ipr.tc("add", "clsact", ifindex)
            att.created_clsact = True
        except NetlinkError as e:
            if e.code != errno.EEXIST:
                raise AttachError(f"{name}: adding clsact failed: {e}") from e
        try:
            for hook in att.hooks:
                self._filter(ifindex, hook.parent, self.progs[hook.name][0], HANDLE,
                             "replace-filter")
                # an earlier agent's filter after a move to the head: gone, not doubled
                with contextlib.suppress(NetlinkError):
                    self._del_filter(ifindex, hook.parent, SPARE_HANDLE)
            if att.entry:  # a pod's egress filter an earlier agent left: gone
                self._delete_filters(ifindex, name, quiet=True, parents=(PARENT_EGRESS,))
        except NetlinkError as e:
            self._remove(att)
            raise AttachError(f"{name}: adding the bpf filter failed: {e}") from e

    def _sweep(self, ifindex: int, name: str) -> None:
        """Remove what an earlier cniflow left on the interface: TCX links to programs
        named cniflow_* that are not this agent's (kept by a pin, or by a process that
        has not exited yet), and, when attaching with TCX, the cls_bpf filters under
        cniflow's handle. Programs of any other name are never touched."""
        if self.tcx:
            for hook in (syscall.TCX_INGRESS, syscall.TCX_EGRESS):
                try:
                    entries = syscall.query(ifindex, hook)
                except OSError:
                    return
                for prog_id, link_id in entries:
                    if prog_id in self.ours or not link_id:
                        continue
                    try:
                        if not syscall.prog_name(prog_id).startswith(PREFIX):
                            continue
                        fd = syscall.link_fd(link_id)
                        try:
                            syscall.link_detach(fd)
                        finally:
                            os.close(fd)
                        for role in [r for (i, r) in self.adopted if i == ifindex and
                                     self._tcx_of(r) == hook]:
                            os.close(self.adopted.pop((ifindex, role)))
                            self._unpin(ifindex, role)
                        log.info("replaced an earlier cniflow's link",
                                 extra={"interface": name, "link_id": link_id})
                    except OSError as e:  # gone meanwhile
                        log.debug("sweep", extra={"interface": name, "err": str(e)})
        if self.mode == "tcx":
            self._delete_filters(ifindex, name, quiet=True)

    def detach(self, ifindex: int) -> None:
        att = self.attached.pop(ifindex, None)
        if att is not None:
            self._gone(ifindex)
            self._remove(att)
            log.info("detached", extra={"interface": att.name, "ifindex": ifindex})

    def forget(self, ifindex: int) -> None:
        """The interface vanished: the kernel took our filters and links with it."""
        att = self.attached.pop(ifindex, None)
        if att is not None:
            self._gone(ifindex)
            for fd in att.links:
                os.close(fd)
            for hook in att.hooks:
                self._unpin(ifindex, hook.name)

    def release(self) -> None:
        """Hand over: close the links' fds, leave them attached and pinned."""
        for att in self.attached.values():
            for fd in att.links:
                os.close(fd)
            att.links = []
        for fd in self.adopted.values():
            os.close(fd)
        self.attached.clear()
        self.adopted.clear()

    def detach_all(self) -> None:
        for ifindex in list(self.attached):
            self.detach(ifindex)

    def _gone(self, ifindex: int) -> None:
        """What is kept for an attached interface, dropped (the index may come back as
        another interface): its place in the metered set, its moves to the head."""
        self._unmeter(ifindex)
        for hook in HOOK_NAMES:
            self.moves.pop((ifindex, hook), None)
            self.yielded.discard((ifindex, hook))
            self.lower.discard((ifindex, hook))

    def _unmeter(self, ifindex: int) -> None:
        """Out of the metered set (an entry point is there with dedup off too)."""
        with contextlib.suppress(OSError):  # never put there, or already gone
            self.program.meter(ifindex, False)

    @staticmethod
    def _tcx_of(role: str) -> int:
        return syscall.TCX_EGRESS if role == "egress" else syscall.TCX_INGRESS

    def _remove(self, att: Attachment) -> None:
        if att.links:
            for hook in att.hooks:
                self._unpin(att.ifindex, hook.name)
            for fd in att.links:
                try:
                    syscall.link_detach(fd)
                except OSError as e:
                    if e.errno not in GONE + (errno.ENOLINK,):
                        log.warning("removing link failed",
                                    extra={"interface": att.name, "err": str(e)})
                finally:
                    os.close(fd)
            att.links = []
            return
        self._delete_filters(att.ifindex, att.name)
        if att.created_clsact and not self._other_filters(att.ifindex):
            try:
                self.ipr.tc("del", "clsact", att.ifindex)
            except NetlinkError as e:
                if e.code not in GONE:
                    log.warning(
                        "removing clsact failed", extra={"interface": att.name, "err": str(e)}
                    )

    def _delete_filters(self, ifindex: int, name: str, quiet: bool = False,
                        parents: tuple[int, ...] = PARENTS) -> None:
        """cniflow's filters, under either handle; one that is not there is no error."""
        for parent in parents:
            for handle in (HANDLE, SPARE_HANDLE):
                try:
                    self._del_filter(ifindex, parent, handle)
                    if quiet:
                        log.info("removed an earlier cniflow's filter",
                                 extra={"interface": name})
                except NetlinkError as e:
                    if e.code not in GONE and not quiet:
                        log.warning("removing filter failed", extra={"interface": name,
                                                                     "err": str(e)})

    def _other_filters(self, ifindex: int) -> bool:
        try:
            for parent in PARENTS:
                if list(self.ipr.get_filters(ifindex, parent=parent)):
                    return True
        except NetlinkError:
            return False
        return False

    def close(self) -> None:
        self.ipr.close()
        if self.sock is not None:
            self.sock.close()
