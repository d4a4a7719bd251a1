"""Ask a VPP which release it is and which messages it has, from a child process.

vpp-papi's type registry is process-wide and keeps the first layout it sees, so
the agent must not load any definitions before it knows the release. The child
loads a neutral minimum (the handshake and show_version, whose layouts never
changed), reads the version and the message table, prints them as JSON and exits.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

MINIMAL = {
    "module": "probe", "types": [], "unions": [], "aliases": {}, "enumflags": [],
    "enums": [["address_family", ["ADDRESS_IP4", 0], ["ADDRESS_IP6", 1], {"enumtype": "u8"}]],
    "messages": [
        ["show_version", ["u16", "_vl_msg_id"], ["u32", "client_index"], ["u32", "context"],
         {"crc": "0x51077d14"}],
        ["show_version_reply", ["u16", "_vl_msg_id"], ["u32", "context"], ["i32", "retval"],
         ["string", "program", 32], ["string", "version", 32], ["string", "build_date", 32],
         ["string", "build_directory", 256], {"crc": "0xc919bde1"}],
    ],
    "services": {"show_version": {"reply": "show_version_reply"}},
    "options": {"version": "1.0.0"},
}


class ProbeError(RuntimeError):
    pass


def probe(socket_path: str, timeout: float = 10) -> tuple[str, dict[str, int]]:
    """(version, {name_crc: id}) of the VPP behind socket_path."""
    try:
        out = subprocess.run([sys.executable, "-m", "vpp_plugin.probe", socket_path],
                             capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise ProbeError(f"VPP at {socket_path} did not answer in {timeout:.0f} s") from e
    if out.returncode != 0:
        lines = (out.stderr or out.stdout).strip().splitlines()
        raise ProbeError(lines[-1] if lines else f"probe exited {out.returncode}")
    answer = json.loads(out.stdout)
    return answer["version"], answer["table"]


def main(socket_path: str) -> int:
    from importlib import resources

    from vpp_papi import VPPApiClient

    with tempfile.TemporaryDirectory() as d:
        files = [Path(d) / "probe.api.json", Path(d) / "memclnt.api.json"]
        files[0].write_text(json.dumps(MINIMAL))
        files[1].write_text(
            resources.files("vpp_papi.data").joinpath("memclnt.api.json").read_text())
        vpp = VPPApiClient(apifiles=[str(f) for f in files], server_address=socket_path,
                           read_timeout=5)
        try:
            vpp.connect("cniflow-probe")
        except Exception as e:
            print(f"cannot connect to VPP at {socket_path}: {e}", file=sys.stderr)
            return 1
        try:
            table = dict(vpp.transport.message_table)
            if not hasattr(vpp.api, "show_version"):
                print("VPP has no show_version_c919bde1: a release before 19.08.1 is not "
                      "supported", file=sys.stderr)
                return 1
            version = vpp.api.show_version().version
        finally:
            vpp.disconnect()
    print(json.dumps({"version": version, "table": table}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
