"""--handover auto: at SIGTERM, whether the DaemonSet of this agent's pod will start
another agent on this node (a rolling update, a deleted pod: leave the links and maps
counting for it) or not (an uninstall, the node leaving the DaemonSet: clean up).

Asked of the API server afresh (a watch may lag the deletion that stops us), with the
DaemonSet controller's own rule for a node (pkg/controller/daemon: nodeSelector and
required node affinity, taints with effect NoSchedule or NoExecute tolerated by the
template's tolerations and those the controller adds to every daemon pod). Any doubt
answers no: what the agent holds is then exported and unpinned, nothing left behind.
"""

from __future__ import annotations

import threading

# the whole question at most (the client retries a silent server): SIGTERM's grace
# period is for exporting
SECONDS = 6.0
# what the DaemonSet controller adds to every daemon pod (AddOrUpdateDaemonPodTolerations)
DAEMON_TOLERATIONS = [
    {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute"},
    {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute"},
    {"key": "node.kubernetes.io/disk-pressure", "operator": "Exists", "effect": "NoSchedule"},
    {"key": "node.kubernetes.io/memory-pressure", "operator": "Exists",
     "effect": "NoSchedule"},
    {"key": "node.kubernetes.io/pid-pressure", "operator": "Exists", "effect": "NoSchedule"},
    {"key": "node.kubernetes.io/unschedulable", "operator": "Exists", "effect": "NoSchedule"},
]
HOST_NETWORK_TOLERATION = {"key": "node.kubernetes.io/network-unavailable",
                           "operator": "Exists", "effect": "NoSchedule"}


def ask(cluster, namespace: str, pod: str) -> tuple[bool, str]:
    """(another agent will come, why), within SECONDS."""
    answer: list[tuple[bool, str]] = []
    asking = threading.Thread(target=lambda: answer.append(_ask(cluster, namespace, pod)),
                              daemon=True)
    asking.start()
    asking.join(SECONDS)
    return answer[0] if answer else (False, "the api server did not answer in time")


def _ask(cluster, namespace: str, pod: str) -> tuple[bool, str]:
    from kubernetes import client

    what, wait = "pod", (2, 3)  # connect, read
    try:
        me = cluster.v1.read_namespaced_pod(pod, namespace, _request_timeout=wait)
        owner = next((o for o in me.metadata.owner_references or ()
                      if o.controller and o.kind == "DaemonSet"), None)
        if owner is None:
            return False, "this pod is not a DaemonSet's"
        what = "namespace"
        if cluster.v1.read_namespace(namespace, _request_timeout=wait).metadata \
                .deletion_timestamp:
            return False, f"namespace {namespace} is being deleted"
        what = "DaemonSet"
        ds = cluster.apps.read_namespaced_daemon_set(owner.name, namespace,
                                                     _request_timeout=wait)
        if ds.metadata.deletion_timestamp:
            return False, f"DaemonSet {owner.name} is being deleted"
        what = "node"
        node = cluster.v1.api_client.sanitize_for_serialization(
            cluster.v1.read_node(cluster.node_name, _request_timeout=wait))
        if node["metadata"].get("deletionTimestamp"):
            return False, f"node {cluster.node_name} is being deleted"
        template = cluster.v1.api_client.sanitize_for_serialization(ds.spec.template.spec)
        unfit = unfit_for(template, node)
        if unfit:
            return False, f"node {cluster.node_name} {unfit}"
        return True, f"DaemonSet {owner.name} will start another agent here"
    except client.ApiException as e:
        if e.status == 404:
            return False, f"the {what} is gone"
        return False, f"reading the {what}: api server error {e.status} {e.reason}"
    except Exception as e:  # noqa: BLE001  (unreachable, timed out)
        return False, f"reading the {what}: {str(e)[:200]}"


def unfit_for(spec: dict, node: dict) -> str | None:
    """Why the DaemonSet controller would not run a pod of this template (the API's
    JSON form) on node, or None."""
    labels = node["metadata"].get("labels") or {}
    if any(labels.get(k) != v for k, v in (spec.get("nodeSelector") or {}).items()):
        return "no longer matches the nodeSelector"
    required = (((spec.get("affinity") or {}).get("nodeAffinity") or {})
                .get("requiredDuringSchedulingIgnoredDuringExecution"))
    if required and not any(_term(t, node) for t in required.get("nodeSelectorTerms") or ()):
        return "no longer matches the required node affinity"
    tolerations = (spec.get("tolerations") or []) + DAEMON_TOLERATIONS + (
        [HOST_NETWORK_TOLERATION] if spec.get("hostNetwork") else [])
    for taint in (node.get("spec") or {}).get("taints") or ():
        if taint.get("effect") in ("NoSchedule", "NoExecute") and not any(
                _tolerates(t, taint) for t in tolerations):
            return f"has a taint the DaemonSet does not tolerate ({taint.get('key')})"
    return None


def _term(term: dict, node: dict) -> bool:
    """A nodeSelectorTerm: its expressions and fields all match (an empty term none)."""
    exprs, fields = term.get("matchExpressions") or [], term.get("matchFields") or []
    labels = node["metadata"].get("labels") or {}
    return bool(exprs or fields) and all(_expr(e, labels) for e in exprs) and all(
        _expr(f, {"metadata.name": node["metadata"]["name"]}) for f in fields)


def _expr(e: dict, labels: dict) -> bool:
    op, key, values = e.get("operator"), e.get("key"), e.get("values") or []
    have = labels.get(key)
    if op == "In":
        return have in values
    if op == "NotIn":
        return have not in values
    if op == "Exists":
        return key in labels
    if op == "DoesNotExist":
        return key not in labels
    if op in ("Gt", "Lt") and have is not None and len(values) == 1:
        try:
            return int(have) > int(values[0]) if op == "Gt" else int(have) < int(values[0])
        except ValueError:
            return False
    return False


def _tolerates(t: dict, taint: dict) -> bool:
    """v1.Toleration.ToleratesTaint."""
    if t.get("effect") and t["effect"] != taint.get("effect"):
        return False
    if t.get("key") and t["key"] != taint.get("key"):
        return False
    if t.get("operator") == "Exists":
        return True
    return t.get("operator") in (None, "", "Equal") and \
        (t.get("value") or "") == (taint.get("value") or "")
