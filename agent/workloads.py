"""Workloads and selected labels: the names operators think in, for pods whose
own names change with every rollout.

A pod's workload is its controller (ownerReferences), followed one hop further
where Kubernetes puts one controller under another: a ReplicaSet's Deployment, a
Job's CronJob. A pod with no controller is its own workload. Only what the agent
watches is used (ReplicaSets and Jobs, their controller only): an owner not yet
seen names the first hop (ReplicaSet, Job), never a guessed Deployment.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping

from agent.kube import Pod

Owners = Mapping[tuple[str, str], tuple[str, str]]  # (namespace, name) -> (kind, name)
SECOND_HOP = {"ReplicaSet": "Deployment", "Job": "CronJob"}
MAX_LABEL_VALUE = 63  # what the API server accepts for a label value
MAX_LABELS_TEXT = 1024  # octets of one pod's labels JSON


def workload(pod: Pod, replicasets: Owners, jobs: Owners) -> tuple[str, str]:
    """(kind, name) of the pod's workload."""
    kind, name = pod.owner
    if not kind:
        return "Pod", pod.name
    above = SECOND_HOP.get(kind)
    if above is not None:
        up = (replicasets if kind == "ReplicaSet" else jobs).get((pod.namespace, name))
        if up is not None and up[0] == above:
            return up
    return kind, name


def workloads(pods: Iterable[Pod], replicasets: Owners, jobs: Owners) -> dict[str, tuple[str, str]]:
    """uid -> (kind, name), for every pod given."""
    return {p.uid: workload(p, replicasets, jobs) for p in pods}


def labels_text(pod: Pod) -> tuple[str, int]:
    """The pod's selected labels as JSON text (keys sorted, compact, as Antrea writes
    them), and how many were left out: values longer than the API server allows, and
    whatever would take the text over MAX_LABELS_TEXT. A value is never cut (a cut value
    would be a wrong one)."""
    kept: dict[str, str] = {}
    dropped = 0
    size = 2
    for key, value in pod.labels:
        item = len(json.dumps({key: value}, separators=(",", ":")).encode()) - 1
        if len(value) > MAX_LABEL_VALUE or size + item > MAX_LABELS_TEXT:
            dropped += 1
            continue
        kept[key] = value
        size += item
    return json.dumps(kept, separators=(",", ":"), ensure_ascii=False), dropped
