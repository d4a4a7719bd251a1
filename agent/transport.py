"""Carry IPFIX messages to the collector over UDP or TCP.

`session` changes whenever the collector must be taught the templates again
and sequence numbering restarts (RFC 7011 section 10): once for UDP, on every
connection for TCP.
"""

from __future__ import annotations

import array
import contextlib
import errno
import fcntl
import logging
import os
import socket
import ssl
import struct
import termios
import time

import numpy as np

from agent.ipfix.message import Messages
from agent.sendmmsg import sendmmsg

log = logging.getLogger(__name__)


class ResolveError(ValueError):
    """The collector address does not resolve."""


def resolve(host: str, port: int, kind: int) -> tuple[int, tuple]:
    try:
        infos = socket.getaddrinfo(host, port, 0, kind)
    except (socket.gaierror, UnicodeError) as e:
        raise ResolveError(f"collector {host}:{port} does not resolve: {e}") from e
    family, _, _, _, addr = infos[0]
    return family, addr


class UdpTransport:
    """One connected socket for the agent's life: a stable source port is one session."""

    kind = "udp"

    def __init__(self, host: str, port: int) -> None:
        family, self.addr = resolve(host, port, socket.SOCK_DGRAM)
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.connect(self.addr)
        self.session = 1
        self.errors = 0
        self.last_error = ""

    def ready(self) -> bool:
        return True

    def send(self, msg: bytes) -> bool:
        """One message; False when it did not reach a listening socket as far as the
        kernel can tell. A refusal raised here is an ICMP error about an earlier
        datagram (a remote collector's, arriving late): this one was not tried, so it is
        counted and sent again at once. One pending after the send is about this one."""
        for _ in range(2):
            try:
                self.sock.send(msg)
            except ConnectionRefusedError as e:
                self._error(e)
                continue
            except OSError as e:  # buffer full, no route...
                self._error(e)
                return False
            return not self._refused()
        return False

    def send_many(self, msgs: Messages, progress=None) -> int:
        """All messages with sendmmsg; returns how many reached a listening socket as far
        as the kernel can tell, so that the rest stay in the backlog. A node-local
        collector's refusal (ICMP port unreachable) comes back within the send of the
        datagram it refuses: the kernel then stops sendmmsg at the next datagram with a
        short count and drops the error, or leaves the error pending after the last one.
        Either way the last datagram counted as sent was refused, and is not counted. A
        short count can also be a signal: a probe with the next datagram alone tells the
        two apart. A refusal about an earlier datagram (late, from afar) is counted and
        the batch tried once more."""
        sent, stale = 0, False
        fd = self.sock.fileno()
        while sent < len(msgs):
            want = len(msgs) - sent
            n, err = sendmmsg(fd, msgs.buf, msgs.offsets[sent:], msgs.lengths[sent:])
            if err:
                self._error(OSError(err, os.strerror(err)))
                if err == errno.ECONNREFUSED and n == 0 and not stale:
                    stale = True
                    continue
                return sent + n
            if n == want:
                return sent + n - (1 if self._refused() else 0)
            # why did the kernel stop? the next datagram alone tells
            m, err = sendmmsg(fd, msgs.buf, msgs.offsets[sent + n: sent + n + 1],
                              msgs.lengths[sent + n: sent + n + 1])
            if err:
                self._error(OSError(err, os.strerror(err)))
                return sent + n - 1
            if self._refused():  # refused again: so was the datagram before it
                return sent + n - 1
            sent += n + 1  # a signal, nothing refused: go on
        return sent

    def _refused(self) -> bool:
        """An error pending on the socket (read and cleared): a refusal of the datagram
        just sent, for a node-local collector."""
        err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._error(OSError(err, os.strerror(err)))
        return err == errno.ECONNREFUSED

    def _error(self, e: OSError) -> None:
        if str(e) != self.last_error:
            log.warning(
                "export to collector failed", extra={"collector": str(self.addr), "err": str(e)}
            )
        self.errors += 1
        self.last_error = str(e)

    def close(self) -> None:
        self.sock.close()


