"""What the kubelet does with the order of a pod's containers, for the tests that run
the DaemonSet's pod by hand (test_daemonset, test_image).

Stopping follows kubelet's pkg/kubelet/kuberuntime/kuberuntime_termination_order.go
(Kubernetes 1.29+, KEP-753): every container gets SIGTERM at once, in parallel, and
SIGKILL when the pod's grace period is over; a sidecar (an init container with
restartPolicy Always) waits until every container and every sidecar listed after it
has exited, or the grace period is over, and then gets SIGTERM and what is left of
the grace period, at least 2 s, before SIGKILL.
"""

from __future__ import annotations

import signal
import subprocess
import time

MIN_GRACE = 2.0  # kuberuntime's minimumGracePeriodInSeconds: a sidecar's at least


def sidecars(spec: dict) -> list[dict]:
    """The init containers that keep running beside the containers, in start order."""
    return [c for c in spec.get("initContainers", []) if c.get("restartPolicy") == "Always"]


def start_order(spec: dict) -> list[str]:
    """The long-running containers' names as the kubelet starts them: sidecars in their
    order (each started before the next init container), then the containers."""
    return [c["name"] for c in sidecars(spec) + spec["containers"]]


def stop(spec: dict, procs: dict[str, subprocess.Popen]) -> dict[str, int | None]:
    """Stops the pod's running processes (by container name) in the kubelet's order;
    their exit codes by name (None: killed). A container gets SIGTERM and, still
    running when the pod's grace period is over, SIGKILL; a sidecar gets SIGTERM when
    its turn comes, or when the grace period is over, and at least MIN_GRACE seconds."""
    deadline = time.monotonic() + spec.get("terminationGracePeriodSeconds", 30)
    codes: dict[str, int | None] = {}

    def ended(name: str, seconds: float) -> None:
        p = procs[name]
        try:
            codes[name] = p.wait(max(0.0, seconds))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            codes[name] = None

    mains = [c["name"] for c in spec["containers"] if c["name"] in procs]
    for name in mains:
        procs[name].send_signal(signal.SIGTERM)
    for name in mains:
        ended(name, deadline - time.monotonic())
    for c in reversed(sidecars(spec)):
        if c["name"] in procs:
            procs[c["name"]].send_signal(signal.SIGTERM)
            ended(c["name"], max(deadline - time.monotonic(), MIN_GRACE))
    return codes


def downward(container: dict, pod: dict, node: str) -> dict[str, str]:
    """The container's environment variables the downward API fills (fieldRef), for
    the pod (namespace, name) on node, as the kubelet resolves them."""
    fields = {"metadata.name": pod["name"], "metadata.namespace": pod["namespace"],
              "spec.nodeName": node}
    return {e["name"]: fields[e["valueFrom"]["fieldRef"]["fieldPath"]]
            for e in container.get("env", []) if "fieldRef" in e.get("valueFrom", {})}
