"""A fake Kubernetes API server: list and watch of pods, namespaces, nodes, Services
(`/api/v1/services`), EndpointSlices (`/apis/discovery.k8s.io/v1/endpointslices`),
ReplicaSets (`/apis/apps/v1/replicasets`), Jobs (`/apis/batch/v1/jobs`) and
DaemonSets over real HTTP, and GET of one object by name (an agent asks for its own
pod, namespace, node and DaemonSet at SIGTERM), with the API server's 404 and 403.

It speaks what the kubernetes client uses: `GET /api/v1/pods` and
`/api/v1/namespaces` with `fieldSelector=spec.nodeName=...`, `watch=true`,
`resourceVersion` and `timeoutSeconds`; watch events as JSON lines; an ERROR
event with code 410 when the asked resourceVersion is older than the history it
keeps. Tests change objects, compact history, drop watch connections or stop
the server altogether. The listening socket can be made inside a network
namespace, so an agent running there reaches it on its own loopback.
"""

from __future__ import annotations

import copy
import json
import re
import socket
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

from netlab import in_netns  # noqa: F401  (the tests' helpers import it from here)


def socket_in_netns(netns: str | None, port: int = 0) -> socket.socket:
    """A listening TCP socket on 127.0.0.1 inside netns."""

    def make():
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen(64)
        return s

    return in_netns(netns, make)


class State:
    """Objects, their resourceVersions and the event history watches replay."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.rv = 100
        self.objects: dict[str, dict[str, dict]] = {k: {} for k in LISTS}
        self.token = "t"  # the bearer token the server accepts (rotated by the tests)
        self.forbidden: set[str] = set()  # resources the service account may not read
        self.history: list[tuple[int, str, str, dict]] = []  # (rv, kind, type, object)
        self.oldest = self.rv  # watches from an older version get 410 Gone
        self.epoch = 0  # bumped to drop every open watch
        self.connections: set[socket.socket] = set()  # open ones, kept alive between requests
        self.delay = 0.0  # seconds before each answer: a server too busy to answer in time

    def put(self, kind: str, obj: dict) -> dict:
        with self.cond:
            self.rv += 1
            obj = copy.deepcopy(obj)
            obj["metadata"]["resourceVersion"] = str(self.rv)
            key = self._key(obj)
            etype = "MODIFIED" if key in self.objects[kind] else "ADDED"
            self.objects[kind][key] = obj
            self.history.append((self.rv, kind, etype, obj))
            self.cond.notify_all()
            return obj

    def delete(self, kind: str, namespace: str | None, name: str) -> None:
        with self.cond:
            key = _name_key(namespace, name)
            obj = self.objects[kind].pop(key)
            self.rv += 1
            obj = copy.deepcopy(obj)
            obj["metadata"]["resourceVersion"] = str(self.rv)
            self.history.append((self.rv, kind, "DELETED", obj))
            self.cond.notify_all()

    def compact(self) -> None:
        """Forget history: watches resuming from before now get 410 Gone."""
        with self.cond:
            self.oldest = self.rv
            self.history.clear()

    def drop_watches(self) -> None:
        with self.cond:
            self.epoch += 1
            self.cond.notify_all()

    @staticmethod
    def _key(obj: dict) -> str:
        return _name_key(obj["metadata"].get("namespace"), obj["metadata"]["name"])


def _field(obj: dict, path: str):
    """A fieldSelector's field of an object: spec.nodeName, metadata.name."""
    for part in path.split("."):
        obj = (obj or {}).get(part)
    return obj


LISTS = {"pods": "PodList", "namespaces": "NamespaceList", "nodes": "NodeList",
         "services": "ServiceList", "endpointslices": "EndpointSliceList",
         "replicasets": "ReplicaSetList", "jobs": "JobList", "daemonsets": "DaemonSetList"}
# the API group of each kind ("": core)
GROUPS = {"endpointslices": "discovery.k8s.io", "replicasets": "apps", "jobs": "batch",
          "daemonsets": "apps"}
KINDS = {"pods": "Pod", "namespaces": "Namespace", "nodes": "Node", "services": "Service",
         "endpointslices": "EndpointSlice", "replicasets": "ReplicaSet", "jobs": "Job",
         "daemonsets": "DaemonSet"}
