"""Stories of the Kubernetes agent: the real kubernetes client against a fake API
server (real list and watch over HTTP), pods built as namespaces and veths."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import netlab
import oracles
import pytest
from conftest import agent, filters, k8s_agent, wait_for
from fakeapi import FakeApiServer
from test_metering import send_udp

NODE = "node-a"
OPT_IN = {"cniflow.io/export": "true"}
OPT_OUT = {"cniflow.io/export": "false"}


def attached(node, pod) -> bool:
    return "cniflow_ingress" in filters(node, pod.host_if)


@pytest.fixture
def api(node):
    server = FakeApiServer(node.netns)
    yield server
    server.stop()


@pytest.mark.parametrize("layout", ["routed", "bridged"])
def test_a_pod_annotated_after_start_gets_flows_with_its_names_and_exact_counts(layout):
    prefix = f"k8s{layout[0]}"
    node = netlab.up(prefix, 2, layout=layout)
    server = FakeApiServer(node.netns)
    try:
        web, db = node.pods
        server.namespace("shop")
        server.pod("shop", "web-7d9f", NODE, [web.ipv4, web.ipv6])
        server.pod("shop", "db-0", NODE, [db.ipv4, db.ipv6])
        server.pod("shop", "elsewhere", "node-b", ["10.200.0.9"], OPT_IN)  # another node's
        tshark = oracles.Tshark(node.netns, 4739)
        with k8s_agent(node, server, "--idle-timeout", "1") as running:
            time.sleep(1.5)
            assert not attached(node, web) and not attached(node, db)
            server.pod("shop", "web-7d9f", NODE, [web.ipv4, web.ipv6], OPT_IN)
            assert wait_for(lambda: attached(node, web), 5), running.log.read_text()
            assert not attached(node, db)
            send_udp(node, 0, db.ipv4, 9700, count=6, size=100)
            time.sleep(2.5)
            assert running.metrics()["cniflow_pods_opted_in"] == 1
        pcap = tshark.stop()
        records = tshark.pod_records()
        assert tshark.expert() == []
    finally:
        server.stop()
        netlab.down(prefix)
    sent = [r for r in records if r["dport"] == 9700]
    assert sum(r["packets"] for r in sent) == 6 and sum(r["octets"] for r in sent) == 6 * 128
    assert {(r["interface"], r["src_pod_ns"], r["src_pod"], r["dst_pod_ns"], r["dst_pod"],
             r["src_node"], r["dst_node"]) for r in sent} == {
        (web.host_if, "shop", "web-7d9f", "shop", "db-0", NODE, NODE)}
    # every record names the observed pod on its side of the veth: the source of what
    # the veth's ingress saw (the pod sent it, from a link-local address too), the
    # destination on its egress
    for r in records:
        observed = r.get("src_pod") if r["direction"] == "Ingress" else r.get("dst_pod")
        assert observed == "web-7d9f", r
    # pmacct's nfacctd, given the Antrea elements as custom primitives, stores the names
    node2 = netlab.up(prefix + "n", 0)
    try:
        nfacctd = oracles.Nfacctd(node2.netns, 4740, pods=True)
        oracles.replay(pcap, node2.netns, 4740, decode_port=4739)
        rows = [r for r in nfacctd.stop() if r["dport"] == 9700]
    finally:
        netlab.down(prefix + "n")
    assert [(r["src_pod"], r["dst_pod"], r["packets"]) for r in rows] == [("web-7d9f", "db-0", 6)]


def test_removing_the_annotation_detaches_and_stops_the_records(node, api):
    web, db = node.pods
    api.namespace("shop")
    api.pod("shop", "web", NODE, [web.ipv4], OPT_IN)
    tshark = oracles.Tshark(node.netns, 4739)
    with k8s_agent(node, api, "--idle-timeout", "1") as running:
        assert wait_for(lambda: attached(node, web), 10), running.log.read_text()
        send_udp(node, 0, db.ipv4, 9710, count=3, size=10)
        api.pod("shop", "web", NODE, [web.ipv4], {})  # annotation removed
        assert wait_for(lambda: not attached(node, web), 5)
        send_udp(node, 0, db.ipv4, 9711, count=3, size=10)
        time.sleep(2)
    tshark.stop()
    records = tshark.pod_records()
    assert sum(r["packets"] for r in records if r["dport"] == 9710) == 3
    assert not [r for r in records if r["dport"] == 9711]
    assert "clsact" not in subprocess.run(node.exec(f"tc qdisc show dev {web.host_if}").split(),
                                          capture_output=True, text=True).stdout


def test_whether_another_agent_will_come_is_read_from_the_api_server():
    """What --handover auto asks at SIGTERM (agent/successor.py), answered by the
    API server as it answers: objects, deletions in progress, 404 and 403."""
    from agent import successor
    from agent.kube import Cluster

    api = FakeApiServer(None)
    try:
        cluster = Cluster(NODE, str(api.kubeconfig(Path(f"/tmp/succ{os.getpid()}-kc"))))

        def ask() -> tuple[bool, str]:
            return successor.ask(cluster, "cniflow", "cniflow-7xk2q")

        assert ask() == (False, "the pod is gone")
        api.namespace("cniflow")
        api.pod("cniflow", "cniflow-7xk2q", NODE, [], host_network=True)
        assert ask() == (False, "this pod is not a DaemonSet's")
        ds = api.daemon_set("cniflow", "cniflow", {"cniflow.io/flows": "on"})
        api.owned_pod("cniflow", "cniflow-7xk2q", NODE, [], ("apps/v1", "DaemonSet", ds),
                      host_network=True)
        assert ask() == (False, "the node is gone")
        own = api.node(NODE, [])
        assert ask() == (False, f"node {NODE} no longer matches the nodeSelector")
        selected = api.state.put("nodes", {**own, "metadata": {**own["metadata"], "labels": {
            "cniflow.io/flows": "on"}}})
        assert ask() == (True, "DaemonSet cniflow will start another agent here")
        # taints: the DaemonSet controller's rule, its own tolerations added
        for taint, tolerations, yes in (
                ({"key": "dedicated", "value": "infra", "effect": "NoSchedule"}, [], False),
                ({"key": "dedicated", "value": "infra", "effect": "PreferNoSchedule"}, [], True),
                ({"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"}, [], True),
                ({"key": "dedicated", "value": "infra", "effect": "NoExecute"},
                 [{"key": "dedicated", "operator": "Equal", "value": "infra"}], True),
                ({"key": "dedicated", "value": "gpu", "effect": "NoExecute"},
                 [{"key": "dedicated", "operator": "Equal", "value": "infra"}], False),
                ({"key": "dedicated", "value": "infra", "effect": "NoSchedule"},
                 [{"operator": "Exists"}], True)):  # the base's: every taint
            api.daemon_set("cniflow", "cniflow", {"cniflow.io/flows": "on"},
                           tolerations=tolerations)
            api.state.put("nodes", {**selected, "spec": {"taints": [taint]}})
            assert ask()[0] is yes, (taint, tolerations, ask())
        api.daemon_set("cniflow", "cniflow", {"cniflow.io/flows": "on"})
        api.state.put("nodes", {**selected, "spec": {"taints": [
            {"key": "dedicated", "value": "infra", "effect": "NoSchedule"}]}})
        assert ask() == (False, f"node {NODE} has a taint the DaemonSet does not tolerate "
                                "(dedicated)")
        api.state.put("nodes", selected)
        for values, yes in ((["on"], True), (["off"], False)):
            api.daemon_set("cniflow", "cniflow", affinity={"nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "cniflow.io/flows", "operator": "In",
                                           "values": values}]}]}}})
            assert ask()[0] is yes
        assert ask()[1] == f"node {NODE} no longer matches the required node affinity"
        api.daemon_set("cniflow", "cniflow", {"cniflow.io/flows": "on"})
        api.deleting("daemonsets", "cniflow", "cniflow")  # foreground: held by a finalizer
        assert ask() == (False, "DaemonSet cniflow is being deleted")
        api.state.delete("daemonsets", "cniflow", "cniflow")  # background: gone at once
        assert ask() == (False, "the DaemonSet is gone")
        api.daemon_set("cniflow", "cniflow", {"cniflow.io/flows": "on"})
        api.state.forbidden.add("daemonsets")  # the Role not applied
        assert ask() == (False, "reading the DaemonSet: api server error 403 Forbidden")
        api.state.forbidden.clear()
        api.deleting("namespaces", None, "cniflow")  # kubectl delete -k daemonset/
        assert ask() == (False, "namespace cniflow is being deleted")
        api.namespace("cniflow")
        api.deleting("nodes", None, NODE)
        assert ask() == (False, f"node {NODE} is being deleted")
        api.state.put("nodes", {**selected, "metadata": {
            k: v for k, v in selected["metadata"].items() if not k.startswith("deletion")}})
        assert ask()[0] is True
        api.state.delay = 3.0  # each answer in time, all of them not
        t0 = time.monotonic()
        assert ask() == (False, "the api server did not answer in time")
        assert time.monotonic() - t0 < successor.SECONDS + 1
        api.state.delay = 0.0
        api.stop()  # unreachable: the client's retries end in an error
        yes, why = ask()
        assert not yes and why.startswith("reading the pod: "), why
    finally:
        api.stop()


def test_handover_auto_leaves_nothing_when_the_daemonset_is_gone(node, api):
    """--handover auto (the DaemonSet's), asked at SIGTERM of the API server: no agent
    will follow (an uninstall: the DaemonSet deleted), so nothing is left, and the
    pending flow is exported, as a forced end. (A rolling update: below.)"""
    from conftest import own_bpffs
    from test_restart import cniflow_links

    web, db = node.pods
    me = api.agent_pod(NODE)
    api.namespace("shop", OPT_IN)
    api.pod("shop", "web", NODE, [web.ipv4])
    tshark = oracles.Tshark(node.netns, 4739)
    with own_bpffs(f"{node.prefix}-pins") as fs:
        pins = str(fs / "cniflow")
        with k8s_agent(node, api, "--pin-path", pins, "--pod-name", me["name"],
                       "--pod-namespace", me["namespace"], "--idle-timeout", "60") as running:
            assert wait_for(lambda: attached(node, web), 10), running.log.read_text()
            send_udp(node, 0, db.ipv4, 9712, count=5, size=10)
            api.state.delete("daemonsets", "cniflow", "cniflow")  # background: gone at once
        log = running.log.read_text()
        left = cniflow_links(node, web.host_if)
        assert "no handover" in log and "the DaemonSet is gone" in log, log
        assert left == [] and not os.path.exists(pins), (left, log)
    tshark.stop()
    udp = [r for r in tshark.records() if r["dport"] == 9712]
    assert [(r["packets"], r["end_reason"]) for r in udp] == [(5, 4)], udp


def test_handover_auto_in_a_rolling_update_counts_every_packet_once():
    """--handover auto, as the DaemonSet runs it: at SIGTERM the API server says the
    DaemonSet will start another agent here (a rolling update). The links and maps stay
    and count while no agent runs; the pending flow is exported now (a forced end) and
    the next agent exports what came after: every packet once, no gap."""
    from conftest import own_bpffs

    prefix = f"hao{os.getpid() % 1000}"
    node = netlab.up(prefix, 2)
    api = FakeApiServer(node.netns)
    try:
        with own_bpffs(f"{prefix}-pins") as fs:
            rolling_update(node, api, str(fs / "cniflow"))
    finally:
        api.stop()
        netlab.down(prefix)


def rolling_update(node, api, pins: str) -> None:
    from test_restart import PORT, check_exact, cniflow_links, no_leftovers, run_through

    web, db = node.pods
    me = api.agent_pod(NODE)
    api.namespace("shop", OPT_IN)
    api.pod("shop", "web", NODE, [web.ipv4])
    api.pod("shop", "db", NODE, [db.ipv4])
    kubeconfig = api.kubeconfig(Path(f"/tmp/{node.prefix}-kubeconfig"))

    def rolled(first, _):
        first.proc.send_signal(15)
        assert first.proc.wait(30) == 0
        assert len(cniflow_links(node, web.host_if)) == 2

    r = run_through(node, pins, rolled, (
        "--kubernetes", "--node-name", NODE, "--kubeconfig", str(kubeconfig),
        "--pod-name", me["name"], "--pod-namespace", me["namespace"]), first_interfaces=())
    assert "handing over to the next agent" in r["logs"][0]
    udp = [x for x in r["rows"] if x.get("destinationTransportPort") == PORT]
    assert [x["flowEndReason"] for x in udp] == [4, 4]  # at the handover, at the end
    check_exact(node, r)
    no_leftovers(node, pins)


def test_a_namespace_opts_in_new_pods_and_a_deleted_pod_leaves_nothing(node, api):
    web, db = node.pods
    api.namespace("team", OPT_IN)
    api.pod("team", "web", NODE, [web.ipv4], {})
    api.pod("team", "db", NODE, [db.ipv4], OPT_OUT)  # a pod may opt out of its namespace
    tshark = oracles.Tshark(node.netns, 4739)
    with k8s_agent(node, api, "--idle-timeout", "1") as running:
        assert wait_for(lambda: attached(node, web), 10), running.log.read_text()
        time.sleep(1)
        assert not attached(node, db)
        job = netlab.add_pod(node, netlab.Pod(f"{node.prefix}-pod7", f"{node.prefix}v7",
                                              "10.99.7.2", "fd00:99:7::2"), wait=True)
        node.pods.append(job)
        api.pod("team", "job-1", NODE, [job.ipv4])
        assert wait_for(lambda: attached(node, job), 5), running.log.read_text()
        send_udp(node, 2, web.ipv4, 9720, count=4, size=10)
        time.sleep(1.5)
        api.delete_pod("team", "job-1")  # deleted: its filters go
        assert wait_for(lambda: not attached(node, job), 5)
        netlab.sh(f"ip netns del {job.netns}")  # and then its veth
        node.pods.remove(job)
        time.sleep(2)
        m = running.metrics()
        assert m["cniflow_attach_failures_total"] == 0
        assert m["cniflow_poll_errors_total"] == 0
        assert m["cniflow_interfaces_attached"] == 1
        assert running.proc.poll() is None
    tshark.stop()
    rows = [r for r in tshark.pod_records() if r["dport"] == 9720 and r["interface"] == job.host_if]
    assert [(r["src_pod"], r["dst_pod"], r["packets"]) for r in rows] == [("job-1", "web", 4)]
    log = running.log.read_text()
    assert '"level": "error"' not in log and "Traceback" not in log


def test_the_agent_keeps_metering_while_the_api_server_is_away_and_converges_after(node, api):
    web, db = node.pods
    api.namespace("shop")
    api.pod("shop", "web", NODE, [web.ipv4], OPT_IN)
    api.pod("shop", "db", NODE, [db.ipv4], {})
    tshark = oracles.Tshark(node.netns, 4739)
    with k8s_agent(node, api, "--idle-timeout", "1") as running:
        assert wait_for(lambda: attached(node, web), 10), running.log.read_text()
        api.state.drop_watches()  # a dropped watch: the agent lists again
        api.pod("shop", "db", NODE, [db.ipv4], OPT_IN)
        assert wait_for(lambda: attached(node, db), 10)
        api.stop()  # the API server goes away
        send_udp(node, 0, db.ipv4, 9730, count=5, size=10)
        api.pod("shop", "db", NODE, [db.ipv4], {})  # changed while the agent cannot see
        api.state.compact()  # and the history it would resume from is gone: 410
        time.sleep(2.5)
        assert attached(node, db)
        assert running.metrics()["cniflow_api_errors_total"] > 0
        api.start()
        assert wait_for(lambda: not attached(node, db), 20), running.log.read_text()
        assert attached(node, web)
        # the agent resumed its watch from the version it had seen: the 410 came from
        # the watch (the list never answers 410), and then it listed again
        assert '"msg": "watch expired, relisting"' in running.log.read_text()
    tshark.stop()
    sent = [r for r in tshark.pod_records() if r["dport"] == 9730 and r["interface"] == web.host_if]
    assert sum(r["packets"] for r in sent) == 5 and {r["src_pod"] for r in sent} == {"web"}


def test_a_bad_annotation_value_warns_and_attaches_nothing(node, api):
    web, db = node.pods
    api.namespace("shop", {"cniflow.io/export": "maybe"})
    api.pod("shop", "web", NODE, [web.ipv4], {"cniflow.io/export": "yes"})
    api.pod("shop", "db", NODE, [db.ipv4], {})
    api.pod("shop", "host-agent", NODE, ["10.99.0.1"], OPT_IN, host_network=True)
    with k8s_agent(node, api) as running:
        assert wait_for(lambda: running.metrics().get("cniflow_annotation_errors_total") == 2, 10)
        time.sleep(1)
        assert not attached(node, web) and not attached(node, db)
        assert running.metrics()["cniflow_interfaces_attached"] == 0
    log = running.log.read_text()
    assert "pod/shop/web" in log and "'yes'" in log and "namespace/shop" in log
    assert log.count("hostNetwork pod opted in") == 1


RESOLVE = """
import json, sys
from pyroute2 import IPRoute
from agent.interfaces import links
from agent.resolve import Resolver
r = Resolver(IPRoute(), sys.argv[2], netns_scan=sys.argv[3] == "scan")
out = {"links": {n: i for i, n in links().items()}}
for ips in json.loads(sys.argv[1]):
    out[",".join(ips)] = [r.resolve(tuple(ips)), r._by_route(ips[-1])]
print(json.dumps(out))
"""


def resolve_in(node, *ip_sets: tuple[str, ...], scan: bool = True) -> dict:
    """The resolver as the agent runs it: inside the node's network namespace; scan:
    setns() into namespaces allowed (not where the DaemonSet grants no CAP_SYS_ADMIN)."""
    cmd = ["ip", "netns", "exec", node.netns, sys.executable, "-c", RESOLVE,
           json.dumps(ip_sets), node.lxc_map if node.layout == "cilium" else "",
           "scan" if scan else "no"]
    return json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)


def test_each_way_of_finding_a_pods_interface():
    """Routed: the route. Bridged: neighbour and FDB. Cilium (the pod CIDR routed through
    cilium_host, itself a veth, and no per-pod routes): Cilium's endpoint map. No route
    at all (what carries the traffic is none of the node's routes or bridges, as with
    Open vSwitch): the host-side veth's peer namespace, read by netnsid without entering
    it (as the DaemonSet runs, without CAP_SYS_ADMIN), or entered, named under
    /run/netns or only held by a process. A pod's second interface never stands for
    it."""
    import cnilab  # noqa: F401  (registers the Cilium datapath stand-in)

    routed = netlab.up("rsr", 3, unnamed=(2,), net1=(0,))
    bridged = netlab.up("rsb", 2, layout="bridged")
    cilium = netlab.up("rsc", 2, layout="cilium")
    try:
        for node in (routed, bridged, cilium):
            got = resolve_in(node, *[(p.ipv4, p.ipv6) for p in node.pods], ("10.250.0.1",))
            index = got["links"]
            for pod in node.pods:  # by either address, and by the route alone
                by_route = index[pod.host_if] if node is not cilium else None
                assert got[f"{pod.ipv4},{pod.ipv6}"] == [index[pod.host_if], by_route], (
                    pod, got)
            assert got["10.250.0.1"] == [None, None]  # nobody's
            if node is cilium:  # the route leads to cilium_host, a veth of no pod
                assert "cilium_host" in index and "cilium_net" in index
            if node is routed:  # no route to pod1 or pod2 any more: only namespaces know
                for p in node.pods[1:]:
                    netlab.sh(f"ip -n {node.netns} route del {p.ipv4}/32")
                    netlab.sh(f"ip -n {node.netns} -6 route del {p.ipv6}/128")
                    for scan in (True, False):  # read by netnsid, without setns()
                        assert resolve_in(node, (p.ipv4, p.ipv6), scan=scan)[
                            f"{p.ipv4},{p.ipv6}"] == [index[p.host_if], None], (p, scan)
                        assert resolve_in(node, (p.ipv6,), scan=scan)[p.ipv6] == [
                            index[p.host_if], None], (p, scan)
                assert node.pods[2].pid and not Path(f"/run/netns/{node.pods[2].netns}").exists()
                # the second interface's address names its own veth, not the pod's
                extra = node.pods[0].extra_ips[0]
                for scan in (True, False):
                    assert resolve_in(node, (extra,), scan=scan)[extra][0] != \
                        index[node.pods[0].host_if]
    finally:
        for prefix in ("rsr", "rsb", "rsc"):
            netlab.down(prefix)


def test_without_cap_sys_admin_a_pod_no_route_leads_to_is_found_by_its_veths_peer():
    """As the DaemonSet runs (no CAP_SYS_ADMIN: no setns into pod namespaces), a pod the
    node has no route to (its traffic carried by something cniflow cannot read, as Open
    vSwitch) is found through its veth's peer namespace, read by netnsid: attached, and
    what it sends is counted exactly, with its name."""
    node = netlab.up("rsn", 2, unnamed=(0,))
    server = FakeApiServer(node.netns)
    try:
        web, db = node.pods
        netlab.sh(f"ip -n {node.netns} route del {web.ipv4}/32")
        netlab.sh(f"ip -n {node.netns} -6 route del {web.ipv6}/128")
        server.namespace("shop", OPT_IN)
        server.pod("shop", "web", NODE, [web.ipv4, web.ipv6])
        server.pod("shop", "db", NODE, [db.ipv4, db.ipv6])
        tshark = oracles.Tshark(node.netns, 4739)
        no_sys_admin = ("setpriv", "--bounding-set", "-sys_admin", "--inh-caps", "-sys_admin",
                        "--")
        with k8s_agent(node, server, "--idle-timeout", "1", wrap=no_sys_admin) as running:
            assert wait_for(lambda: attached(node, web) and attached(node, db), 15), \
                running.log.read_text()
            assert running.metrics()["cniflow_netns_lookup_enabled"] == 0
            send_udp(node, 0, db.ipv4, 9740, count=7, size=10)
            time.sleep(2.5)
        tshark.stop()
        sent = [r for r in tshark.pod_records() if r["dport"] == 9740]
        assert sum(r["packets"] for r in sent) == 7
        assert {(r["interface"], r["src_pod"]) for r in sent} == {(web.host_if, "web")}
    finally:
        server.stop()
        netlab.down("rsn")


def test_stray_netlink_replies_are_dropped_each_reconcile():
    """pyroute2 files the ACK that follows a route lookup's answer, and the like after
    tc requests, in a queue nobody reads: the agent's memory grew with pod churn
    (bench/k8s.py). The queue is still where the agent empties it, and emptied."""
    from pyroute2 import IPRoute

    from agent import netlink
    from bpf.attach import Attacher
    from bpf.program import FlowProgram

    node = netlab.up("rsq", 1)
    program = FlowProgram(1024)
    try:
        with IPRoute(netns=node.netns) as ipr:
            pod = node.pods[0]
            (ifindex,) = ipr.link_lookup(ifname=pod.host_if)
            attacher = Attacher(program, ipr=ipr)
            for _ in range(20):
                ipr.route("get", dst=pod.ipv4)  # what the resolver's route lookup does
                attacher.attach(ifindex, pod.host_if)
                attacher.detach(ifindex)
            assert netlink.stray_queue(ipr) is not None
            assert netlink.drop_strays(ipr) >= 20
            assert netlink.stray_queue(ipr).empty() and netlink.drop_strays(ipr) == 0
    finally:
        program.close()
        netlab.down("rsq")


def test_an_address_names_the_pod_that_owns_it_and_the_node_is_never_a_pod():
    """db-0's address is also in the status of a finished Job pod created after it (the
    API keeps a Succeeded pod's podIPs): the records name db-0. The node's own address
    (its Node's InternalIP, which a hostNetwork pod shows too) names the node, never the
    hostNetwork pod. The Job pod, opted in, is not metered."""
    node = netlab.up("k8so", 2, remote=True)
    server = FakeApiServer(node.netns)
    node_ip = "10.99.200.1"  # the node's end of its uplink
    try:
        web, db = node.pods
        server.node(NODE, [node_ip])
        server.namespace("shop", OPT_IN)
        server.pod("shop", "web-7d9f", NODE, [web.ipv4], created="2026-12-06T10:00:00Z")
        server.pod("shop", "job-1", NODE, [db.ipv4], phase="Succeeded",
                   created="2026-12-06T11:00:00Z")
        server.pod("shop", "db-0", NODE, [db.ipv4], OPT_OUT, created="2026-12-06T10:30:00Z")
        server.pod("kube-system", "kube-proxy", NODE, [node_ip], host_network=True)
        tshark = oracles.Tshark(node.netns, 4739)
        with k8s_agent(node, server, "--idle-timeout", "1") as running:
            assert wait_for(lambda: attached(node, web), 10), running.log.read_text()
            send_udp(node, 0, db.ipv4, 9950, count=4, size=10)
            subprocess.run(node.exec(f"ping -c 3 -i 0.2 -q -I {node_ip} {web.ipv4}").split(),
                           check=True, stdout=subprocess.DEVNULL)
            time.sleep(2.5)
            assert running.metrics()["cniflow_pods_opted_in"] == 1  # web; not job-1
        tshark.stop()
        records = tshark.pod_records()
    finally:
        server.stop()
        netlab.down("k8so")
    sent = [r for r in records if r["dport"] == 9950 and r["interface"] == web.host_if]
    assert [(r["src_pod"], r["dst_pod"], r["packets"]) for r in sent] == [
        ("web-7d9f", "db-0", 4)], sent
    echo = [r for r in records if r["proto"] == "ICMP" and r["src"] == node_ip]
    assert echo and all((r["src_pod"], r["src_node"], r["dst_pod"]) == ("", NODE, "web-7d9f")
                        for r in echo), echo
    assert sum(r["packets"] for r in echo) == 3


def test_a_rotated_token_is_picked_up_and_a_forbidden_resource_is_named(node, api, tmp_path):
    """Projected service-account tokens rotate on disk: after the API server starts
    refusing the old one (401), the agent reads the file again and carries on, without a
    restart. A resource the service account may not read (403) is named with what to
    grant, counted and retried, while the rest keeps working."""
    web, db = node.pods
    token = tmp_path / "token"
    token.write_text(api.state.token)
    kubeconfig = api.kubeconfig(tmp_path / "kubeconfig", token_file=token)
    api.namespace("shop")
    api.pod("shop", "web", NODE, [web.ipv4], OPT_IN)
    api.pod("shop", "db", NODE, [db.ipv4], {})
    api.state.forbidden.add("nodes")
    with agent(node, "--kubernetes", "--node-name", NODE, "--kubeconfig", str(kubeconfig),
               interfaces=(), wait_attached=False) as running:
        assert wait_for(lambda: attached(node, web), 10), running.log.read_text()
        assert wait_for(lambda: running.log.read_text().count("forbidden (403)") >= 2, 10)
        token.write_text("rotated-2")  # the kubelet rotates it; the server follows
        api.state.token = "rotated-2"
        api.state.drop_watches()
        api.pod("shop", "db", NODE, [db.ipv4], OPT_IN)  # seen only with the new token
        assert wait_for(lambda: attached(node, db), 20), running.log.read_text()
        assert running.metrics()["cniflow_api_errors_total"] >= 3
    log = running.log.read_text()
    assert "refused the credentials (401): reloading them" in log
    assert 'grant get, list and watch on nodes' in log and "Traceback" not in log
