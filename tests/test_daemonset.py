"""The manifests: they render, validate against the API schemas of a current
Kubernetes release (the kubernetes client's models, extra fields forbidden), keep
their promises, and their commands and environment start a working agent."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import kubelet
import pytest
import yaml
from conftest import filters, wait_for
from fakeapi import FakeApiServer
from kubernetes import client

from agent.config import SETTINGS, env_name

ROOT = Path(__file__).resolve().parents[1]
KUBECTL = Path(sys.executable).with_name("kubectl")
MODELS = {
    "Namespace": client.V1Namespace,
    "ServiceAccount": client.V1ServiceAccount,
    "ClusterRole": client.V1ClusterRole,
    "ClusterRoleBinding": client.V1ClusterRoleBinding,
    "Role": client.V1Role,
    "RoleBinding": client.V1RoleBinding,
    "ConfigMap": client.V1ConfigMap,
    "DaemonSet": client.V1DaemonSet,
}


def render(path: Path) -> dict[str, dict]:
    """`kubectl kustomize` of a directory, objects by kind/name."""
    out = subprocess.run([str(KUBECTL), "kustomize", str(path)],
                         capture_output=True, text=True, check=True).stdout
    return {f"{o['kind']}/{o['metadata']['name']}": o for o in yaml.safe_load_all(out)}


def validate(objects: dict[str, dict]) -> None:
    """Every object of a kind the kubernetes client models, against its schema."""
    for obj in objects.values():
        if obj["kind"] in MODELS:
            MODELS[obj["kind"]].model_validate(obj)  # raises on a misspelt or mistyped field


@pytest.fixture(scope="module")
def objects() -> dict[str, dict]:
    return render(ROOT / "daemonset")


def by_kind(objects, kind: str) -> list[dict]:
    return [o for o in objects.values() if o["kind"] == kind]


def test_the_manifests_render_and_validate(objects):
    kinds = sorted(o["kind"] for o in objects.values())
    assert kinds == ["ClusterRole", "ClusterRoleBinding", "ConfigMap", "ConfigMap", "DaemonSet",
                     "Namespace", "PodMonitor", "Role", "RoleBinding", "ServiceAccount"]
    validate(objects)
    pm = by_kind(objects, "PodMonitor")[0]
    assert pm["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(pm["spec"]) == {"selector", "podMetricsEndpoints"}


def test_rbac_asks_only_to_read_pods_namespaces_nodes_services_endpointslices_and_owners(
        objects):
    role = by_kind(objects, "ClusterRole")[0]
    read = ["get", "list", "watch"]
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["pods", "namespaces", "nodes", "services"],
         "verbs": read},
        {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": read},
        {"apiGroups": ["apps"], "resources": ["replicasets"], "verbs": read},
        {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": read}]
    # in its own namespace, its DaemonSet, read at SIGTERM (--handover auto)
    (own,) = by_kind(objects, "Role")
    assert own["metadata"]["namespace"] == "cniflow" and own["rules"] == [
        {"apiGroups": ["apps"], "resources": ["daemonsets"], "verbs": ["get"]}]
    for binding, role in ((by_kind(objects, "ClusterRoleBinding")[0], "ClusterRole"),
                          (by_kind(objects, "RoleBinding")[0], "Role")):
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": role,
                                      "name": "cniflow"}
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "cniflow",
                                        "namespace": "cniflow"}]


def test_capabilities_are_the_listed_ones_and_export_stays_on_the_node(objects):
    ds = by_kind(objects, "DaemonSet")[0]
    pod = ds["spec"]["template"]["spec"]
    agent, collector = containers(objects)["agent"], containers(objects)["collector"]
    assert pod["hostNetwork"] is True  # so 127.0.0.1 is the node's own loopback
    assert agent["securityContext"]["capabilities"] == {
        "drop": ["ALL"], "add": ["BPF", "PERFMON", "NET_ADMIN"]}
    assert collector["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN"]}
    for c in containers(objects).values():  # tests/test_image.py runs them so
        sc = c["securityContext"]
        assert sc["runAsUser"] == 65532 and sc["runAsNonRoot"] is True
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert all(c["securityContext"]["readOnlyRootFilesystem"]
               for c in containers(objects).values())
    config = by_kind(objects, "ConfigMap")
    data = next(c for c in config if c["metadata"]["name"].startswith("cniflow-config"))["data"]
    assert data["CNIFLOW_COLLECTOR"] == "127.0.0.1:4739"
    listen = collector["command"][collector["command"].index("--listen") + 1]
    assert listen == "127.0.0.1:4739"  # the collector is reachable from this node only
    assert pod["tolerations"] == [{"operator": "Exists"}]
    mounts = {m["mountPath"] for m in agent["volumeMounts"]}
    assert {"/sys/fs/bpf", "/sys/kernel/btf"} <= mounts
    assert not mounts & {"/lib/modules", "/usr/src"}  # the image carries its headers
    env = {e["name"]: e for e in agent["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    # its own pod, for --handover auto (the agent's defaults read these two)
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"


def test_the_config_map_holds_every_agent_setting(objects):
    data = next(c for c in by_kind(objects, "ConfigMap")
                if c["metadata"]["name"].startswith("cniflow-config"))["data"]
    assert set(data) == {env_name(f.name) for f in SETTINGS}


def test_the_pod_monitor_scrapes_what_the_containers_serve(objects):
    ports = {p["name"]: (c, p["containerPort"]) for c in containers(objects).values()
             for p in c["ports"]}
    pm = by_kind(objects, "PodMonitor")[0]
    for ep in pm["spec"]["podMetricsEndpoints"]:
        container, port = ports[ep["port"]]
        assert ep["path"] == container["livenessProbe"]["httpGet"]["path"] == "/metrics"
        assert container["livenessProbe"]["httpGet"]["port"] == port
    data = next(c for c in by_kind(objects, "ConfigMap")
                if c["metadata"]["name"].startswith("cniflow-config"))["data"]
    assert data["CNIFLOW_METRICS_ADDRESS"].endswith(f":{ports['metrics'][1]}")
    assert pm["spec"]["selector"]["matchLabels"] == \
        by_kind(objects, "DaemonSet")[0]["spec"]["selector"]["matchLabels"]


def test_the_dashboard_ships_as_a_labelled_config_map_and_queries_real_metrics(objects):
    cm = objects["ConfigMap/cniflow-grafana-dashboard"]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    dash = json.loads(cm["data"]["cniflow.json"])
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    names = set(re.findall(r"\b((?:cniflow|process)_[a-z_]+)", " ".join(exprs)))
    known = metric_names()
    assert names and names <= known, names - known
    assert {v["name"] for v in dash["templating"]["list"]} == {"datasource", "node", "namespace"}


def metric_names() -> set[str]:
    from agent.collector import CollectorMetrics
    from agent.metrics import Metrics

    out = set()
    for registry in (Metrics().registry, CollectorMetrics().registry):
        for family in registry.collect():  # labelled families have no samples yet
            out |= {s.name for s in family.samples} | {family.name, family.name + "_total"}
    return out


def test_the_daemonsets_pod_exports_and_its_last_flows_outlive_a_rollout(objects, node):
    """The containers' commands and environment, as rendered, on a lab node, started and
    stopped in the kubelet's order (tests/kubelet.py), in a rolling update. The
    collector is a sidecar: it starts before the agent and gets SIGTERM only once the
    agent has exited, so the flows the agent exports as it stops (here nothing had timed
    out yet) are written; as a second container it got SIGTERM with the agent and
    could be gone before them. The agent, told its pod by the downward API, finds its
    DaemonSet still there (--handover auto) and leaves its links counting for the
    next agent. The API server is the fake one, reached through KUBECONFIG instead of
    in-cluster; the pins go to a bpffs of the test's own (`ip netns exec` hides
    /sys/fs/bpf)."""
    from conftest import own_bpffs, tcx_programs

    web, db = node.pods
    spec = by_kind(objects, "DaemonSet")[0]["spec"]["template"]["spec"]
    assert kubelet.start_order(spec) == ["collector", "agent"]
    pod = containers(objects)
    config = next(c for c in by_kind(objects, "ConfigMap")
                  if c["metadata"]["name"].startswith("cniflow-config"))["data"]
    api = FakeApiServer(node.netns)
    me = api.agent_pod("node-a")
    api.namespace("shop", {"cniflow.io/export": "true"})
    api.pod("shop", "web", "node-a", [web.ipv4])
    api.pod("shop", "db", "node-a", [db.ipv4])
    records = Path(f"/tmp/{node.prefix}-records")
    records.mkdir(exist_ok=True)
    bin_dir = str(Path(sys.executable).parent)
    base = {"PATH": f"{bin_dir}:/usr/sbin:/usr/bin:/sbin:/bin"}
    with own_bpffs(f"{node.prefix}-pins") as bpffs:
        env = {"agent": {**base, **config, **kubelet.downward(pod["agent"], me, "node-a"),
                         "CNIFLOW_PIN_PATH": str(bpffs / "cniflow"),
                         "KUBECONFIG": str(api.kubeconfig(records / "kubeconfig"))},
               "collector": {**base, **{e["name"]: e["value"]
                                        for e in pod["collector"]["env"]}}}
        assert pod["agent"]["command"] == ["cniflow", "agent"]
        procs = {}
        for name in kubelet.start_order(spec):
            cmd = [a.replace("/var/log/cniflow", str(records)) for a in pod[name]["command"]]
            procs[name] = subprocess.Popen(["ip", "netns", "exec", node.netns, *cmd],
                                           env=env[name],
                                           stderr=(records / f"{name}.log").open("w"))
        try:
            assert wait_for(lambda: "cniflow_ingress" in filters(node, web.host_if), 30), \
                (records / "agent.log").read_text()
            subprocess.run(node.in_pod(0, f"ping -c 3 -i 0.2 -q {db.ipv4}").split(),
                           stdout=subprocess.DEVNULL)
        finally:
            codes = kubelet.stop(spec, procs)
            api.stop()
        log = (records / "agent.log").read_text()
        assert codes == {"agent": 0, "collector": 0}, log
        assert "handing over to the next agent" in log, log
        assert "cniflow_ingress" in tcx_programs(node.netns, web.host_if)  # still counting
    assert "not delivered" not in log
    rows = [json.loads(line) for line in (records / "records.jsonl").read_text().splitlines()]
    echo = [r for r in rows if r.get("icmpTypeCodeIPv4") == 0x0800
            and r.get("interfaceName") == web.host_if]
    assert [(r["sourcePodName"], r["destinationPodName"], r["packetDeltaCount"],
             r["flowEndReason"]) for r in echo] == [("web", "db", 3, 4)]


def test_prometheus_scrapes_a_real_agent_and_every_panel_has_data(node, objects, tmp_path):
    """Debian's Prometheus scrapes the agent and the collector (labels as the PodMonitor
    gives them: node, container); each dashboard query returns series. web pings db
    and sends datagrams to db's Service (kube-proxy-like DNAT in the node), for the
    Service panel."""
    from urllib.parse import quote

    from test_collector import RunningCollector
    from test_kubernetes import k8s_agent
    from test_metering import pin_neighbours
    from test_services import kube_proxy

    web, db = node.pods
    api = FakeApiServer(node.netns)
    api.namespace("shop", {"cniflow.io/export": "true"})
    api.pod("shop", "web", "node-a", [web.ipv4])
    api.pod("shop", "db", "node-a", [db.ipv4])
    api.service("shop", "db", "10.96.0.10", [("sql", "UDP", 80, 8080)])
    api.endpoint_slice("shop", "db", [("sql", "UDP", 8080)], [(db.ipv4, "db", "node-a")])
    kube_proxy(node, "db", "10.96.0.10", 80, db.ipv4, 8080)
    pin_neighbours(node, 0)  # the ClusterIP is routed nowhere: web sends it to the node
    collector = RunningCollector(node.netns, 4739)
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [
            {"job_name": name, "static_configs": [{"targets": [f"127.0.0.1:{port}"],
                                                   "labels": {"node": "node-a",
                                                              "container": name}}]}
            for name, port in (("agent", 9477), ("collector", 9478))]}))
    prom = subprocess.Popen(
        ["ip", "netns", "exec", node.netns, "prometheus",
         f"--config.file={tmp_path / 'prometheus.yml'}",
         f"--storage.tsdb.path={tmp_path / 'data'}", "--web.listen-address=127.0.0.1:9090"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def query(expr: str) -> list:
        out = subprocess.run(node.exec(
            f"curl -s 127.0.0.1:9090/api/v1/query?query={quote(expr)}").split(),
            capture_output=True, text=True).stdout
        return json.loads(out)["data"]["result"] if out else []

    dash = json.loads(objects["ConfigMap/cniflow-grafana-dashboard"]["data"]["cniflow.json"])
    exprs = {p["title"]: t["expr"].replace("$node", ".*").replace("$namespace", ".*")
             for p in dash["panels"] for t in p["targets"]}
    try:
        with k8s_agent(node, api, "--idle-timeout", "1", "--active-timeout", "2"):
            assert wait_for(lambda: "cniflow_ingress" in filters(node, web.host_if), 20)
            pinger = subprocess.Popen(node.in_pod(0, f"ping -i 0.2 {db.ipv4}").split(),
                                      stdout=subprocess.DEVNULL)
            client = subprocess.Popen(node.in_pod(0, "python3 -c").split() + [
                "import socket,time\ns=socket.socket(2,2)\nwhile 1:\n"
                " s.sendto(b'q',('10.96.0.10',80));time.sleep(0.2)"])
            try:
                deadline = time.time() + 40
                while time.time() < deadline:
                    empty = [t for t, e in exprs.items() if not query(e)]
                    if not empty:
                        break
                    time.sleep(2)
            finally:
                pinger.terminate()
                client.terminate()
        assert empty == [], (empty, query("up"), query("cniflow_collector_messages_total"))
    finally:
        prom.terminate()
        prom.wait(20)
        collector.stop()
        api.stop()


def containers(objects) -> dict[str, dict]:
    """The pod's long-running containers by name, as the kubelet starts them: sidecars
    (the collector), then containers."""
    spec = by_kind(objects, "DaemonSet")[0]["spec"]["template"]["spec"]
    return {c["name"]: c for c in kubelet.sidecars(spec) + spec["containers"]}


def test_the_collector_overlay_swaps_in_the_collector_users_already_run(objects):
    over = render(ROOT / "daemonset" / "overlays" / "collector")
    validate(over)
    assert list(containers(over)) == ["agent"]
    env = {e["name"]: e.get("value") for e in containers(over)["agent"]["env"]}
    assert env["CNIFLOW_COLLECTOR"] == "127.0.0.1:2055"  # env wins over the ConfigMap's
    ports = [e["port"] for e in by_kind(over, "PodMonitor")[0]["spec"]["podMetricsEndpoints"]]
    assert ports == ["metrics"]  # nothing scrapes a collector that is not there
    # and nothing else changed: the agent container is the base's but for that variable
    base_agent = containers(objects)["agent"]
    assert {k: v for k, v in containers(over)["agent"].items() if k != "env"} == {
        k: v for k, v in base_agent.items() if k != "env"}
    readme = (ROOT / "README.md").read_text()
    shown = readme.split("# daemonset/overlays/collector/kustomization.yaml\n", 1)[1]
    assert shown.split("```")[0] == (ROOT / "daemonset/overlays/collector/kustomization.yaml"
                                     ).read_text().split("\n", 4)[4]  # the README shows it


@pytest.mark.parametrize("path", ["", "overlays/collector", "overlays/minimal",
                                  "overlays/kafka", "overlays/legacy-seccomp",
                                  "overlays/pod-side"])
def test_every_overlay_makes_the_directories_theirs_before_anything_writes_them(path):
    """The kubelet runs init containers in their order, a sidecar's turn included: owner
    (root, CHOWN) first, or the collector cannot open its file on a fresh node. A
    strategic merge patch of initContainers puts its own items first: the kafka
    overlay's names owner as well."""
    spec = by_kind(render(ROOT / "daemonset" / path), "DaemonSet")[0]["spec"]["template"][
        "spec"]
    names = [c["name"] for c in spec["initContainers"]]
    assert names == ["owner"] + [c["name"] for c in kubelet.sidecars(spec)]
    assert names[1:] == ([] if path == "overlays/collector" else ["collector"])
    assert all(c.get("image") == spec["containers"][0]["image"]
               for c in spec["initContainers"])