NAMESPACED = {"pods", "services", "endpointslices", "replicasets", "jobs", "daemonsets"}
# one object: /api/v1/nodes/NAME, /api/v1/namespaces/NS/pods/NAME,
# /apis/GROUP/v1/namespaces/NS/KIND/NAME (/api/v1/namespaces/NAME: a namespace)
ONE = re.compile(r"^/api(?:s/(?P<group>[^/]+))?/v1/(?:namespaces/(?P<ns>[^/]+)/)?"
                 r"(?P<kind>[a-z]+)/(?P<name>[^/]+)$")


# the API server's answers to a request without the token, and to a path it does not serve
UNAUTHORIZED = {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                "message": "Unauthorized", "reason": "Unauthorized", "code": 401}
NO_SUCH_PATH = {"kind": "Status", "code": 404, "reason": "NotFound"}


def _name_key(namespace: str | None, name: str) -> str:
    """How State keeps an object: namespace/name, or the name of a cluster-wide one."""
    return f"{namespace}/{name}" if namespace else name


def _api_version(kind: str) -> str:
    return f"{GROUPS[kind]}/v1" if kind in GROUPS else "v1"


def _selected(obj: dict, selector) -> bool:
    return selector is None or _field(obj, selector[0]) == selector[1]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # watches stream chunked, as the real API server does
    state: State

    def log_message(self, *args) -> None:
        pass

    def setup(self) -> None:
        super().setup()
        with self.state.cond:
            self.state.connections.add(self.connection)

    def finish(self) -> None:
        with self.state.cond:
            self.state.connections.discard(self.connection)
        super().finish()

    def do_GET(self) -> None:  # noqa: N802
        time.sleep(self.state.delay)
        url = urlparse(self.path)
        one = ONE.match(url.path)
        if one:
            return self._one(one["group"] or "", one["ns"], one["kind"], one["name"])
        kind = url.path.rpartition("/")[2]
        if kind not in LISTS or url.path != f"/api{'s' if kind in GROUPS else ''}/" \
                f"{_api_version(kind)}/{kind}":
            return self._json(404, NO_SUCH_PATH)
        if self.headers.get("Authorization") != f"Bearer {self.state.token}":
            return self._json(401, UNAUTHORIZED)
        if kind in self.state.forbidden:  # as the API server words it
            return self._json(403, {
                "kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 403,
                "reason": "Forbidden", "details": {"kind": kind},
                "message": f'{kind} is forbidden: User "system:serviceaccount:cniflow:cniflow" '
                           f'cannot list resource "{kind}" in API group '
                           f'"{GROUPS.get(kind, "")}" at the cluster scope'})
        q = {k: v[-1] for k, v in parse_qs(url.query).items()}
        selector = None  # (field, value): spec.nodeName for pods, metadata.name for nodes
        if "=" in q.get("fieldSelector", ""):
            selector = tuple(q["fieldSelector"].split("=", 1))
        if q.get("watch") in ("true", "1"):
            return self._watch(kind, selector, int(q.get("resourceVersion") or 0),
                               float(q.get("timeoutSeconds") or 300))
        st = self.state
        with st.cond:
            items = [o for o in st.objects[kind].values() if _selected(o, selector)]
            body = {"kind": LISTS[kind], "apiVersion": _api_version(kind),
                    "metadata": {"resourceVersion": str(st.rv)}, "items": items}
        self._json(200, body)

    def _one(self, group: str, namespace: str | None, kind: str, name: str) -> None:
        """GET of one object, and the API server's answers when it cannot be read."""
        if self.headers.get("Authorization") != f"Bearer {self.state.token}":
            return self._json(401, UNAUTHORIZED)
        if kind not in LISTS or GROUPS.get(kind, "") != group or \
                (namespace is not None) != (kind in NAMESPACED):
            return self._json(404, NO_SUCH_PATH)
        resource = f"{kind}.{group}" if group else kind
        if kind in self.state.forbidden:
            where = f'in the namespace "{namespace}"' if namespace else "at the cluster scope"
            return self._json(403, {
                "kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 403,
                "reason": "Forbidden", "details": {"name": name, "group": group, "kind": kind},
                "message": f'{resource} "{name}" is forbidden: User '
                           f'"system:serviceaccount:cniflow:cniflow" cannot get resource '
                           f'"{kind}" in API group "{group}" {where}'})
        with self.state.cond:
            obj = self.state.objects[kind].get(_name_key(namespace, name))
        if obj is None:
            return self._json(404, {
                "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": f'{resource} "{name}" not found', "reason": "NotFound",
                "details": {"name": name, "group": group, "kind": kind}, "code": 404})
        self._json(200, {"apiVersion": _api_version(kind), "kind": KINDS[kind], **obj})

    def _json(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _watch(self, kind: str, selector, since: int, timeout: float) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.close_connection = True
        try:
            if self._stream(kind, selector, since, timeout):
                self.wfile.write(b"0\r\n\r\n")  # the watch ends cleanly
            else:  # dropped: cut the connection mid-stream, no closing chunk
                self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _stream(self, kind: str, selector, since: int, timeout: float) -> bool:
        """Events after `since` until the timeout (True) or until dropped (False)."""
        st = self.state
        deadline = time.time() + timeout
        with st.cond:
            epoch = st.epoch
            if since < st.oldest:
                gone = {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                        "message": f"too old resource version: {since} ({st.oldest})",
                        "reason": "Expired", "code": 410}
                self._line({"type": "ERROR", "object": gone})
                return True
        sent = since
        while time.time() < deadline:
            with st.cond:
                pending = [e for e in st.history if e[0] > sent and e[1] == kind]
                if not pending:
                    st.cond.wait(min(0.5, max(0.0, deadline - time.time())))
                    if st.epoch != epoch:
                        return False  # the client must resume or relist
                    continue
            for rv, _, etype, obj in pending:
                sent = rv
                if not _selected(obj, selector):
                    continue
                # watch events carry the object's kind and apiVersion; list items do not
                self._line({"type": etype, "object": {
                    "kind": KINDS[kind], "apiVersion": _api_version(kind), **obj}})
        return True

    def _line(self, event: dict) -> None:
        data = json.dumps(event).encode() + b"\n"
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()


class FakeApiServer:
    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns
        self.state = State()
        self._sock = socket_in_netns(netns)
        self.port = self._sock.getsockname()[1]
        self._server: ThreadingHTTPServer | None = None
        self.start()

    def start(self) -> None:
        handler = type("BoundHandler", (Handler,), {"state": self.state})
        server = ThreadingHTTPServer(("127.0.0.1", self.port), handler, bind_and_activate=False)
        server.socket.close()
        server.socket = self._sock if self._sock.fileno() >= 0 else socket_in_netns(
            self.netns, self.port)
        self._sock = server.socket
        server.daemon_threads = True
        self._server = server
        threading.Thread(target=server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        """The API server goes away: listener closed, watches dropped, and the
        connections clients keep alive between requests cut, as a process that exits
        has them reset (else a client's next request would still be served)."""
        if self._server:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        self.state.drop_watches()
        with self.state.cond:
            open_ = list(self.state.connections)
        for conn in open_:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def kubeconfig(self, path: Path, token_file: Path | None = None) -> Path:
        """A kubeconfig with the server's token, or pointing at a token file (as a
        projected service-account token, which the kubelet rotates on disk)."""
        user = {"tokenFile": str(token_file)} if token_file else {"token": self.state.token}
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": f"http://127.0.0.1:{self.port}"}}],
            "users": [{"name": "fake", "user": user}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
        }))
        return path

    # objects, the way the tests speak of them

    def namespace(self, name: str, annotations: dict | None = None) -> dict:
        return self.state.put("namespaces", {"metadata": {
            "name": name, "uid": str(uuid.uuid4()), "annotations": annotations or {}}})

    def pod(self, namespace: str, name: str, node: str, ips: list[str],
            annotations: dict | None = None, host_network: bool = False,
            uid: str | None = None, phase: str = "Running", created: str = "") -> dict:
        """created: metadata.creationTimestamp (RFC 3339, seconds, as the API server
        writes it); default: now, or what the pod already had."""
        existing = self.state.objects["pods"].get(f"{namespace}/{name}")
        uid = uid or (existing["metadata"]["uid"] if existing else str(uuid.uuid4()))
        created = created or (existing["metadata"]["creationTimestamp"] if existing else
                              time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        return self.state.put("pods", {
            "metadata": {"name": name, "namespace": namespace, "uid": uid,
                         "annotations": annotations or {}, "creationTimestamp": created},
            "spec": {"nodeName": node, "hostNetwork": host_network,
                     "containers": [{"name": "app", "image": "registry.invalid/app:1"}]},
            "status": {"phase": phase, "podIP": ips[0] if ips else None,
                       "podIPs": [{"ip": ip} for ip in ips]},
        })

    def node(self, name: str, addresses: list[str]) -> dict:
        """A Node with its InternalIP addresses (the agent reads its own node's)."""
        return self.state.put("nodes", {
            "metadata": {"name": name, "uid": str(uuid.uuid4())},
            "status": {"addresses": [{"type": "InternalIP", "address": a} for a in addresses]
                       + [{"type": "Hostname", "address": name}]},
        })

    def owned_pod(self, namespace: str, name: str, node: str, ips: list[str],
                  owner: tuple[str, str, dict], labels: dict | None = None, **kw) -> dict:
        """A pod a controller made: its ownerReference (owner: the controller's
        apiVersion, kind and object as this server stores it) and labels."""
        self.pod(namespace, name, node, ips, **kw)
        with self.state.cond:
            obj = copy.deepcopy(self.state.objects["pods"][f"{namespace}/{name}"])
        obj["metadata"]["ownerReferences"] = [_reference(*owner)]
        obj["metadata"]["labels"] = labels or {}
        return self.state.put("pods", obj)

    def replica_set(self, namespace: str, deployment: str, template_hash: str) -> dict:
        """The ReplicaSet a Deployment rolls out: named deployment-hash, owned by it."""
        return self.state.put("replicasets", {
            "metadata": {"name": f"{deployment}-{template_hash}", "namespace": namespace,
                         "uid": str(uuid.uuid4()), "creationTimestamp": _now(),
                         "labels": {"pod-template-hash": template_hash},
                         "ownerReferences": [_reference("apps/v1", "Deployment", {
                             "metadata": {"name": deployment, "uid": str(uuid.uuid4())}})]},
            "spec": {"replicas": 1, "selector": {"matchLabels": {
                "pod-template-hash": template_hash}}},
            "status": {"replicas": 1}})

    def job(self, namespace: str, name: str, cronjob: str | None = None) -> dict:
        """A Job, made by a CronJob (named cronjob-<scheduled minute>) or by hand."""
        meta = {"name": name, "namespace": namespace, "uid": str(uuid.uuid4()),
                "creationTimestamp": _now()}
        if cronjob:
            meta["ownerReferences"] = [_reference("batch/v1", "CronJob", {
                "metadata": {"name": cronjob, "uid": str(uuid.uuid4())}})]
        return self.state.put("jobs", {"metadata": meta, "spec": {
            "completions": 1, "parallelism": 1, "backoffLimit": 6}, "status": {"active": 1}})

    def delete_pod(self, namespace: str, name: str) -> None:
        self.state.delete("pods", namespace, name)

    def daemon_set(self, namespace: str, name: str, node_selector: dict | None = None,
                   **template: list | dict) -> dict:
        """A DaemonSet as the API server stores it (the fields read of it); template:
        more of its pod template's spec (tolerations, affinity, hostNetwork)."""
        return self.state.put("daemonsets", {
            "metadata": {"name": name, "namespace": namespace, "uid": str(uuid.uuid4()),
                         "creationTimestamp": _now(), "generation": 1},
            "spec": {"selector": {"matchLabels": {"app.kubernetes.io/name": name}},
                     "template": {"metadata": {"labels": {"app.kubernetes.io/name": name}},
                                  "spec": {**({"nodeSelector": node_selector}
                                              if node_selector else {}), **template,
                                           "containers": [{"name": "agent",
                                                           "image": "cniflow:0.1.0"}]}}},
            "status": {"currentNumberScheduled": 1, "desiredNumberScheduled": 1,
                       "numberMisscheduled": 0, "numberReady": 1}})

    def agent_pod(self, node: str, namespace: str = "cniflow",
                  name: str = "cniflow-7xk2q") -> dict:
        """cniflow's own pod as its DaemonSet makes it on node (hostNetwork, owned by
        DaemonSet cniflow), with its namespace, the DaemonSet and the Node; returns the
        pod's {namespace, name} (what the downward API gives the agent)."""
        self.namespace(namespace)
        ds = self.daemon_set(namespace, "cniflow")
        self.owned_pod(namespace, name, node, [], ("apps/v1", "DaemonSet", ds),
                       host_network=True)
        self.node(node, [])
        return {"namespace": namespace, "name": name}

    def deleting(self, kind: str, namespace: str | None, name: str) -> dict:
        """An object being deleted: what a DELETE leaves while finalizers or foreground
        deletion hold it (a namespace: phase Terminating until its content is gone)."""
        key = _name_key(namespace, name)
        with self.state.cond:
            obj = copy.deepcopy(self.state.objects[kind][key])
        obj["metadata"]["deletionTimestamp"] = _now()
        obj["metadata"]["deletionGracePeriodSeconds"] = 0
        if kind == "namespaces":
            obj.setdefault("spec", {})["finalizers"] = ["kubernetes"]
            obj["status"] = {"phase": "Terminating"}
        else:
            obj["metadata"]["finalizers"] = ["foregroundDeletion"]
        return self.state.put(kind, obj)

    def service(self, namespace: str, name: str, cluster_ip: str,
                ports: list[tuple[str, str, int, int]], node_ports: dict[str, int] | None = None,
                external_ips: list[str] | None = None,
                load_balancer_ips: list[str] | None = None) -> dict:
        """A Service as the API server stores it; ports: (name, protocol, port,
        targetPort); node_ports: port name -> nodePort (type NodePort, or LoadBalancer
        with load_balancer_ips: the addresses its controller wrote to
        status.loadBalancer.ingress). As the API server defaults them:
        externalTrafficPolicy Cluster for both types, and a LoadBalancer's ports get
        nodePorts (allocateLoadBalancerNodePorts true)."""
        node_ports = node_ports or {}
        family = "IPv6" if ":" in cluster_ip else "IPv4"
        kind = "LoadBalancer" if load_balancer_ips else "NodePort" if node_ports else "ClusterIP"
        spec = {"clusterIP": cluster_ip, "clusterIPs": [cluster_ip], "ipFamilies": [family],
                "ipFamilyPolicy": "SingleStack", "sessionAffinity": "None",
                "internalTrafficPolicy": "Cluster", "type": kind,
                "selector": {"app": name},
                "ports": [{"name": n, "protocol": proto, "port": port, "targetPort": target,
                           **({"nodePort": node_ports[n]} if n in node_ports else {})}
                          for n, proto, port, target in ports]}
        if kind != "ClusterIP":
            spec["externalTrafficPolicy"] = "Cluster"
        if kind == "LoadBalancer":
            spec["allocateLoadBalancerNodePorts"] = True
        if external_ips:
            spec["externalIPs"] = external_ips
        ingress = [{"ip": ip, "ipMode": "VIP"} for ip in load_balancer_ips or ()]
        return self.state.put("services", {
            "metadata": {"name": name, "namespace": namespace, "uid": str(uuid.uuid4()),
                         "creationTimestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                            time.gmtime())},
            "spec": spec, "status": {"loadBalancer": {"ingress": ingress} if ingress else {}}})

    def endpoint_slice(self, namespace: str, service: str,
                       ports: list[tuple[str, str, int]],
                       endpoints: list[tuple[str, str, str]]) -> dict:
        """The EndpointSlice the endpointslice controller writes for a Service: named
        after it with a suffix, labelled kubernetes.io/service-name; ports: (name,
        protocol, port); endpoints: (address, pod name, node name)."""
        family = "IPv6" if endpoints and ":" in endpoints[0][0] else "IPv4"
        return self.state.put("endpointslices", {
            "metadata": {"name": f"{service}-x7k2p", "namespace": namespace,
                         "generateName": f"{service}-", "uid": str(uuid.uuid4()),
                         "labels": {"kubernetes.io/service-name": service,
                                    "endpointslice.kubernetes.io/managed-by":
                                        "endpointslice-controller.k8s.io"},
                         "ownerReferences": [{"apiVersion": "v1", "kind": "Service",
                                              "name": service, "uid": str(uuid.uuid4()),
                                              "controller": True,
                                              "blockOwnerDeletion": True}]},
            "addressType": family,
            "ports": [{"name": n, "protocol": proto, "port": port} for n, proto, port in ports],
            "endpoints": [{"addresses": [ip], "nodeName": node,
                           "conditions": {"ready": True, "serving": True, "terminating": False},
                           "targetRef": {"kind": "Pod", "namespace": namespace, "name": pod,
                                         "uid": str(uuid.uuid4())}}
                          for ip, pod, node in endpoints]})


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _reference(api_version: str, kind: str, owner: dict) -> dict:
    """The controller ownerReference to an object, as controllers set it."""
    return {"apiVersion": api_version, "kind": kind, "name": owner["metadata"]["name"],
            "uid": owner["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}
