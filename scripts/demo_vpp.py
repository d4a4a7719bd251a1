"""The VPP demo (`scripts/demo.sh --vpp`): the agent on a VPP node, for when you have
no VPP at hand. VPP itself is the tests' simulator (tests/vppsim.py), speaking the
binary API on a unix socket and sending IPFIX as flowprobe builds it; the agent,
vpp-papi, the mediation and cniflow collector are the real ones. The flows are
simulated: their counts are made up, the path they take through cniflow is not.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]
from demo import PORT, report, start, step, stop  # noqa: E402
from vpplab import CURRENT, NODE, lab  # noqa: E402
from vppsim import RX, TX  # noqa: E402


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="cniflow-demo-vpp-"))
    with lab(CURRENT) as lb:
        lb.api.namespace("shop", {"cniflow.io/export": "true"})
        web = lb.pod("web-7d9f", "10.1.0.5")
        db = lb.pod("db-0", "10.1.0.6")
        step(f"a simulated VPP {CURRENT} (Calico/VPP layout) on {lb.sim.path}: pods "
             f"shop/web-7d9f on tun0, shop/db-0 on tun1; namespace shop opted in")
        out = work / "records.jsonl"
        procs = [start(lb.node, "collector", "--listen", f"127.0.0.1:{PORT}", "--output",
                       str(out), "--metrics-address", "off", log=work / "collector.log"),
                 start(lb.node, "agent", "--kubernetes", "--node-name", NODE, "--kubeconfig",
                       str(lb.api.kubeconfig(work / "kubeconfig")), "--dataplane", "vpp",
                       "--vpp-socket", lb.sim.path, "--idle-timeout", "2",
                       "--metrics-address", "off", log=work / "agent.log")]
        try:
            deadline = time.time() + 30
            while time.time() < deadline and len(lb.sim.state.enabled) < 2:
                time.sleep(0.2)
            e = lb.sim.state.exporter
            step(f"the agent configured VPP: exporter {e.src} -> {e.collector}:{e.port} "
                 f"(VRF {e.vrf}, MTU {e.mtu}), flowprobe on "
                 + ", ".join(f"sw_if_index {i}" for i in sorted(lb.sim.state.enabled)))
            lb.sim.report(web, [{"src": "10.1.0.5", "dst": "10.1.0.6", "proto": 6,
                                  "sport": 40312, "dport": 5432, "packets": 12,
                                  "octets": 2400, "tcp_flags": 0x1B}], RX)
            lb.sim.report(db, [{"src": "10.1.0.5", "dst": "10.1.0.6", "proto": 6,
                                 "sport": 40312, "dport": 5432, "packets": 12,
                                 "octets": 2400, "tcp_flags": 0x1B}], TX)
            lb.sim.report(web, [{"src": "10.1.0.5", "dst": "93.184.216.34", "proto": 17,
                                  "sport": 51000, "dport": 53, "packets": 2,
                                  "octets": 140}], RX)
            step("VPP's timer process reported flows it metered a while ago; SIGTERM soon")
            time.sleep(4)
        finally:
            stop(procs)
        return report(out, "'in' is what the pod sent (flowprobe RX on its interface), "
                      "'out' what VPP delivered to it (TX).")


if __name__ == "__main__":
    sys.exit(main())