def test_the_minimal_overlay_drops_what_needs_the_prometheus_operator_or_grafana(objects):
    over = render(ROOT / "daemonset" / "overlays" / "minimal")
    validate(over)
    assert set(objects) - set(over) == {"PodMonitor/cniflow",
                                        "ConfigMap/cniflow-grafana-dashboard"}
    assert all(over[k] == objects[k] for k in over)  # the rest is the base, unchanged


def test_the_kafka_overlay_points_the_collector_at_kafka(objects):
    from agent.cli import parser
    from agent.config import COLLECTOR_PREFIX, CollectorConfig, collector_from_sources

    over = render(ROOT / "daemonset" / "overlays" / "kafka")
    validate(over)
    collector = containers(over)["collector"]
    cmd = collector["command"]
    assert cmd[:2] == ["cniflow", "collector"]
    env = {e["name"]: e["value"] for e in collector["env"] if e["name"].startswith(
        COLLECTOR_PREFIX)}
    cfg = collector_from_sources(parser().parse_args(cmd[1:]), env)  # what the pod will run
    assert cfg.output == ["/var/log/cniflow/records.jsonl",
                          "kafka://kafka-0.kafka.kafka.svc:9092,kafka-1.kafka.kafka.svc:9092"
                          "/cniflow-flows"]
    assert (cfg.kafka_compression, cfg.kafka_queue) == ("zstd", 100_000)
    assert cfg.kafka_settings()["queue.buffering.max.kbytes"] == 128 << 10
    # the queue (128 MiB at most) fits the limit with room for the process itself
    limit = collector["resources"]["limits"]["memory"]
    assert limit == "512Mi" and containers(objects)["collector"]["resources"]["limits"][
        "memory"] == "256Mi"
    assert {k: v for k, v in collector.items() if k not in ("command", "env", "resources")} == {
        k: v for k, v in containers(objects)["collector"].items()
        if k not in ("command", "env", "resources")}
    assert CollectorConfig().output == ["-"]


