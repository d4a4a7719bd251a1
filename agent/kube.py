"""Discover pods: follow this node's pods, all namespaces, this node, every
Service and EndpointSlice (to name Service traffic), and every ReplicaSet and Job
(the second hop from a pod to its Deployment or CronJob) through the API server.

One thread per resource lists, then watches from the list's resourceVersion and,
when a watch ends or drops, resumes from the last version it saw (as client-go's
reflectors do: no relist of the node's pods every few minutes). A 410 Gone (the
history it would resume from was compacted) leads to a fresh list. A 401 reloads
the credentials (projected service-account tokens rotate on disk) and a 403 is
named with its verb and resource; both are counted and retried with backoff. The
agent's poll loop reads a consistent snapshot and reconciles against it in one
place.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)

ANNOTATION = "cniflow.io/export"


@dataclass(frozen=True)
class Pod:
    uid: str
    namespace: str
    name: str
    ips: tuple[str, ...]
    host_network: bool
    annotation: str | None  # the value of cniflow.io/export, if present
    phase: str = "Running"
    created: str = ""  # metadata.creationTimestamp (RFC 3339, UTC: sorts as text)
    owner: tuple[str, str] = ("", "")  # its controller's (kind, name), see owner_of
    labels: tuple[tuple[str, str], ...] = ()  # the --pod-labels ones it has, sorted

    @property
    def owns_addresses(self) -> bool:
        """A pod names its addresses only while it holds them: Pending or Running, with
        an interface of its own. A finished Job pod keeps its podIPs in the API after the
        address was given to another pod."""
        return self.phase in ("Pending", "Running") and not self.host_network


BUILTIN_GROUPS = ("", "apps", "batch")  # owner kinds of these groups keep their bare name


def owner_of(meta: dict) -> tuple[str, str]:
    """The controller among an object's ownerReferences, as (kind, name); a kind of
    another API group is qualified (Rollout.argoproj.io), so it never passes for a
    built-in one. ("", ""): no controller."""
    for ref in meta.get("ownerReferences") or []:
        if ref.get("controller") and ref.get("kind") and ref.get("name"):
            group = str(ref.get("apiVersion") or "").rpartition("/")[0]
            kind = ref["kind"] if group in BUILTIN_GROUPS else f"{ref['kind']}.{group}"
            return kind, ref["name"]
    return "", ""


def pod_from(obj: dict, label_keys: frozenset[str] = frozenset()) -> Pod:
    """label_keys: the labels kept (--pod-labels); the others are not held at all."""
    meta, spec, status = obj["metadata"], obj.get("spec") or {}, obj.get("status") or {}
    ips = tuple(p["ip"] for p in status.get("podIPs") or [] if p.get("ip"))
    if not ips and status.get("podIP"):
        ips = (status["podIP"],)
    labels = tuple(sorted((k, str(v)) for k, v in (meta.get("labels") or {}).items()
                          if k in label_keys))
    return Pod(meta.get("uid", ""), meta["namespace"], meta["name"], ips,
               bool(spec.get("hostNetwork")), (meta.get("annotations") or {}).get(ANNOTATION),
               status.get("phase") or "Pending", meta.get("creationTimestamp") or "",
               owner_of(meta), labels)


def owned_from(obj: dict) -> tuple[tuple[str, str], tuple[str, str]]:
    """A ReplicaSet or Job: its (namespace, name) and its controller (kind, name); only
    that much is held of each, however many the cluster has."""
    meta = obj["metadata"]
    return (meta["namespace"], meta["name"]), owner_of(meta)


def node_from(obj: dict) -> tuple[str, tuple[str, ...]]:
    """A node's name and addresses (InternalIP, ExternalIP: the ones traffic comes from)."""
    addresses = (obj.get("status") or {}).get("addresses") or []
    return obj["metadata"]["name"], tuple(
        a["address"] for a in addresses if a.get("type") in ("InternalIP", "ExternalIP"))


@dataclass(frozen=True)
class ServicePort:
    name: str  # "" for a Service's only, unnamed port
    protocol: str  # TCP, UDP, SCTP
    port: int
    node_port: int = 0


@dataclass(frozen=True)
class Service:
    namespace: str
    name: str
    addresses: tuple[str, ...]  # clusterIPs, externalIPs, load balancer ingress IPs
    ports: tuple[ServicePort, ...]
    cluster_ips: tuple[str, ...] = ()  # what Antrea's destinationClusterIPv4/v6 carry


