"""Keeping the agent's one pyroute2 socket from growing.

pyroute2 (0.9) files a reply it did not wait for in the socket's queue of
unsolicited messages: the kernel's ACK that follows a route lookup's answer,
and the like after tc requests. On a socket bound to no multicast group nobody
reads that queue, so it grows by about 0.4 KB a route lookup and 1 KB an
attach and detach, forever (bench/k8s.py churn: 19 MB in 30 minutes).
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def stray_queue(ipr):
    """pyroute2's queue of unsolicited messages for this socket, or None."""
    queue = getattr(getattr(getattr(ipr, "asyncore", None), "msg_queue", None), "root", None)
    return queue if hasattr(queue, "get_nowait") else None


def drop_strays(ipr) -> int:
    """Empty it (the agent subscribes to no group: all of it is stray); returns
    how many messages went."""
    queue = stray_queue(ipr)
    if queue is None:
        return 0
    n = 0
    while not queue.empty():
        queue.get_nowait()
        queue.task_done()
        n += 1
    return n


def check(ipr) -> None:
    """Say once, at start, if this pyroute2 hides the queue: memory may then grow."""
    if stray_queue(ipr) is None:
        log.warning("pyroute2's message queue not found: stray netlink replies are not "
                    "dropped and memory may grow with pod churn")