def test_the_legacy_seccomp_overlay_unconfines_the_agent_alone(objects):
    """For runtimes whose RuntimeDefault allows bpf() only with CAP_SYS_ADMIN: the agent's
    seccomp profile becomes Unconfined and nothing else changes (no capability added);
    tests/test_image.py meters with it under such a runtime's real profile."""
    over = render(ROOT / "daemonset" / "overlays" / "legacy-seccomp")
    validate(over)
    assert set(over) == set(objects)
    agent, base = containers(over)["agent"], containers(objects)["agent"]
    assert agent["securityContext"]["seccompProfile"] == {"type": "Unconfined"}
    assert base["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert agent["securityContext"]["capabilities"] == base["securityContext"]["capabilities"]
    assert "SYS_ADMIN" not in agent["securityContext"]["capabilities"]["add"]
    strip = lambda c: {**c, "securityContext": {  # noqa: E731
        k: v for k, v in c["securityContext"].items() if k != "seccompProfile"}}
    assert strip(agent) == strip(base)
    ds, base_ds = by_kind(over, "DaemonSet")[0], by_kind(objects, "DaemonSet")[0]
    ds["spec"]["template"]["spec"]["containers"][0] = base_ds["spec"]["template"]["spec"][
        "containers"][0]
    assert over == objects  # the collector and init container keep RuntimeDefault


def test_the_pod_side_overlay_grants_what_entering_the_pods_needs_and_nothing_else(objects):
    """--pod-side on and CAP_SYS_ADMIN added (setns into the pods' namespaces, named
    under /run/netns, which the base mounts); the rest is the base. The agent's settings as the
    pod will read them turn it on (tests/test_image.py runs the image with it)."""
    from agent.cli import parser
    from agent.config import from_sources

    over = render(ROOT / "daemonset" / "overlays" / "pod-side")
    validate(over)
    agent, base = containers(over)["agent"], containers(objects)["agent"]
    assert agent["securityContext"]["capabilities"]["add"] == [
        *base["securityContext"]["capabilities"]["add"], "SYS_ADMIN"]
    env = {e["name"]: e.get("value") for e in agent["env"]}
    config = next(c for c in by_kind(over, "ConfigMap")
                  if c["metadata"]["name"].startswith("cniflow-config"))["data"]
    cfg = from_sources(parser().parse_args(["agent"]), {**config, **env, "NODE_NAME": "n"})
    assert cfg.pod_side and cfg.kubernetes
    assert not from_sources(parser().parse_args(["agent"]), {**config, "NODE_NAME": "n"}
                            ).pod_side
    assert "/run/netns" in {m["mountPath"] for m in agent["volumeMounts"]}
    ds, base_ds = by_kind(over, "DaemonSet")[0], by_kind(objects, "DaemonSet")[0]
    strip = lambda c: {**c, "env": [e for e in c["env"] if e["name"] != "CNIFLOW_POD_SIDE"],  # noqa: E731
                       "securityContext": {**c["securityContext"], "capabilities": {
                           **c["securityContext"]["capabilities"], "add": []}}}
    assert strip(agent) == strip(base)
    ds["spec"]["template"]["spec"]["containers"][0] = base_ds["spec"]["template"]["spec"][
        "containers"][0]
    assert over == objects