def service_from(obj: dict) -> Service:
    meta, spec = obj["metadata"], obj.get("spec") or {}
    ips = spec.get("clusterIPs") or [spec.get("clusterIP")]
    cluster = [ip for ip in ips if ip and ip != "None"]
    ingress = ((obj.get("status") or {}).get("loadBalancer") or {}).get("ingress") or []
    addresses = cluster + list(spec.get("externalIPs") or [])
    # ipMode Proxy: the load balancer proxies to the nodes itself, kube-proxy does not
    # translate that address on the node
    addresses += [i["ip"] for i in ingress if i.get("ip") and i.get("ipMode") != "Proxy"]
    return Service(meta["namespace"], meta["name"], tuple(dict.fromkeys(addresses)), tuple(
        ServicePort(p.get("name") or "", p.get("protocol") or "TCP", int(p["port"]),
                    int(p.get("nodePort") or 0)) for p in spec.get("ports") or []),
        tuple(cluster))


@dataclass(frozen=True)
class Endpoint:
    """A backend pod of a Service, wherever it runs (EndpointSlice targetRef)."""
    addresses: tuple[str, ...]
    namespace: str
    pod: str
    node: str


def endpoints_from(obj: dict) -> tuple[str, str, tuple[Endpoint, ...]]:
    """An EndpointSlice (discovery.k8s.io/v1): its namespace, name and pod endpoints."""
    meta = obj["metadata"]
    eps = tuple(
        Endpoint(tuple(e.get("addresses") or ()), ref.get("namespace") or meta["namespace"],
                 ref.get("name") or "", e.get("nodeName") or "")
        for e in obj.get("endpoints") or []
        if (ref := e.get("targetRef") or {}).get("kind") == "Pod")
    return meta["namespace"], meta["name"], eps


def namespace_from(obj: dict) -> tuple[str, str | None]:
    meta = obj["metadata"]
    return meta["name"], (meta.get("annotations") or {}).get(ANNOTATION)


class Follower(threading.Thread):
    """List and watch one resource into a dict, forever (until stop)."""

    def __init__(self, name: str, list_fn, field_selector: str | None, parse, key,
                 stop: threading.Event, changed: threading.Event, metrics=None,
                 watch_seconds: int = 240, backoff_max: float = 10.0,
                 reauth=None) -> None:
        super().__init__(name=f"follow-{name}", daemon=True)
        self.kind, self.list_fn, self.field_selector = name, list_fn, field_selector
        self.parse, self.key = parse, key
        self.stop_event, self.changed, self.metrics = stop, changed, metrics
        self.watch_seconds, self.backoff_max = watch_seconds, backoff_max
        self.items: dict = {}
        self.generation = 0  # bumped at every change, so readers rebuild only then
        self.lock = threading.Lock()
        self.synced = threading.Event()
        self.relists = 0
        self.reauth = reauth  # reloads the credentials after a 401

    def snapshot(self) -> dict:
        with self.lock:
            return dict(self.items)

    def run(self) -> None:
        from kubernetes import client, watch

        backoff, version = 0.5, None
        while not self.stop_event.is_set():
            try:
                if version is None:
                    version = self._list()
                w = watch.Watch()
                kwargs = {"resource_version": version, "timeout_seconds": self.watch_seconds}
                if self.field_selector:
                    kwargs["field_selector"] = self.field_selector
                for event in w.stream(self.list_fn, **kwargs):
                    self._apply(event["type"], event["raw_object"])
                    version = w.resource_version or version
                    backoff = 0.5
                    if self.stop_event.is_set():
                        w.stop()
                # the watch ended (its timeout): resume from the last version seen
            except client.ApiException as e:
                if e.status == 410:
                    log.info("watch expired, relisting", extra={"resource": self.kind})
                    version = None
                    continue
                self._refused(e, backoff)
                backoff = min(backoff * 2, self.backoff_max)
            except Exception as e:  # connection refused, reset, timeouts: resume, or relist
                self._failed(str(e), backoff)
                backoff = min(backoff * 2, self.backoff_max)

    def _refused(self, e, backoff: float) -> None:
        """401: credentials reloaded (a rotated token); 403: the missing right named."""
        if e.status == 401 and self.reauth is not None:
            log.warning("api server refused the credentials (401): reloading them",
                        extra={"resource": self.kind})
            self.reauth()
        elif e.status == 403:
            log.error(f"forbidden (403): the service account may not list and watch "
                      f"{self.kind}; grant get, list and watch on {self.kind} "
                      "(daemonset/base/rbac.yaml)", extra={"resource": self.kind,
                                                       "err": str(e.reason)[:200]})
        else:
            log.warning("api server error", extra={"resource": self.kind, "status": e.status,
                                                   "err": str(e.reason)[:200]})
        if self.metrics:
            self.metrics.api_errors.inc()
        self.stop_event.wait(backoff)

    def _failed(self, err: str, backoff: float) -> None:
        log.warning("api server unreachable", extra={"resource": self.kind, "err": err[:200]})
        if self.metrics:
            self.metrics.api_errors.inc()
        self.stop_event.wait(backoff)

    def _list(self) -> str:
        kwargs = {"_preload_content": False}
        if self.field_selector:
            kwargs["field_selector"] = self.field_selector
        import json

        body = json.loads(self.list_fn(**kwargs).data)
        items = {}
        for obj in body.get("items") or []:
            parsed = self.parse(obj)
            items[self.key(parsed)] = parsed
        with self.lock:
            self.items = items
            self.generation += 1
        self.relists += 1
        self.synced.set()
        self.changed.set()
        return body["metadata"]["resourceVersion"]

    def _apply(self, etype: str, obj: dict) -> None:
        parsed = self.parse(obj)
        with self.lock:
            if etype == "DELETED":
                self.items.pop(self.key(parsed), None)
            elif etype in ("ADDED", "MODIFIED"):
                self.items[self.key(parsed)] = parsed
            self.generation += 1
        self.changed.set()


