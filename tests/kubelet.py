"""What the kubelet does with the order of a pod's containers, for the tests that run
the DaemonSet's pod by hand (test_daemonset, test_image).

Stopping follows kubelet's pkg/kubelet/kuberuntime/kuberuntime_termination_order.go
(Kubernetes 1.29+, KEP-753): every container gets SIGTERM at once, in parallel; a
sidecar (an init container with restartPolicy Always) waits until every container
and every sidecar listed after it has exited; whatever still runs when the pod's
grace period is over gets SIGTERM, 2 s, then SIGKILL.
"""

from __future__ import annotations

import signal
import subprocess
import time

LAST_CHANCE = 2.0  # the kubelet's fixed grace once the pod's own is spent


def sidecars(spec: dict) -> list[dict]:
    """The init containers that keep running beside the containers, in start order."""
    return [c for c in spec.get("initContainers", []) if c.get("restartPolicy") == "Always"]


def start_order(spec: dict) -> list[str]:
    """The long-running containers' names as the kubelet starts them: sidecars in their
    order (each started before the next init container), then the containers."""
    return [c["name"] for c in sidecars(spec) + spec["containers"]]


def stop(spec: dict, procs: dict[str, subprocess.Popen]) -> dict[str, int | None]:
    """Stops the pod's running processes (by container name) in the kubelet's order;
    their exit codes by name (None: killed at the end of the grace period)."""
    deadline = time.monotonic() + spec.get("terminationGracePeriodSeconds", 30)
    waves = [[c["name"] for c in spec["containers"]]]
    waves += [[c["name"]] for c in reversed(sidecars(spec))]
    codes: dict[str, int | None] = {}
    for wave in waves:
        running = [procs[n] for n in wave if n in procs]
        for p in running:
            p.send_signal(signal.SIGTERM)
        for name, p in ((n, procs[n]) for n in wave if n in procs):
            try:
                codes[name] = p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                codes[name] = None
    late = {n: p for n, p in procs.items() if p.poll() is None}
    for p in late.values():  # still running: its turn came too late, or it did not stop
        p.send_signal(signal.SIGTERM)
    if late:
        time.sleep(LAST_CHANCE)
    for name, p in late.items():
        if p.poll() is None:
            p.kill()
            p.wait()
        else:
            codes[name] = p.returncode
    return codes
