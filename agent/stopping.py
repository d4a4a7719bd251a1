"""How a process is told to stop: SIGTERM or SIGINT set a Stop that the main loops wait
on; SIGUSR1 writes every thread's stack to stderr (a process that will not stop says
where it is).
"""

from __future__ import annotations

import faulthandler
import os
import select
import signal


class Stop:
    """A stop flag that a signal handler can set. Not a threading.Event: Event.set()
    takes the lock that Event.wait() holds, and Python runs a signal handler in the main
    thread, so a SIGTERM that came while the main thread was inside wait() deadlocked it
    (a loop of wait(0) hung on 165 of 300 SIGTERMs; the agent, waiting 20 ms at a time,
    hung in CI). set() takes no lock: a flag, and a byte down a pipe that wait() polls."""

    def __init__(self) -> None:
        self._set = False
        self._read, self._write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def set(self) -> None:
        self._set = True
        try:
            os.write(self._write, b"\0")
        except BlockingIOError:  # the pipe is full: it is readable already
            pass

    def is_set(self) -> bool:
        return self._set

    def wait(self, timeout: float | None = None) -> bool:
        """True once set; at most `timeout` seconds. Any thread may wait."""
        if not self._set:
            poll = select.poll()  # one a call: a poll object is not shared between threads
            poll.register(self._read, select.POLLIN)
            poll.poll(None if timeout is None else max(0.0, timeout) * 1000)
        return self._set


def on_signals(stop: Stop, signals=(signal.SIGTERM, signal.SIGINT)) -> None:
    """`signals` set `stop`, and are unblocked (a collector's worker starts with them
    blocked: agent/workers.py); SIGUSR1 dumps the stacks."""
    for sig in signals:
        signal.signal(sig, lambda *_: stop.set())
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, signals)