class Cluster:
    """This node's pods and every namespace, as the API server tells them."""

    def __init__(self, node_name: str, kubeconfig: str = "", metrics=None,
                 label_keys: tuple[str, ...] = ()) -> None:
        self.kubeconfig = kubeconfig
        self.v1, self.discovery, self.apps, self.batch = self._connect()
        self.node_name = node_name
        self.stop_event = threading.Event()
        self.changed = threading.Event()

        def follow(name, method, selector, parse, key, api="v1") -> Follower:
            def list_fn(*args, **kwargs):  # the current client: credentials may reload
                return getattr(getattr(self, api), method)(*args, **kwargs)

            functools.update_wrapper(list_fn, getattr(getattr(self, api), method))  # its type
            return Follower(name, list_fn, selector, parse, key, self.stop_event,
                            self.changed, metrics, reauth=self.reauth)

        self.pods = follow("pods", "list_pod_for_all_namespaces", f"spec.nodeName={node_name}",
                           functools.partial(pod_from, label_keys=frozenset(label_keys)),
                           lambda p: p.uid)
        self.namespaces = follow("namespaces", "list_namespace", None, namespace_from,
                                 lambda n: n[0])
        self.nodes = follow("nodes", "list_node", f"metadata.name={node_name}", node_from,
                            lambda n: n[0])
        self.services = follow("services", "list_service_for_all_namespaces", None,
                               service_from, lambda s: (s.namespace, s.name))
        self.endpointslices = follow("endpointslices", "list_endpoint_slice_for_all_namespaces",
                                     None, endpoints_from, lambda e: e[:2], api="discovery")
        # a pod's owner's owner: ReplicaSet -> Deployment, Job -> CronJob
        self.replicasets = follow("replicasets", "list_replica_set_for_all_namespaces", None,
                                  owned_from, lambda o: o[0], api="apps")
        self.jobs = follow("jobs", "list_job_for_all_namespaces", None, owned_from,
                           lambda o: o[0], api="batch")

    def _connect(self):
        """A client from the kubeconfig, or the in-cluster service account (whose
        projected token is read again), or $KUBECONFIG."""
        from kubernetes import client, config

        if self.kubeconfig:
            config.load_kube_config(self.kubeconfig)
        else:
            try:
                config.load_incluster_config()
            except config.ConfigException:
                config.load_kube_config()  # KUBECONFIG or ~/.kube/config
        return client.CoreV1Api(), client.DiscoveryV1Api(), client.AppsV1Api(), client.BatchV1Api()

    def reauth(self) -> None:
        """Credentials read again (a token rotated on disk); a failure is retried later."""
        try:
            self.v1, self.discovery, self.apps, self.batch = self._connect()
        except Exception as e:  # noqa: BLE001  (a half-written token file, say)
            log.warning("reloading credentials failed", extra={"err": str(e)[:200]})

    def start(self) -> None:
        self.pods.start()
        self.namespaces.start()
        self.nodes.start()
        self.services.start()
        self.endpointslices.start()
        self.replicasets.start()
        self.jobs.start()

    def node_addresses(self) -> tuple[str, ...]:
        """This node's own addresses, as its Node object says."""
        return tuple(a for _, addresses in self.nodes.snapshot().values() for a in addresses)

    def service_objects(self) -> tuple[tuple[int, int], list[Service], list[Endpoint]]:
        """Every Service and every pod endpoint of their EndpointSlices, with a
        generation that changes whenever either does."""
        generation = (self.services.generation, self.endpointslices.generation)
        endpoints = [e for _, _, eps in self.endpointslices.snapshot().values() for e in eps]
        return generation, list(self.services.snapshot().values()), endpoints

    def wait_synced(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        for f in (self.pods, self.namespaces, self.replicasets, self.jobs):
            if not f.synced.wait(max(0.0, deadline - time.monotonic())):
                return False
        return True

    def owners(self) -> tuple[dict, dict]:
        """(namespace, name) -> controller (kind, name) of every ReplicaSet and Job."""
        return dict(self.replicasets.snapshot().values()), dict(self.jobs.snapshot().values())

    def snapshot(self) -> tuple[list[Pod], dict[str, str | None]]:
        return list(self.pods.snapshot().values()), dict(self.namespaces.snapshot().values())

    def stop(self) -> None:
        self.stop_event.set()
