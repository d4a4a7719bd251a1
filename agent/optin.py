"""Which pods are metered: the cniflow.io/export annotation on the pod, else its
namespace's. Pure logic, so the rules are tested without a cluster."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from agent.kube import ANNOTATION, Pod

TRUE, FALSE = "true", "false"


@dataclass(frozen=True)
class Decision:
    metered: list[Pod]  # opted in and with an interface of their own
    host_network: list[Pod]  # opted in, but they share the node's interfaces
    invalid: list[tuple[str, str]]  # (who, message) for values other than true/false


def decide(pods: Iterable[Pod], namespaces: Mapping[str, str | None]) -> Decision:
    metered, host, invalid = [], [], []
    bad_ns = set()
    for ns, value in namespaces.items():
        if value not in (None, TRUE, FALSE):
            bad_ns.add(ns)
            invalid.append((f"namespace/{ns}",
                            f"annotation {ANNOTATION}={value!r} is not \"true\" or \"false\": "
                            "its pods are not metered unless they opt in themselves"))
    for pod in pods:
        value = pod.annotation
        if value not in (None, TRUE, FALSE):
            invalid.append((f"pod/{pod.namespace}/{pod.name}",
                            f"annotation {ANNOTATION}={value!r} is not \"true\" or \"false\": "
                            "not metered"))
            continue
        opted = value == TRUE or (value is None and namespaces.get(pod.namespace) == TRUE)
        if not opted or pod.phase not in ("Pending", "Running"):  # finished: no interface
            continue
        (host if pod.host_network else metered).append(pod)
    return Decision(metered, host, invalid)
