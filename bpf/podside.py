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
the named ones (/run/netns) and those only processes hold (/proc: hostPID).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import threading
import time
from typing import NamedTuple

from agent import netlink, peerns
from agent.resolve import namespaces
from bpf import syscall
from bpf.pins import POD_HOOK, PinDir
from bpf.program import addr_key

log = logging.getLogger(__name__)

CLONE_NEWNET = 0x40000000
RETRY_SECONDS = 10.0  # a pod end that could not be attached is tried again after this
_libc = ctypes.CDLL(None, use_errno=True)


class PodEnd(NamedTuple):
    link: int  # the TCX link's fd
    peer: int  # the pod side's ifindex, in the pod's namespace


def in_namespace(path: str, make):
    """make() run by a thread that entered the network namespace at path (setns changes
    only the calling thread's, and the thread ends with it)."""
    out: list = []

    def run() -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns {path}: {os.strerror(err)}")
            finally:
                os.close(fd)
            out.append(make())
        except Exception as e:  # raised in the caller's thread
            out.append(e)

    t = threading.Thread(target=run, name="cniflow-setns")
    t.start()
    t.join()
    if isinstance(out[0], Exception):
        raise out[0]
    return out[0]


class PodSide:
    def __init__(self, program, pins: PinDir | None, enabled: bool) -> None:
        self.program, self.pins, self.enabled = program, pins, enabled
        self.ends: dict[int, PodEnd] = {}  # host-side ifindex -> its pod end's link
        self.adopted: dict[int, PodEnd] = {}  # pinned by an earlier agent, not yet claimed
        self.paths: dict[int, str] = {}  # netnsid -> a path of that namespace
        self.failed: dict[int, float] = {}  # host-side ifindex -> when to try again
        # the pods' addresses -> host-side ifindex; None until known (the pinned map
        # keeps what an earlier agent wrote meanwhile)
        self.addresses: dict[str, int] | None = None
        self.sock = netlink.route_socket(strict=True)
        if pins is not None:
            self._adopt()
        if not enabled:  # an earlier agent's, with --pod-side: the host sides count again
            self.program.pod_side_addresses({})
            for host in list(self.adopted):
                self._drop(self.adopted.pop(host), host)

    def _adopt(self) -> None:
        """Take over the pod ends' links an earlier agent pinned (those still on a
        device run this agent's program from now on); defunct ones are unpinned."""
        for host, _, path in self.pins.link_pins((POD_HOOK,)):
            fd = syscall.obj_get(path)
            _, dev, _ = syscall.link_info(fd)
            if not dev:  # the pod is gone
                os.close(fd)
                os.unlink(path)
                continue
            if self.enabled:
                syscall.link_update(fd, self.program.pod.fd)
            self.adopted[host] = PodEnd(fd, dev)
        if self.adopted:
            log.info("adopted pinned pod-end links", extra={"links": len(self.adopted)})

    def apply(self, hosts: dict[int, str]) -> None:
        """A link on the pod end of every host-side veth in `hosts` (the metered pods'),
        none on the others'; adopted links no pod claims, detached."""
        if not self.enabled:
            return
        for host in [h for h in self.ends if h not in hosts]:
            self._drop(self.ends.pop(host), host)
        now = time.monotonic()
        todo = [h for h in hosts if h not in self.ends and self.failed.get(h, 0.0) <= now]
        peers = peerns.veth_peers(self.sock) if todo or self.adopted else {}
        for host in todo:
            try:
                self.ends[host] = self._attach(host, peers.get(host))
                self.failed.pop(host, None)
            except OSError as e:
                self.failed[host] = now + RETRY_SECONDS
                log.warning("attaching to the pod's end of the veth failed: what the CNI "
                            "delivers past its host side is not counted",
                            extra={"interface": hosts[host], "err": str(e),
                                   "retry_in_s": RETRY_SECONDS})
        for host in list(self.adopted):  # on no wanted veth, or on another device now
            self._drop(self.adopted.pop(host), host)
        for host in [h for h in self.failed if h not in hosts]:
            del self.failed[host]
        self._write()

    def _attach(self, host: int, peer: tuple[int, int] | None) -> PodEnd:
        """The pod end's link: an adopted one still on the veth's peer, or a new one."""
        if peer is None:
            raise OSError("not a veth whose peer is in another namespace")
        nsid, index = peer
        old = self.adopted.pop(host, None)
        if old is not None:
            if old.peer == index:
                return old
            self._drop(old, host)
        link = in_namespace(self._path(nsid), lambda: syscall.link_create(
            self.program.pod.fd, index, syscall.TCX_INGRESS, syscall.F_BEFORE))
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
        return PodEnd(link, index)

    def _path(self, nsid: int) -> str:
        """A path of the namespace with this id: the one found before if it still is
        that namespace, else the first of the named ones, then of the processes', that
        is (every id read on the way kept)."""
        path = self.paths.get(nsid)
        if path is not None and self._nsid(path) == nsid:
            return path
        self.paths = {}
        for path in namespaces().values():
            found = self._nsid(path)
            if found >= 0:
                self.paths.setdefault(found, path)
            if found == nsid:
                return path
        raise OSError(f"no path to the pod's network namespace (netnsid {nsid}) under "
                      "/run/netns or /proc (the DaemonSet needs hostPID, or the "
                      "runtime's named namespaces mounted)")

    def _nsid(self, path: str) -> int:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return -1
        try:
            return peerns.nsid(self.sock, fd)
        except OSError:
            return -1
        finally:
            os.close(fd)

    def pod_addresses(self, addresses: dict[str, int]) -> None:
        """The metered pods' addresses (address -> host-side ifindex): those of pods
        whose pod end is attached go into the pod_side map."""
        self.addresses = addresses
        self._write()

    def _write(self) -> None:
        """The pod_side map: the addresses of the pods whose end is attached."""
        if self.enabled and self.addresses is not None:
            self.program.pod_side_addresses({
                addr_key(ip): (host, self.ends[host].peer)
                for ip, host in self.addresses.items() if host in self.ends})

    def _drop(self, end: PodEnd, host: int) -> None:
        """A pod end no longer in self.ends: its entries out of the map first (its host
        side counts again), then its link detached and unpinned."""
        self._write()
        if self.pins is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.pins.link_path(host, POD_HOOK))
        try:
            syscall.link_detach(end.link)
        except OSError:  # the pod and its device are gone: the link with them
            pass
        finally:
            os.close(end.link)

    def detach_all(self) -> None:
        for host in list(self.ends):
            self._drop(self.ends.pop(host), host)

    def release(self) -> None:
        """Hand over: links, pins and entries stay for the next agent."""
        for end in [*self.ends.values(), *self.adopted.values()]:
            os.close(end.link)
        self.ends.clear()
        self.adopted.clear()

    def close(self) -> None:
        self.sock.close()
