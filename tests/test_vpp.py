"""Stories of the VPP dataplane: the real vpp-papi client (inside the real agent)
against the VPP simulator on a unix socket, for Contiv-VPP's 19.08 and current
VPP (Calico/VPP), the pods from the fake API server, the mediated records read
by cniflow collector."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import struct
import subprocess
import time
from pathlib import Path

import pytest
from conftest import agent, wait_for
from test_collector import RunningCollector
from vpplab import CONTIV, CURRENT, MIDDLE, NODE, Lab, lab
from vppsim import BOTH, IP4, L2, RX, TX, VppSim

OPT_IN = {"cniflow.io/export": "true"}


@contextlib.contextmanager
def vpp_agent(lb: Lab, *args: str, metrics_port: int = 9477):
    kubeconfig = lb.api.kubeconfig(Path(f"/tmp/{lb.node.prefix}-kubeconfig"))
    with agent(lb.node, "--kubernetes", "--node-name", NODE, "--kubeconfig", str(kubeconfig),
               "--dataplane", "vpp", "--vpp-socket", lb.sim.path, "--idle-timeout", "2",
               "--active-timeout", "30", *args, interfaces=(), wait_attached=False,
               metrics_port=metrics_port) as running:
        yield running


def enabled(lb: Lab, sw: int):
    return lb.sim.state.enabled.get(sw)


def records(collector: RunningCollector) -> list[dict]:
    out = []
    for line in collector.out.read_text().splitlines() if collector.out.exists() else []:
        with contextlib.suppress(json.JSONDecodeError):
            out.append(json.loads(line))
    return [r for r in out if "packetDeltaCount" in r]


def flows(ip: str, peer: str, n: int = 3) -> list[dict]:
    return [{"src": peer, "dst": ip, "proto": 17, "sport": 5000 + i, "dport": 53,
             "packets": 10 + i, "octets": 1000 * (i + 1)} for i in range(n)]


def pod_totals(rows: list[dict], name: str, side: str) -> tuple[int, int]:
    sel = [r for r in rows if r.get(f"{side}PodName") == name]
    return sum(r["packetDeltaCount"] for r in sel), sum(r["octetDeltaCount"] for r in sel)


@pytest.mark.parametrize("version", [CONTIV, CURRENT, MIDDLE])
def test_a_pod_opts_in_and_its_vpp_flows_reach_the_collector_with_its_names(version):
    with lab(version) as lb:
        collector = RunningCollector(lb.node.netns, 4739)
        web = lb.pod("web-7d9f", "10.1.0.5")
        db = lb.pod("db-0", "10.1.0.6")  # not opted in
        with vpp_agent(lb) as running:
            assert wait_for(lambda: "VPP configured" in running.log.read_text(), 15), \
                running.log.read_text()
            assert enabled(lb, web) is None
            lb.pod("web-7d9f", "10.1.0.5", OPT_IN)  # opts in while the agent runs
            assert wait_for(lambda: enabled(lb, web), 10), running.log.read_text()
            s = lb.sim.state
            # the exporter aims at the agent's listener, every field explicit
            e = s.exporter
            assert (e.collector, e.port, e.src, e.vrf, e.mtu, e.interval) == (
                lb.collector_ip, 4739, lb.source_ip, lb.vrf, 1450, 20)
            assert (s.record_flags, s.active, s.passive) == (6, 2, 30)
            # the variant and direction each release allows (19.08: raw "which", TX only)
            if lb.contiv:
                assert s.enabled[web] == (L2, TX)
            elif version == CURRENT:
                assert s.enabled[web] == (IP4, BOTH)
            else:
                assert s.enabled[web] == (IP4, TX)
            assert enabled(lb, db) is None
            # VPP meters: traffic to the pod (TX) always, from it (RX) where it can. The
            # story happened 40 s ago (VPP's clock is the simulation's); a new entry
            # exports nothing until its active timer (2 s) has passed
            t0 = time.time() - 40
            sent = lb.sim.traffic(web, flows("10.1.0.5", "10.9.9.9"), TX, when=t0,
                                  flush=False)
            lb.sim.traffic(web, [{"src": "10.1.0.5", "dst": "10.9.9.9", "proto": 6,
                                  "sport": 443, "dport": 40000, "packets": 7,
                                  "octets": 4200, "tcp_flags": 0x18}], RX, when=t0,
                           flush=False)
            # the same flows again after VPP's active timer: exported in the packet path
            again = lb.sim.traffic(web, flows("10.1.0.5", "10.9.9.9"), TX, when=t0 + 3,
                                   flush=False)
            # an interface of no pod that someone else metered: exported without names
            other = lb.sim.add_interface("tap99" if lb.contiv else "tun99")
            lb.sim.state.enabled[other] = (L2 if lb.contiv else IP4, BOTH)
            lb.sim.traffic(other, flows("10.1.0.99", "10.9.9.9", 1), TX, when=t0,
                           flush=False)
            # VPP's timer process: the entries quiet since are deleted, what they still
            # counted exported; then one flush sends the lot (folded together by the agent)
            rest = lb.sim.tick()
            assert (sent, again, rest) == (0, 3, 3 + 1 + (version == CURRENT))

            def received():
                rows = records(collector)
                return pod_totals(rows, "web-7d9f", "destination")[0] >= 2 * 33 and rows
            rows = wait_for(received, 15)
            assert rows, running.log.read_text()
            metrics = running.metrics()
        rows = records(collector)
        collector.stop()
        assert pod_totals(rows, "web-7d9f", "destination") == (2 * 33, 2 * 6000)
        to_web = [r for r in rows if r.get("destinationPodName") == "web-7d9f"]
        assert {r["destinationPodNamespace"] for r in to_web} == {"shop"}
        assert {r["observationDomainId"] if "observationDomainId" in r else r["@domain"]
                for r in to_web} == {1001}
        assert {(r["sourceTransportPort"], r["packetDeltaCount"]) for r in to_web} == {
            (5000, 20), (5001, 22), (5002, 24)}
        if version == CURRENT:
            assert pod_totals(rows, "web-7d9f", "source") == (7, 4200)
            [r] = [r for r in rows if r.get("sourcePodName") == "web-7d9f"]
            assert r["tcpControlBits"] == 0x18
        unknown = [r for r in rows if r.get("sourceIPv4Address") == "10.9.9.9"
                   and r.get("destinationIPv4Address") == "10.1.0.99"]
        assert unknown and not unknown[0].get("destinationPodName")
        assert metrics["cniflow_vpp_unknown_interface_records_total"] >= 1
        assert metrics["cniflow_vpp_connected"] == 1
        # SIGTERM: flowprobe off where the agent turned it on, and nowhere else
        assert enabled(lb, web) is None and enabled(lb, other) is not None


@pytest.mark.parametrize("version", [CONTIV, CURRENT])
def test_opt_out_and_delete_turn_flowprobe_off_and_a_vpp_restart_heals(version):
    with lab(version) as lb:
        web = lb.pod("web-7d9f", "10.1.0.5", OPT_IN)
        db = lb.pod("db-0", "10.1.0.6", OPT_IN)
        collector = RunningCollector(lb.node.netns, 4739)
        with vpp_agent(lb) as running:
            assert wait_for(lambda: enabled(lb, web) and enabled(lb, db), 15), \
                running.log.read_text()
            lb.pod("web-7d9f", "10.1.0.5", {"cniflow.io/export": "false"})
            assert wait_for(lambda: enabled(lb, web) is None, 10)
            lb.api.delete_pod("shop", "db-0")
            assert wait_for(lambda: enabled(lb, db) is None, 10)
            lb.pod("web-7d9f", "10.1.0.5", OPT_IN)
            assert wait_for(lambda: enabled(lb, web), 10)
            if not lb.contiv:  # 22.06+ is read back: flowprobe turned off behind the agent's
                with lb.sim._lock:  # back is turned on again
                    del lb.sim.state.enabled[web]
                assert wait_for(lambda: enabled(lb, web), 10)
            # VPP restarts: it forgets the exporter, the parameters and flowprobe
            lb.sim.restart(1.0)
            assert lb.sim.state.enabled == {}
            assert wait_for(lambda: enabled(lb, web), 20), running.log.read_text()
            assert lb.sim.state.exporter.collector == lb.collector_ip
            lb.sim.report(web, flows("10.1.0.5", "10.9.9.9", 1), TX)
            assert wait_for(lambda: pod_totals(records(collector), "web-7d9f",
                                               "destination")[0] == 10, 15)
            assert running.proc.poll() is None
        collector.stop()


@pytest.mark.parametrize("version", [CONTIV, CURRENT])
def test_a_long_flow_reported_many_times_by_vpp_leaves_what_cniflows_active_timeout_calls_for(
        version):
    """flowprobe keeps a flow's start at its creation and reports the counts since its
    previous report every active timer. A 50 s flow, reported 10 times 5 s apart and
    once more by VPP's timer process, under cniflow's active timeout of 20 s: three
    records (two active timeouts, then idle) that tile the flow, counts exact. Times are
    the simulation's (VPP's clock, ending 30 s ago), delivered in one flush."""
    with lab(version) as lb:
        web = lb.pod("web-7d9f", "10.1.0.5", OPT_IN)
        collector = RunningCollector(lb.node.netns, 4739)
        with vpp_agent(lb, "--active-timeout", "20", "--idle-timeout", "5") as running:
            assert wait_for(lambda: enabled(lb, web), 15), running.log.read_text()
            assert (lb.sim.state.active, lb.sim.state.passive) == (5, 20)
            flow = {"src": "10.9.9.9", "dst": "10.1.0.5", "proto": 6, "sport": 40000,
                    "dport": 8080, "packets": 4, "octets": 4000, "tcp_flags": 0x18}
            t0 = time.time() - 80
            sent = [lb.sim.traffic(web, [flow], TX, when=t0 + 5.01 * k, flush=False)
                    for k in range(11)]
            assert sent == [0] + [1] * 10  # a report at each packet past the active timer
            assert lb.sim.tick() == 1  # then the walker, for what the last one left

            def mine():
                rows = [r for r in records(collector)
                        if r.get("destinationPodName") == "web-7d9f"]
                return rows if len(rows) >= 3 else None
            assert wait_for(mine, 20), running.log.read_text()
            time.sleep(1.5)  # and no more
        rows = sorted(mine(), key=lambda r: r["flowStartMilliseconds"])
        collector.stop()
        assert len(rows) == 3, rows  # not one per VPP report (11)
        assert [r["flowEndReason"] for r in rows] == [2, 2, 1]
        assert sum(r["packetDeltaCount"] for r in rows) == 11 * 4
        assert sum(r["octetDeltaCount"] for r in rows) == 11 * 4000
        start, ends = int(t0 * 1000), [int((t0 + 5.01 * k) * 1000) for k in (4, 8, 10)]
        assert [r["flowStartMilliseconds"] for r in rows] == [start] + ends[:2]
        assert [r["flowEndMilliseconds"] for r in rows] == ends
        for before, after in zip(rows, rows[1:]):
            assert after["flowStartMilliseconds"] >= before["flowEndMilliseconds"]


def swap_interfaces(lb: Lab, a: str, b: str) -> None:
    """Two pods' interfaces come back with each other's index (the CNI re-creates them
    after VPP restarts, in another order)."""
    s = lb.sim
    (sa, ipa), (sb, ipb) = lb.pods[a], lb.pods[b]
    s.interfaces[sa], s.interfaces[sb] = (dataclasses.replace(s.interfaces[sb], sw_if_index=sa),
                                          dataclasses.replace(s.interfaces[sa], sw_if_index=sb))
    moved = {sa: sb, sb: sa}
    s.routes = {ip: moved.get(sw, sw) for ip, sw in s.routes.items()}
    s.neighbors = [(moved.get(sw, sw), ip, mac, flags) for sw, ip, mac, flags in s.neighbors]
    lb.pods[a], lb.pods[b] = (sb, ipa), (sa, ipb)


@pytest.mark.parametrize("version", [CONTIV, CURRENT])
def test_vpp_restarting_in_its_container_with_the_same_pid_is_noticed_and_healed(version):
    """A container's PID namespace gives VPP the same pid at every start; the message
    table and the client index are the same too. The agent notices by the lost
    connection and an exporter VPP no longer has: it re-resolves the pods (their
    interfaces came back swapped) and turns flowprobe on again (19.08 cannot be asked
    what is on, so the agent must forget what it had turned on)."""
    with lab(version) as lb:
        lb.pod("web-7d9f", "10.1.0.5", OPT_IN)
        lb.pod("db-0", "10.1.0.6", OPT_IN)
        collector = RunningCollector(lb.node.netns, 4739)
        with vpp_agent(lb) as running:
            web, db = lb.pods["web-7d9f"][0], lb.pods["db-0"][0]
            assert wait_for(lambda: enabled(lb, web) and enabled(lb, db), 15), \
                running.log.read_text()
            pid, ids = lb.sim.pid, dict(lb.sim.by_name)
            lb.sim.stop()
            swap_interfaces(lb, "web-7d9f", "db-0")
            time.sleep(1.0)
            lb.sim.start(container=True)
            assert (lb.sim.pid, lb.sim.by_name) == (pid, ids)  # the API looks the same
            web, db = lb.pods["web-7d9f"][0], lb.pods["db-0"][0]
            assert wait_for(lambda: enabled(lb, web) and enabled(lb, db), 20), \
                running.log.read_text()
            # traffic to web, on its new interface: named web, not db
            lb.sim.report(web, flows("10.1.0.5", "10.9.9.9", 1), TX)
            assert wait_for(lambda: pod_totals(records(collector), "web-7d9f",
                                               "destination")[0] == 10, 15), \
                running.log.read_text()
            assert pod_totals(records(collector), "db-0", "destination") == (0, 0)
            assert "VPP forgot its configuration" in running.log.read_text()
            assert running.proc.poll() is None
        collector.stop()


def test_vpp_restarting_again_and_again_leaves_the_agent_no_fd_or_thread_behind():
    """Each reconnection is a new vpp-papi client; the one dropped must release its
    pipes and threads (bench/soak.py found 4 fds and 2 threads left per VPP restart)."""
    with lab(CURRENT) as lb:
        web = lb.pod("web-7d9f", "10.1.0.5", OPT_IN)
        with vpp_agent(lb) as running:
            assert wait_for(lambda: enabled(lb, web), 15), running.log.read_text()
            proc = Path(f"/proc/{running.proc.pid}")

            def usage() -> tuple[int, int]:
                return len(list((proc / "fd").iterdir())), len(list((proc / "task").iterdir()))

            time.sleep(1)
            before = usage()
            for k in range(4):
                lb.sim.restart(1.0, container=bool(k % 2))
                assert wait_for(lambda: enabled(lb, web), 20), running.log.read_text()
                time.sleep(1)  # the reconnect's probe child and its pipes are gone
                assert usage() == before, k
            assert running.proc.poll() is None


def log_lines(running) -> list[dict]:
    out = []
    for line in running.log.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            out.append(json.loads(line))
    return out


@pytest.mark.parametrize("how", ["between-polls", "mid-call"])
@pytest.mark.parametrize("version", [CONTIV, CURRENT])
def test_while_vpp_is_unreachable_the_agent_says_so_once_and_logs_no_traceback(version, how):
    """VPP gone between two polls, or dying in the middle of a call (a crash: the
    call is never answered, then reconnecting fails): one line says so either way,
    none for each retry, and the agent comes back with VPP."""
    with lab(version) as lb:
        web = lb.pod("web-7d9f", "10.1.0.5", OPT_IN)
        with vpp_agent(lb) as running:
            assert wait_for(lambda: enabled(lb, web), 15), running.log.read_text()
            seen = len(log_lines(running))
            if how == "mid-call":
                lb.sim.die_on = "sw_interface_dump"  # the next poll's first call
                assert wait_for(lambda: lb.sim.die_on is None, 5)
            else:
                lb.sim.stop()  # VPP is gone; the pod still wants resolving at every poll
            time.sleep(4)  # 8 polls
            lines = log_lines(running)[seen:]
            assert not [x for x in lines if "exc" in x or x["level"] == "error"
                        and x["msg"].endswith("failed")], lines
            assert len([x for x in lines if x["msg"].startswith("VPP: ")]) == 1, lines
            lb.sim.start()
            assert wait_for(lambda: enabled(lb, web), 20), running.log.read_text()
            assert running.proc.poll() is None


def test_a_crc_mismatch_is_a_clear_error_and_the_agent_keeps_trying():
    with lab(CURRENT, crc_override={"set_ipfix_exporter": "deadbeef"}) as lb:
        lb.pod("web-7d9f", "10.1.0.5", OPT_IN)
        with vpp_agent(lb) as running:
            assert wait_for(lambda: "set_ipfix_exporter" in running.log.read_text(), 15)
            assert wait_for(lambda: running.metrics().get(
                'cniflow_vpp_errors_total{kind="crc"}', 0) >= 1, 10)
            line = next(json.loads(x) for x in running.log.read_text().splitlines()
                        if "deadbeef" in x)
            assert "24.10.0-release" in line["msg"] and "5530c8a0" in line["msg"], line
            assert running.proc.poll() is None
            assert lb.sim.state.enabled == {}


@pytest.mark.parametrize("version", [CONTIV, CURRENT])
def test_refused_requests_and_malformed_ipfix_are_counted_and_survived(version):
    with lab(version) as lb:
        web = lb.pod("web-7d9f", "10.1.0.5", OPT_IN)
        name = ("flowprobe_tx_interface_add_del" if version == CONTIV
                else "flowprobe_interface_add_del")
        lb.sim.refuse[name] = -100
        collector = RunningCollector(lb.node.netns, 4739)
        with vpp_agent(lb) as running:
            assert wait_for(lambda: running.metrics().get(
                'cniflow_vpp_errors_total{kind="refused"}', 0) >= 1, 15), running.log.read_text()
            assert f"{name} refused by VPP: CANNOT_ENABLE_DISABLE_FEATURE (-100)" in \
                running.log.read_text()
            del lb.sim.refuse[name]
            assert wait_for(lambda: enabled(lb, web), 10)  # retried on the next poll
            # IPFIX-looking datagrams from another sender of the node: not VPP's, dropped
            template = struct.pack(">HHIIIHHHHHH", 10, 28, 0, 0, 1, 2, 12, 256, 1, 8, 4)
            netns_send(lb, [b"\x00\x0a\x00\x40" + b"\xff" * 60, b"junk", template])
            assert wait_for(lambda: running.metrics().get(
                "cniflow_vpp_foreign_datagrams_total", 0) >= 3, 10)
            assert not any(k.startswith("cniflow_vpp_decode_errors_total") and v
                           for k, v in running.metrics().items())
            # garbage from VPP itself: counted as malformed, survived
            lb.sim.send_raw([b"\x00\x0a\x00\x40" + b"\xff" * 60, b"junk", b"\x00\x0a" * 9])
            assert wait_for(lambda: sum(v for k, v in running.metrics().items()
                                        if k.startswith("cniflow_vpp_decode_errors_total")) >= 2,
                            10)
            lb.sim.report(web, flows("10.1.0.5", "10.9.9.9", 1), TX)
            assert wait_for(lambda: pod_totals(records(collector), "web-7d9f",
                                               "destination")[0] == 10, 15)
            assert running.proc.poll() is None
        collector.stop()


def netns_send(lb: Lab, payloads: list[bytes]) -> None:
    """Datagrams to the agent's listener, sent from inside the lab's namespace."""
    code = ("import socket,sys;s=socket.socket(2,2);"
            + ";".join(f"s.sendto({p!r},('{lb.collector_ip}',4739))" for p in payloads))
    subprocess.run(["ip", "netns", "exec", lb.node.netns, "/usr/bin/python3", "-c", code],
                   check=True)



def test_vpp_coming_back_as_another_release_restarts_the_agent_cleanly():
    """One process holds one release's layouts (vpp-papi's registry is global):
    the agent says so and exits 3, for Kubernetes to start it afresh."""
    with lab(CURRENT) as lb:
        lb.pod("web-7d9f", "10.1.0.5", OPT_IN)
        with vpp_agent(lb) as running:
            assert wait_for(lambda: lb.sim.state.enabled, 15), running.log.read_text()
            lb.sim.stop()
            old = VppSim(lb.sim.path, CONTIV, netns=lb.node.netns)
            try:
                assert running.proc.wait(30) == 3, running.log.read_text()
            finally:
                old.stop()
            assert "restart cniflow" in running.log.read_text()


@pytest.mark.parametrize("version", [CONTIV, CURRENT])
def test_settings_override_what_is_discovered(version):
    with lab(version) as lb:
        lb.sim.tables[(7, False)] = "operator-chosen"
        web = lb.pod("web-7d9f", "10.1.0.5", OPT_IN)
        collector = RunningCollector(lb.node.netns, 4739)
        with vpp_agent(lb, "--vpp-vrf", "7", "--vpp-port", "4800",
                       "--vpp-source-address", lb.source_ip) as running:
            assert wait_for(lambda: enabled(lb, web), 15), running.log.read_text()
            e = lb.sim.state.exporter
            # 19.08 sends data to 4739 whatever the port (VPP-1859): the agent keeps 4739
            assert (e.vrf, e.port) == (7, 4739 if lb.contiv else 4800)
            if lb.contiv:
                assert "sends flowprobe data to port 4739" in running.log.read_text()
            lb.sim.report(web, flows("10.1.0.5", "10.9.9.9", 1), TX)
            assert wait_for(lambda: pod_totals(records(collector), "web-7d9f",
                                               "destination")[0] == 10, 15)
        collector.stop()


@pytest.mark.parametrize("args, message", [
    (["--dataplane", "vpp"], "no VPP API socket"),
    (["--dataplane", "vpp", "--vpp-collector-address", "fd00::1"],
     "--vpp-collector-address / CNIFLOW_VPP_COLLECTOR_ADDRESS"),
    (["--vpp-path-mtu", "1500"], "--vpp-path-mtu / CNIFLOW_VPP_PATH_MTU"),
    (["--dataplane", "dpdk"], "--dataplane / CNIFLOW_DATAPLANE"),
])
def test_bad_vpp_settings_are_one_line_and_exit_2(args, message):
    from conftest import CNIFLOW

    r = subprocess.run([str(CNIFLOW), "agent", "--kubernetes", "--node-name", NODE, *args],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.splitlines()) == 1, r


@pytest.mark.parametrize("dedup", ["true", "false"])
def test_a_packet_between_two_pods_of_the_node_is_one_record_on_vpp_too(dedup):
    """Current VPP meters each pod's interface both ways: web's datagrams to db are in
    web's RX report and again in db's TX report. With dedup (the default) the collector
    gets them once, from the sender's side, naming both pods; --dedup false keeps both."""
    with lab(CURRENT) as lb:
        collector = RunningCollector(lb.node.netns, 4739)
        web = lb.pod("web-7d9f", "10.1.0.5", OPT_IN)
        db = lb.pod("db-0", "10.1.0.6", OPT_IN)
        with vpp_agent(lb, "--dedup", dedup) as running:
            assert wait_for(lambda: enabled(lb, web) and enabled(lb, db), 15), \
                running.log.read_text()
            t0 = time.time() - 40
            pair = [{"src": "10.1.0.5", "dst": "10.1.0.6", "proto": 17, "sport": 7000,
                     "dport": 53, "packets": 9, "octets": 900}]
            lb.sim.traffic(web, pair, RX, when=t0, flush=False)  # leaving web
            lb.sim.traffic(db, pair, TX, when=t0, flush=False)  # delivered to db
            lb.sim.tick()
            want = 9 if dedup == "true" else 18
            assert wait_for(lambda: sum(r["packetDeltaCount"] for r in records(collector)
                                        if r.get("sourceTransportPort") == 7000) >= want, 15)
            time.sleep(1.5)
            deduplicated = running.metrics()["cniflow_packets_deduplicated_total"]
        rows = [r for r in records(collector) if r.get("sourceTransportPort") == 7000]
        collector.stop()
    assert sum(r["packetDeltaCount"] for r in rows) == want
    assert {(r["sourcePodName"], r["destinationPodName"], r["flowType"]) for r in rows} == {
        ("web-7d9f", "db-0", 1)}
    assert deduplicated == (9 if dedup == "true" else 0)
