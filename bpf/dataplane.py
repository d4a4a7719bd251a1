"""The eBPF dataplane as the pipeline sees it: the host's interfaces, TC filters on
the wanted ones, and the kernel map drained once per poll."""

from __future__ import annotations

import logging

import numpy as np

from agent.config import Config
from agent.interfaces import links
from agent.metrics import Metrics
from bpf.attach import Attacher
from bpf.drain import BatchDrain
from bpf.program import FlowProgram

log = logging.getLogger(__name__)


class EbpfDataplane:
    generation = 0  # Linux ifindexes do not move under the agent
    unique = True  # a drained map never repeats a key
    restart_needed = ""

    def __init__(self, cfg: Config, metrics: Metrics, ipr) -> None:
        self.metrics, self.ipr = metrics, ipr
        self.program = FlowProgram(cfg.map_size)
        self.drainer = BatchDrain(self.program)
        self.attacher = Attacher(self.program, cfg.tc_priority, ipr)
        self.failed: set[int] = set()
        metrics.map_size.set(cfg.map_size)

    @property
    def attached(self) -> set[int]:
        return set(self.attacher.attached)

    def present(self) -> dict[int, str]:
        return links()

    def apply(self, want: dict[int, str], present: dict[int, str]) -> None:
        """Attach what is wanted, detach what is no longer wanted (opt-out), forget
        what vanished (its filters went with it)."""
        for ifindex in list(self.attacher.attached):
            if ifindex not in present:
                self.attacher.forget(ifindex)
                log.info("interface vanished", extra={"ifindex": ifindex})
            elif ifindex not in want:
                self.attacher.detach(ifindex)
        for ifindex, name in want.items():
            if ifindex in self.attacher.attached or ifindex in self.failed:
                continue
            try:
                self.attacher.attach(ifindex, name)
            except Exception as e:  # the interface may vanish between scan and attach
                self.failed.add(ifindex)
                self.metrics.attach_failures.inc()
                log.warning("attach failed", extra={"interface": name, "err": str(e)})
        self.failed &= set(present)
        self.metrics.interfaces_attached.set(len(self.attacher.attached))

    def drain(self) -> np.ndarray:
        batch = self.drainer.drain()
        self.metrics.map_entries.set(len(batch))
        self.metrics.kernel_stats(self.program.stats())
        return batch

    def detach_all(self) -> None:
        self.attacher.detach_all()

    def close(self) -> None:
        self.program.close()
