"""Pod ends (--pod-side): what a metered pod receives, counted at its own end of the veth.

A CNI that delivers with bpf_redirect_peer puts a packet into the pod's end of the veth,
past every hook of the host side. The entry points (bpf/entry.py) count such packets
where they come in, while their destination is still the pod's address; one whose
destination the CNI's program rewrites to a pod's after the entry point (a NodePort,
LoadBalancer or hostPort Service DNAT'ed to a pod of this node by Cilium's kube-proxy
replacement) meets no hook of cniflow's but one: the ingress of the pod's own device.

There cniflow_pod counts what is addressed to one of the pod's addresses (the pod_side
map: address -> host side's index, which the records name, and the pod side's), as the
host side's egress, and the host side's egress and the entry points leave those
addresses to it: each packet once, whichever way it came. What a metered pod of the
node sent was counted at the sender's veth (dedup): not again. A pod's entries are
written once its link is attached and removed before it is detached, so in between a
packet is counted on one side or the other, never both, never neither.

A TCX link is made by ifindex in the caller's network namespace: a throwaway thread
enters the pod's (setns: CAP_SYS_ADMIN, which only daemonset/overlays/pod-side grants),
makes the link and pins it; the link then works wherever the agent is. The pod's
namespace is the one whose id here is the host veth's IFLA_LINK_NETNSID, found among
the named ones (/run/netns: containerd and CRI-O name every pod's) and those of the
processes the agent may read under /proc.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import NamedTuple, TypeVar

from agent import netlink, peerns
from agent.resolve import namespaces
from bpf import syscall
from bpf.pins import POD_HOOK, PinDir
from bpf.program import addr_key

log = logging.getLogger(__name__)

CLONE_NEWNET = 0x40000000
SIOCGIFHWADDR = 0x8927
RETRY_SECONDS = 10.0  # a pod end that could not be attached is tried again after this
# adopted links no pod claimed are kept this long (pods not yet resolved at a restart)
ADOPT_GRACE_SECONDS = 30.0
_libc = ctypes.CDLL(None, use_errno=True)
T = TypeVar("T")


class PodEnd(NamedTuple):
    link: int  # the TCX link's fd
    peer: int  # the pod side's ifindex, in the pod's namespace
    mac: bytes  # the pod side's MAC (b"" for an adopted link not yet claimed)


def in_namespace(fd: int, make: Callable[[], T]) -> T:
    """make() run by a thread that entered the network namespace `fd` refers to (setns
    changes only the calling thread's, and the thread ends with it)."""
    out: list = []

    def run() -> None:
        try:
            if _libc.setns(fd, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"setns: {os.strerror(err)}")
            out.append(make())
        except BaseException as e:  # noqa: BLE001  raised in the caller's thread
            out.append(e)

    t = threading.Thread(target=run, name="cniflow-setns")
    try:
        t.start()
    except RuntimeError as e:  # no thread to be had
        raise OSError(f"setns thread: {e}") from None
    t.join()
    if not out or isinstance(out[0], BaseException):
        raise OSError(f"in the pod's namespace: {out[0] if out else 'nothing'}")
    return out[0]


def link_and_mac(prog: int | None, index: int) -> tuple[int | None, bytes]:
    """In the pod's namespace: a TCX link of prog on the ingress of device `index` (none
    without prog: an adopted one is there), and that device's MAC (what a packet for the
    pod is sent to)."""
    name = socket.if_indextoname(index)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        raw = fcntl.ioctl(s, SIOCGIFHWADDR, struct.pack("256s", name.encode()[:15]))
    link = None if prog is None else syscall.link_create(prog, index, syscall.TCX_INGRESS,
                                                         syscall.F_BEFORE)
    return link, raw[18:24]


class PodSide:
    def __init__(self, program, pins: PinDir | None, enabled: bool) -> None:
        """Built before the host sides' links are adopted: an agent without --pod-side
        empties the map first, so its host sides never count beside an earlier agent's
        pod ends."""
        self.program, self.pins, self.enabled = program, pins, enabled
        self.ends: dict[int, PodEnd] = {}  # host-side ifindex -> its pod end's link
        self.adopted: dict[int, PodEnd] = {}  # pinned by an earlier agent, not yet claimed
        self.started = time.monotonic()
        self.failed: dict[int, float] = {}  # host-side ifindex -> when to try again
        self.said: set[int] = set()  # host-side veths whose failure was said
        # the pods' addresses -> host-side ifindex; None until known (the pinned map
        # keeps what an earlier agent wrote meanwhile)
        self.addresses: dict[str, int] | None = None
        self.sock = netlink.route_socket(strict=True)
        if not enabled:  # an earlier agent's, with --pod-side: the host sides count again
            self.program.pod_side_addresses({})
        if pins is not None:
            self._adopt()

    def _adopt(self) -> None:
        """Take over the pod ends' links an earlier agent pinned (those still on a
        device run this agent's program from now on); defunct ones are unpinned. One
        that cannot be read is unpinned too: the agent starts whatever it finds."""
        for host, _, path in self.pins.link_pins((POD_HOOK,)):
            try:
                fd = syscall.obj_get(path)
            except OSError:
                continue
            try:
                _, dev, _ = syscall.link_info(fd)
                if dev and self.enabled:
                    syscall.link_update(fd, self.program.pod.fd)
            except OSError:
                dev = 0
            if dev:
                self.adopted[host] = PodEnd(fd, dev, b"")
            else:  # the pod is gone, or going
                self._drop(PodEnd(fd, 0, b""), host)
        if self.adopted:
            log.info("adopted pinned pod-end links", extra={"links": len(self.adopted)})
        if not self.enabled:
            for host in list(self.adopted):
                self._drop(self.adopted.pop(host), host)

    def apply(self, hosts: dict[int, str]) -> None:
        """A link on the pod end of every host-side veth in `hosts` (the metered pods'),
        none on the others'; adopted links no pod claimed within ADOPT_GRACE_SECONDS,
        detached. What fails is said once a veth and tried again after RETRY_SECONDS."""
        if not self.enabled:
            return
        for host in [h for h in self.ends if h not in hosts]:
            self._drop(self.ends.pop(host), host)
        now = time.monotonic()
        todo = [h for h in hosts if h not in self.ends and self.failed.get(h, 0.0) <= now]
        try:
            peers = peerns.veth_peers(self.sock) if todo else {}
        except OSError as e:
            log.warning("reading the veths' peers failed", extra={"err": str(e)})
            return
        for host in todo:
            try:
                self.ends[host] = self._attach(host, peers.get(host))
                self.failed.pop(host, None)
                self.said.discard(host)
            except OSError as e:
                self.failed[host] = now + RETRY_SECONDS
                if host not in self.said:
                    self.said.add(host)
                    log.warning("attaching to the pod's end of the veth failed: what the "
                                "CNI delivers past its host side is not counted",
                                extra={"interface": hosts[host], "err": str(e),
                                       "retry_in_s": RETRY_SECONDS})
        if now - self.started >= ADOPT_GRACE_SECONDS:
            for host in [h for h in self.adopted if h not in hosts]:
                self._drop(self.adopted.pop(host), host)
        for host in [h for h in self.failed if h not in hosts]:
            del self.failed[host]
            self.said.discard(host)
        self._write()

    def _attach(self, host: int, peer: tuple[int, int] | None) -> PodEnd:
        """The pod end's link: an adopted one still on the veth's peer, or a new one."""
        if peer is None:
            raise OSError("not a veth whose peer is in another namespace")
        nsid, index = peer
        fd = self._open(nsid)
        try:
            old = self.adopted.pop(host, None)
            if old is not None and old.peer != index:
                self._drop(old, host)
                old = None
            prog = self.program.pod.fd if old is None else None
            link, mac = in_namespace(fd, lambda: link_and_mac(prog, index))
            if old is not None:
                return old._replace(mac=mac)
        finally:
            os.close(fd)
        if self.pins is not None:
            try:
                self.pins.pin_link(link, host, POD_HOOK)
            except OSError:
                with contextlib.suppress(OSError):
                    syscall.link_detach(link)
                os.close(link)
                raise
        log.info("attached at the pod's end of the veth", extra={"ifindex": host,
                                                                  "peer": index})
        return PodEnd(link, index, mac)

    def _open(self, nsid: int) -> int:
        """An fd of the network namespace whose id here is nsid, checked on that very fd
        (a /proc/PID path may be another process's by the time it is opened again): the
        named ones first (/run/netns), then those processes hold."""
        for path in namespaces().values():
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                if peerns.nsid(self.sock, fd) == nsid:
                    return fd
            except OSError:
                pass
            os.close(fd)
        raise OSError(f"no path to the pod's network namespace (netnsid {nsid}) under "
                      "/run/netns (or /proc, for the namespaces of processes the agent "
                      "may read)")

    def pod_addresses(self, addresses: dict[str, int]) -> None:
        """The metered pods' addresses (address -> host-side ifindex): those of pods
        whose pod end is attached go into the pod_side map."""
        self.addresses = addresses
        self._write()

    def _write(self) -> None:
        """The pod_side map: the addresses of the pods whose end is attached."""
        if self.enabled and self.addresses is not None:
            self.program.pod_side_addresses({
                addr_key(ip): (host, self.ends[host].peer, self.ends[host].mac)
                for ip, host in self.addresses.items() if host in self.ends})

    def _drop(self, end: PodEnd, host: int) -> None:
        """A pod end no longer in self.ends: its entries out of the map first (its host
        side counts again), then its link detached and unpinned, whatever fails."""
        try:
            self.program.pod_side_without(host)
            if self.pins is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.pins.link_path(host, POD_HOOK))
        except OSError as e:
            log.warning("removing a pod end's entries or pin failed",
                        extra={"ifindex": host, "err": str(e)})
        finally:
            try:
                syscall.link_detach(end.link)
            except OSError:  # the pod and its device are gone: the link with them
                pass
            finally:
                os.close(end.link)

    def detach_all(self) -> None:
        for ends in (self.ends, self.adopted):
            for host in list(ends):
                self._drop(ends.pop(host), host)

    def release(self) -> None:
        """Hand over: links, pins and entries stay for the next agent."""
        for end in [*self.ends.values(), *self.adopted.values()]:
            os.close(end.link)
        self.ends.clear()
        self.adopted.clear()

    def close(self) -> None:
        self.sock.close()

