"""A VPP node for tests and the demo: a node namespace, the fake API server, the
VPP simulator, and the host side of the VPP interconnect as each CNI builds it."""

from __future__ import annotations

import contextlib
import subprocess
import uuid
from dataclasses import dataclass, field

import netlab
from fakeapi import FakeApiServer
from vppsim import SIZES, VppSim

NODE = "node-a"
CONTIV, CURRENT, MIDDLE = "19.08.2", "24.10.0-release", "21.06.0-release"


@dataclass
class Lab:
    node: netlab.Node
    api: FakeApiServer
    sim: VppSim
    collector_ip: str
    source_ip: str
    vrf: int
    pods: dict[str, tuple[int, str]] = field(default_factory=dict)  # name -> (sw, ip)

    @property
    def contiv(self) -> bool:
        return self.sim.old

    def pod(self, name: str, ip: str, annotations: dict | None = None) -> int:
        """A pod as the CNI builds it in VPP, and as the API server lists it."""
        if name not in self.pods:
            if self.contiv:  # tap v2, tagged by sandbox id, with a static neighbour
                sw = self.sim.add_interface(f"tap{len(self.pods) + 1}",
                                            "vpp-tap-" + uuid.uuid4().hex * 2)
                self.sim.neighbors.append((sw, ip, bytes([2, 0xFE, 1, 2, 3, sw]), 3))
            else:  # Calico/VPP: a tun and a route in table 0
                sw = self.sim.add_interface(f"tun{len(self.pods)}",
                                            f"e0D4of/d-eth0-cni-{uuid.uuid4()}")
                self.sim.routes[ip] = sw
            self.pods[name] = (sw, ip)
        self.api.pod("shop", name, NODE, [ip], annotations)
        return self.pods[name][0]


def link(ns: str, name: str, address: str) -> None:
    """A named host interface holding an address (a veth: this kernel has no dummy)."""
    for cmd in (f"link add {name} type veth peer name {name}p", f"link set {name} up",
                f"link set {name}p up", f"addr add {address} dev {name}"):
        subprocess.run(["ip", "-n", ns, *cmd.split()], check=True)


@contextlib.contextmanager
def lab(version: str, **sim_args):
    prefix = f"vpp{version[:2]}{uuid.uuid4().hex[:4]}"
    node = netlab.up(prefix, 0)
    ns = node.netns
    api = FakeApiServer(ns)
    api.namespace("shop")
    sim = VppSim(f"/tmp/{prefix}-api.sock", version, netns=ns, **sim_args)
    try:
        if sim.old:  # Contiv-VPP: the interconnect vpp1 (host) / tap-vpp2 (VPP), table 0
            collector, source, vrf = "172.30.1.2", "172.30.1.1", 0
            link(ns, "vpp1", f"{collector}/24")
            tap = sim.add_interface("tap0", "tap-vpp2")
            sim.addresses[tap] = [f"{source}/24"]
        else:  # Calico/VPP: the node IP on the host tap, 169.254.0.1 in its VRF
            collector, source, vrf = "10.0.5.10", "169.254.0.1", 5
            link(ns, "uplink0", f"{collector}/24")
            sim.tables[(vrf, False)] = "host-tap-uplink0-ip4"
            sim.add_interface("tap0", "host-uplink0")
        # VPP's own end, where the simulated dataplane sends from
        link(ns, "vppend", f"{source}/32")
        yield Lab(node, api, sim, collector, source, vrf)
        # every request the agent sent had the size the reference gives for that release
        wrong = {(n, size) for n, size in sim.requests if n in SIZES and size != SIZES[n][sim.old]}
        assert not wrong, wrong
    finally:
        sim.stop()
        api.stop()
        netlab.down(prefix)