class TcpTransport:
    """Reconnects with exponential backoff; the caller keeps metering meanwhile."""

    kind = "tcp"

    def __init__(
        self,
        host: str,
        port: int,
        backoff_min: float = 0.5,
        backoff_max: float = 30.0,
        timeout: float = 2.0,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.family, self.addr = resolve(host, port, socket.SOCK_STREAM)
        self.host, self.tls = host, tls
        self.backoff_min, self.backoff_max, self.timeout = backoff_min, backoff_max, timeout
        self.backoff = backoff_min
        self.next_try = 0.0
        self.sock: socket.socket | None = None
        self.session = 0
        self.errors = 0
        self.last_error = ""
        self.written = 0  # octets written into the current connection
        self.closed = (0, 0)  # (session, octets acknowledged) of the last connection reset

    @property
    def connected(self) -> bool:
        return self.sock is not None

    def acked(self) -> int:
        """Octets of the current connection the collector's kernel has acknowledged:
        written, less what still waits in the send queue (SIOCOUTQ). Over TLS the queue
        holds ciphertext, a little longer than what it carries: a slight underestimate,
        so what is retained for resending errs on the side of more."""
        if self.sock is None:
            return 0
        buf = array.array("i", [0])
        try:
            fcntl.ioctl(self.sock.fileno(), termios.TIOCOUTQ, buf)
        except OSError:
            return 0
        return max(0, self.written - buf[0])

    def ready(self) -> bool:
        if self.sock is not None:
            return True
        now = time.monotonic()
        if now < self.next_try:
            return False
        s = socket.socket(self.family, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            s.connect(self.addr)
            if self.tls is not None:  # the handshake verifies the collector's certificate
                s = self.tls.wrap_socket(s, server_hostname=self.host)
        except OSError as e:  # ssl.SSLError is an OSError too
            s.close()
            self._failed(str(e))
            return False
        self.sock = s
        self.session += 1
        self.written = 0
        self.backoff = self.backoff_min
        log.info(
            "collector connected", extra={"collector": str(self.addr), "session": self.session}
        )
        return True

    def _failed(self, err: str) -> None:
        self.errors += 1
        if err != self.last_error:
            log.warning("collector unreachable", extra={"collector": str(self.addr), "err": err})
        self.last_error = err
        self.next_try = time.monotonic() + self.backoff
        self.backoff = min(self.backoff * 2, self.backoff_max)

    def send(self, msg: bytes) -> bool:
        if self.sock is None:
            return False
        try:
            self.sock.sendall(msg)
            self.written += len(msg)
            return True
        except OSError as e:
            self._abort(str(e))
            return False

    def send_many(self, msgs: Messages, progress=None) -> int:
        """The messages as one stream write; returns how many went whole, and tells
        progress(k) after each write that ends the k-th. A broken connection is closed:
        the collector gets templates again on the next one."""
        if self.sock is None:
            return 0
        ends = msgs.offsets + msgs.lengths
        view = memoryview(msgs.buf)[: int(ends[-1])] if len(msgs) else b""
        done = whole = 0
        try:
            while done < len(view):
                done += self.sock.send(view[done:])
                if progress is not None and done >= ends[whole]:
                    whole = int(np.searchsorted(ends, done, "right"))
                    progress(whole)
        except OSError as e:
            self.written += done
            self._abort(str(e))
        else:
            self.written += done
        return int(np.searchsorted(ends, done, "right"))

    def _abort(self, err: str) -> None:
        """Close with a reset (SO_LINGER 0): what the collector has not acknowledged is
        discarded, never delivered after the exporter has queued it to send again (a
        collector that stalled past the timeout would otherwise get it twice)."""
        self.closed = (self.session, self.acked())  # what the collector has, for good
        with contextlib.suppress(OSError):
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()
        self.sock = None
        self._failed(err)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


class TlsError(ValueError):
    """A TLS file is missing or unusable."""


def client_tls(ca: str, cert: str = "", key: str = "") -> ssl.SSLContext:
    """TLS towards the collector: its certificate verified against ca (the system's
    CAs if empty), and ours presented when given."""
    try:
        ctx = ssl.create_default_context(cafile=ca or None)
        if cert:
            ctx.load_cert_chain(cert, key or None)
    except (OSError, ssl.SSLError) as e:
        raise TlsError(f"TLS files ({ca or 'system CAs'}, {cert or 'no certificate'}): {e}") \
            from None
    return ctx


def server_tls(cert: str, key: str, ca: str = "") -> ssl.SSLContext:
    """TLS for the collector: its certificate, and client certificates required and
    verified against ca when ca is given."""
    if not cert:
        raise TlsError("--tls-cert is needed with --transport tls")
    try:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=ca or None)
        ctx.load_cert_chain(cert, key or None)
    except (OSError, ssl.SSLError) as e:
        raise TlsError(f"TLS files ({cert}, {key or 'key in the certificate file'}): {e}") \
            from None
    ctx.verify_mode = ssl.CERT_REQUIRED if ca else ssl.CERT_NONE
    return ctx


def make(kind: str, host: str, port: int, tls: ssl.SSLContext | None = None):
    if kind == "udp":
        return UdpTransport(host, port)
    transport = TcpTransport(host, port, tls=tls if kind == "tls" else None)
    transport.kind = kind
    return transport
