"""One live vpp-papi connection to VPP, with the definitions of its release.

Connecting probes the release first (vpp_plugin.probe), writes the matching
definitions (vpp_plugin.apidefs) and loads only those. Every request's retval is
checked here, so a refusal always names the message and VPP's error. A dropped
socket or a new VPP process (control_ping's vpe_pid) is reported to the caller,
which re-applies its configuration: VPP forgets everything when it restarts.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from vpp_plugin import apidefs
from vpp_plugin.probe import ProbeError, probe

log = logging.getLogger(__name__)

ERRORS = {-1: "UNSPECIFIED", -2: "INVALID_SW_IF_INDEX", -3: "NO_SUCH_FIB", -6: "NO_SUCH_ENTRY",
          -7: "INVALID_VALUE", -9: "UNIMPLEMENTED", -81: "VALUE_EXIST",
          -100: "CANNOT_ENABLE_DISABLE_FEATURE", -116: "ENTRY_ALREADY_EXISTS",
          -126: "UNSUPPORTED", -165: "EAGAIN"}
NEEDED = ("show_version", "sw_interface_dump", "set_ipfix_exporter", "ipfix_exporter_dump",
          "flowprobe_params", "flowprobe_tx_interface_add_del", "ip_neighbor_dump")


class VppError(RuntimeError):
    """VPP unreachable, unsupported, or a request refused."""


class Refused(VppError):
    def __init__(self, message: str, retval: int) -> None:
        super().__init__(f"{message} refused by VPP: {ERRORS.get(retval, 'error')} ({retval})")
        self.message, self.retval = message, retval


class ReleaseChanged(VppError):
    """VPP came back as another release: this process holds the old layouts."""


class Connection:
    def __init__(self, socket_path: str, timeout: float = 5.0) -> None:
        self.socket_path, self.timeout = socket_path, timeout
        self.version = ""
        self.family = ""
        self.layout: apidefs.Layout | None = None
        self.client = None
        self.vpe_pid = 0
        self._dir = Path(tempfile.mkdtemp(prefix="cniflow-vpp-api-"))

    @property
    def v1908(self) -> bool:
        """19.08.x: raw addresses, separate record flags, u32 enums in the messages."""
        return self.layout is not None and self.layout.v1908

    @property
    def connected(self) -> bool:
        return self.client is not None

    def connect(self) -> bool:
        """Connect; True when this is a VPP process the agent has not configured yet."""
        from vpp_papi import VPPApiClient

        try:
            version, table = probe(self.socket_path, self.timeout * 2)
        except ProbeError as e:
            raise VppError(str(e)) from e
        layout = apidefs.Layout.of(version)
        if self.layout is not None and layout != self.layout:
            raise ReleaseChanged(f"VPP is now {version}, was {self.version}: restart cniflow to "
                                 "load that release's API")
        files = apidefs.write(version, table, self._dir)  # raises CrcMismatch
        names = {k.rpartition("_")[0] for k in table}
        missing = [n for n in NEEDED if n not in names]
        if missing:
            raise VppError(f"VPP {version} lacks {', '.join(missing)} (is the flowprobe "
                           "plugin loaded?)")
        client = VPPApiClient(apifiles=files, server_address=self.socket_path,
                              read_timeout=self.timeout)
        try:
            client.connect("cniflow")
        except Exception as e:
            raise VppError(f"cannot connect to VPP at {self.socket_path}: {e}") from e
        self.client, self.version, self.layout = client, version, layout
        self.family = apidefs.family(version, table)
        pid = self.call("control_ping").vpe_pid
        fresh = pid != self.vpe_pid
        self.vpe_pid = pid
        log.info("connected to VPP", extra={"version": version, "family": self.family,
                                            "socket": self.socket_path, "vpe_pid": pid})
        return fresh

    def has(self, message: str) -> bool:
        return self.client is not None and hasattr(self.client.api, message)

    def call(self, message: str, **fields):
        """A request and its reply; a non-zero retval raises Refused."""
        reply = self._invoke(message, fields)
        if reply.retval != 0:
            raise Refused(message, reply.retval)
        return reply

    def dump(self, message: str, **fields) -> list:
        return list(self._invoke(message, fields))

    def _invoke(self, message: str, fields: dict):
        if self.client is None:
            raise VppError("not connected to VPP")
        from vpp_papi.vpp_papi import VPPIOError

        fn = getattr(self.client.api, message, None)
        if fn is None:
            raise VppError(f"VPP {self.version} has no {message}")
        try:
            return fn(**fields)
        except (OSError, EOFError, VPPIOError) as e:
            self.drop()
            raise VppError(f"{message}: connection to VPP lost ({e})") from e

    def alive(self) -> bool:
        """Still the same VPP process? False after a restart or a lost socket."""
        if self.client is None:
            return False
        try:
            pid = self.call("control_ping").vpe_pid
        except VppError:
            return False
        if pid != self.vpe_pid:
            self.drop()
            return False
        return True

    def drop(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            try:
                client.disconnect()
            except Exception:  # the socket may be gone already
                pass
            _release(client)

    def close(self) -> None:
        self.drop()
        for f in self._dir.glob("*"):
            f.unlink()
        self._dir.rmdir()


def _release(client) -> None:
    """vpp-papi's socket transport keeps two multiprocessing queues (a pipe and a feeder
    thread each) until its next connect(); this client is never connected again, so
    they are closed here. Else every VPP restart leaves 4 fds and 2 threads behind
    (found by bench/soak.py)."""
    transport = getattr(client, "transport", None)
    for queue in (getattr(transport, "sque", None), getattr(transport, "q", None)):
        if queue is not None:
            queue.close()
            queue.join_thread()
