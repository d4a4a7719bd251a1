"""Stories of Service traffic through kube-proxy's own rule shapes (iptables-nft and
ip6tables, its chains as pkg/proxy/iptables/proxier.go writes them) in the lab node: a
ClusterIP whose backend is a pod of the node and one whose backend runs elsewhere (the
remote host, a pod of node-b by its EndpointSlice), over IPv4 and IPv6; a NodePort, an
external IP and a load balancer IP reached from outside the node, masqueraded as
externalTrafficPolicy Cluster does; a whole TCP connection through a ClusterIP. Every
record names the Service port and the backend, read back by tshark and by `cniflow
collector`, and every packet is counted once."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import netlab
import pytest
from conftest import k8s_agent
from fakeapi import FakeApiServer
from oracles import Tshark, tshark_tree
from test_collector import RunningCollector
from test_counting import ifindex_of
from test_metering import pin_neighbours

NODE = "node-a"
PY = "/usr/bin/python3"
DB_IP, CACHE_IP = "10.96.0.10", "10.96.0.20"  # ClusterIPs
# UDP echo on both families (an IPv6 socket that takes IPv4 too)
ECHO = ("import socket,sys;s=socket.socket(10,2);s.setsockopt(41,26,0);"
        "s.bind(('',int(sys.argv[1])));"
        "print('ready',flush=True)\nwhile 1:\n d,a=s.recvfrom(9999);s.sendto(d,a)")
CLIENT = ("import socket,sys;s=socket.socket(10 if ':' in sys.argv[1] else 2,2);"
          "s.bind(('',int(sys.argv[3])));s.settimeout(3);s.connect((sys.argv[1],int(sys.argv[2])))\n"
          "for _ in range(int(sys.argv[4])):\n s.send(b'q'*100);s.recv(9999)")


def kube_proxy(node, service: str, cluster_ip: str, port: int, backend: str, target: int,
               proto: str = "udp", node_port: int = 0, external_ips: tuple[str, ...] = (),
               cluster_cidr: str = "10.99.0.0/16") -> None:
    """What kube-proxy's iptables mode writes for one Service port ("shop/<service>") and
    one endpoint (pkg/proxy/iptables/proxier.go): KUBE-SERVICES captures the ClusterIP
    (to KUBE-SVC-*, which marks for masquerade what does not come from the cluster CIDR)
    and the external and load balancer IPs (to KUBE-EXT-*); its last rule sends the
    node's own addresses to KUBE-NODEPORTS, whose nodePort goes to KUBE-EXT-* too;
    KUBE-EXT-* marks for masquerade (externalTrafficPolicy Cluster) and jumps to
    KUBE-SVC-*; KUBE-SEP-* DNATs; KUBE-POSTROUTING masquerades what was marked.
    ip6tables for an IPv6 ClusterIP."""
    v6 = ":" in cluster_ip
    tool, host = ("ip6tables", "/128") if v6 else ("iptables", "/32")
    to = f"[{backend}]:{target}" if v6 else f"{backend}:{target}"
    name = f"shop/{service}"
    svc, sep, ext = (f"KUBE-{c}-{service.upper()}" for c in ("SVC", "SEP", "EXT"))

    def nat(*rules: str) -> None:
        for rule in rules:
            netlab.sh(node.exec(f"{tool} -t nat {rule}"))

    if not subprocess.run(node.exec(f"{tool} -t nat -N KUBE-SERVICES").split(),
                          capture_output=True).returncode:  # the node's first Service
        nat("-N KUBE-NODEPORTS", "-N KUBE-POSTROUTING", "-N KUBE-MARK-MASQ",
            "-A PREROUTING -m comment --comment 'kubernetes service portals' -j KUBE-SERVICES",
            "-A OUTPUT -m comment --comment 'kubernetes service portals' -j KUBE-SERVICES",
            "-A POSTROUTING -m comment --comment 'kubernetes postrouting rules' "
            "-j KUBE-POSTROUTING",
            "-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000",
            "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN",
            "-A KUBE-POSTROUTING -j MARK --xor-mark 0x4000",
            "-A KUBE-POSTROUTING -m comment --comment 'kubernetes service traffic requiring "
            "SNAT' -j MASQUERADE --random-fully",
            "-A KUBE-SERVICES -m comment --comment 'kubernetes service nodeports; NOTE: this "
            "must be the last rule in this chain' -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS")
    match = f"-m {proto} -p {proto}"
    nat(f"-N {svc}", f"-N {sep}",
        f"-I KUBE-SERVICES 1 -m comment --comment '{name} cluster IP' {match} "
        f"-d {cluster_ip}{host} --dport {port} -j {svc}",
        f"-A {svc} -m comment --comment '{name} cluster IP' {match} -d {cluster_ip}{host} "
        f"--dport {port} ! -s {cluster_cidr} -j KUBE-MARK-MASQ",
        f"-A {svc} -m comment --comment '{name} -> {to}' -j {sep}",
        f"-A {sep} -m comment --comment {name} -s {backend}{host} -j KUBE-MARK-MASQ",
        f"-A {sep} -m comment --comment {name} {match} -j DNAT --to-destination {to}")
    if node_port or external_ips:
        nat(f"-N {ext}",
            f"-A {ext} -m comment --comment 'masquerade traffic for {name} external "
            "destinations' -j KUBE-MARK-MASQ", f"-A {ext} -j {svc}")
    for ip in external_ips:
        nat(f"-I KUBE-SERVICES 1 -m comment --comment '{name} external IP' {match} "
            f"-d {ip}{host} --dport {port} -j {ext}")
    if node_port:
        nat(f"-A KUBE-NODEPORTS -m comment --comment {name} {match} --dport {node_port} "
            f"-j {ext}")


def echo(cmd_prefix: str, port: int) -> subprocess.Popen:
    p = subprocess.Popen(f"{cmd_prefix} {PY} -c \"{ECHO}\" {port}", shell=True,
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    return p


def ask(node, ip: str, port: int, sport: int, count: int, remote: bool = False) -> None:
    """count datagrams of 100 octets from web (or the remote host), each answered before
    the next."""
    cmd = f"{PY} -c \"{CLIENT}\" {ip} {port} {sport} {count}"
    netlab.sh(node.in_remote(cmd) if remote else node.in_pod(0, cmd))


def shop(api: FakeApiServer, web, db, node_ips: list[str], v6: bool = False) -> None:
    """The opted-in namespace shop, this node with its addresses, and its two pods."""
    api.namespace("shop", {"cniflow.io/export": "true"})
    api.node(NODE, node_ips)
    for name, pod in (("web", web), ("db", db)):
        api.pod("shop", name, NODE, [pod.ipv4, pod.ipv6] if v6 else [pod.ipv4])


def antrea_records(pcap: Path, decode: list[str]) -> list[dict]:
    """Flow records from tshark's tree that carry pod names (Antrea 101 or 103)."""
    return [r for r in tshark_tree(pcap, decode) if 101 in r or 103 in r]


@pytest.mark.parametrize("dedup", [True, False])
def test_service_traffic_names_the_service_and_its_backend_here_and_elsewhere(dedup):
    prefix = f"svc{int(dedup)}"
    node = netlab.up(prefix, 2, remote=True)
    api = FakeApiServer(node.netns)
    servers: list[subprocess.Popen] = []
    try:
        web, db = node.pods
        shop(api, web, db, ["10.99.200.1"])
        api.service("shop", "db", DB_IP, [("sql", "UDP", 80, 8080)])
        api.endpoint_slice("shop", "db", [("sql", "UDP", 8080)], [(db.ipv4, "db", NODE)])
        api.service("shop", "cache", CACHE_IP, [("", "UDP", 53, 5353)])  # its only port
        api.endpoint_slice("shop", "cache", [("", "UDP", 5353)],
                           [(node.remote_ip, "cache-0", "node-b")])
        kube_proxy(node, "db", DB_IP, 80, db.ipv4, 8080)
        kube_proxy(node, "cache", CACHE_IP, 53, node.remote_ip, 5353)
        # ClusterIPs are routed nowhere: the pods send them to their gateway, the node
        for i in range(2):
            pin_neighbours(node, i)
        servers = [echo(node.in_pod(1, ""), 8080), echo(node.in_remote(""), 5353)]
        collector = RunningCollector(node.netns, 4739)
        tshark = Tshark(node.netns, 4739)
        with k8s_agent(node, api, "--idle-timeout", "1", "--dedup", str(dedup).lower(),
                       "--cluster-cidr", "10.99.0.0/16", wait_attached=True) as running:
            time.sleep(1.5)
            ask(node, DB_IP, 80, 41080, 7)       # to a backend on this node
            ask(node, CACHE_IP, 53, 41053, 5)    # to a backend elsewhere
            netlab.sh(node.in_pod(0, f"{PY} -c \"import socket;s=socket.socket(2,2);"
                                     f"s.bind(('',41009));[s.sendto(b'x',('{db.ipv4}',9009))"
                                     " for _ in range(3)]\""))  # no Service: no names
            time.sleep(3)
            assert running.metrics()["cniflow_poll_errors_total"] == 0
        tshark.stop()
        assert tshark.expert() == []
        rows = collector.stop()
        ifindex = {p.host_if: ifindex_of(node, p.host_if) for p in node.pods}
        raw = antrea_records(tshark.pcap, tshark.decode_args())
    finally:
        for s in servers:
            s.kill()
        api.stop()
        netlab.down(prefix)
    web_if, db_if = ifindex[web.host_if], ifindex[db.host_if]

    def named(src, sport, dst, dport, at: str) -> list[dict]:
        """The records of one flow as the veth `at` saw it."""
        return [r for r in rows if r.get("interfaceName") == at
                and r.get("sourceIPv4Address") == src
                and r.get("sourceTransportPort") == sport
                and r.get("destinationIPv4Address") == dst
                and r.get("destinationTransportPort") == dport]

    def one(rs: list[dict]) -> dict:
        assert rs, rows
        out = dict(rs[0])
        out["packetDeltaCount"] = sum(r["packetDeltaCount"] for r in rs)
        keys = ("destinationServicePortName", "sourcePodName", "destinationPodName",
                "sourceNodeName", "destinationNodeName", "flowType")
        assert len({tuple(r.get(k) for k in keys) for r in rs}) == 1, rs
        return out

    def check(r, packets, svc, port, cluster_ip, src_pod, dst_pod, src_node, dst_node, ftype):
        # through a ClusterIP, the address the client used is the ClusterIP (168 = 106)
        assert (r["packetDeltaCount"], r["destinationServicePortName"],
                r["destinationServicePort"], r["destinationClusterIPv4"],
                r["destinationServiceIPv4"], r["sourcePodName"],
                r["destinationPodName"], r["sourceNodeName"], r["destinationNodeName"],
                r["flowType"]) == (packets, svc, port, cluster_ip, cluster_ip, src_pod, dst_pod,
                                   src_node, dst_node, ftype), r

    # web -> db's ClusterIP, at web's veth ingress: the Service, and conntrack's backend,
    # db of this node, whose veth is the egress interface; one packet counted once
    to_db = one(named(web.ipv4, 41080, DB_IP, 80, web.host_if))
    check(to_db, 7, "shop/db:sql", 80, DB_IP, "web", "db", NODE, NODE, 1)
    assert (to_db["ingressInterface"], to_db["egressInterface"]) == (web_if, db_if)
    # db's answers, at db's veth ingress (before un-DNAT): the Service named too
    check(one(named(db.ipv4, 8080, web.ipv4, 41080, db.host_if)), 7, "shop/db:sql", 80, DB_IP, "db",
          "web", NODE, NODE, 1)
    # web -> cache's ClusterIP: the backend is cache-0 on node-b (its EndpointSlice)
    check(one(named(web.ipv4, 41053, CACHE_IP, 53, web.host_if)), 5, "shop/cache", 53,
          CACHE_IP, "web", "cache-0", NODE, "node-b", 2)
    # its answers reach web's egress un-DNATed, from the ClusterIP: cache-0 named as source
    check(one(named(CACHE_IP, 53, web.ipv4, 41053, web.host_if)), 5, "shop/cache", 53, CACHE_IP,
          "cache-0", "web", "node-b", NODE, 2)
    # no Service: nothing named
    check(one(named(web.ipv4, 41009, db.ipv4, 9009, web.host_if)), 3, "", 0, "0.0.0.0", "web", "db",
          NODE, NODE, 1)
    if dedup:  # every packet once: the receivers' copies were skipped in the kernel
        assert named(web.ipv4, 41080, db.ipv4, 8080, db.host_if) == []
        assert named(DB_IP, 80, web.ipv4, 41080, web.host_if) == []
        svc_rows = [r for r in rows if r.get("destinationServicePortName")]
        assert sum(r["packetDeltaCount"] for r in svc_rows) == 7 + 7 + 5 + 5
    else:  # the other two forms: after DNAT at db's egress, after un-DNAT at web's egress
        check(one(named(web.ipv4, 41080, db.ipv4, 8080, db.host_if)), 7, "shop/db:sql", 80,
              DB_IP, "web", "db", NODE, NODE, 1)
        check(one(named(DB_IP, 80, web.ipv4, 41080, web.host_if)), 7, "shop/db:sql", 80,
              DB_IP, "db", "web", NODE, NODE, 1)
    # tshark reads the same elements from the wire (56506/106, 108, 109, 168)
    by_tshark = {(r["src"], r["dport"]): r for r in raw}
    t = by_tshark[(web.ipv4, "80")]
    assert (t[109], t[108], t[106], t[168], t[103]) == (
        b"shop/db:sql", (80).to_bytes(2, "big"), bytes([10, 96, 0, 10]), bytes([10, 96, 0, 10]),
        b"db")
    t = by_tshark[(web.ipv4, "53")]
    assert (t[109], t[103], t[105]) == (b"shop/cache", b"cache-0", b"node-b")
    assert by_tshark[(web.ipv4, "9009")].get(109, b"") == b""


NODE_IP = "10.99.200.1"  # the node's address toward the remote host (netlab's uplink)
EXTERNAL_IP, LB_IP = "203.0.113.10", "203.0.113.20"


def records_at(rows: list[dict], interface: str, **fields) -> list[dict]:
    """Flow records of one veth whose fields have these values."""
    return [r for r in rows if r.get("interfaceName") == interface and "packetDeltaCount" in r
            and all(r.get(k) == v for k, v in fields.items())]


def test_traffic_from_outside_to_a_nodeport_external_ip_and_load_balancer_ip():
    """A client outside the node reaches db's Service (type LoadBalancer) three ways:
    the node's address and its nodePort, an external IP and the load balancer's IP
    routed to the node. kube-proxy DNATs each to db, a pod of this node, and
    masquerades it (externalTrafficPolicy Cluster): db sees the node's own address.
    The records at db's veth name the Service port, the address and port the client
    used, db as the backend and the client's side as outside the cluster (flowType 4
    in, 3 for the answers), never this node: the masquerade hides the client, the
    node's conntrack does not."""
    prefix = "sv2x"
    node = netlab.up(prefix, 2, remote=True)
    api = FakeApiServer(node.netns)
    servers: list[subprocess.Popen] = []
    counts = {(NODE_IP, 30080): 6, (EXTERNAL_IP, 80): 4, (LB_IP, 80): 3}
    try:
        web, db = node.pods
        shop(api, web, db, [NODE_IP])
        api.service("shop", "db", DB_IP, [("sql", "UDP", 80, 8080)], node_ports={"sql": 30080},
                    external_ips=[EXTERNAL_IP], load_balancer_ips=[LB_IP])
        api.endpoint_slice("shop", "db", [("sql", "UDP", 8080)], [(db.ipv4, "db", NODE)])
        kube_proxy(node, "db", DB_IP, 80, db.ipv4, 8080, node_port=30080,
                   external_ips=(EXTERNAL_IP, LB_IP), cluster_cidr="10.99.0.0/18")
        # A real node's masquerade source is its own address (the pods' gateway
        # 169.254.1.1 lives on no real node's interface): link scope, so MASQUERADE
        # picks the uplink's address as a node's would pick its InternalIP
        netlab.sh(node.exec("ip addr del 169.254.1.1/32 dev lo"))
        netlab.sh(node.exec("ip addr add 169.254.1.1/32 dev lo scope link"))
        for ip in (EXTERNAL_IP, LB_IP):  # the network routes them to this node
            netlab.sh(node.in_remote(f"ip route add {ip}/32 via {NODE_IP}"))
        for i in range(2):
            pin_neighbours(node, i)
        servers = [echo(node.in_pod(1, ""), 8080)]
        collector = RunningCollector(node.netns, 4739)
        tshark = Tshark(node.netns, 4739)
        with k8s_agent(node, api, "--idle-timeout", "1", "--cluster-cidr", "10.99.0.0/18",
                       wait_attached=True) as running:
            time.sleep(1.5)
            for (ip, port), n in counts.items():
                ask(node, ip, port, 42000 + n, n, remote=True)
            time.sleep(3)
            assert running.metrics()["cniflow_poll_errors_total"] == 0
        tshark.stop()
        assert tshark.expert() == []
        rows = collector.stop()
        db_if = ifindex_of(node, db.host_if)
        raw = [r for r in tshark_tree(tshark.pcap, tshark.decode_args())
               if r.get("interface") == db.host_if]
    finally:
        for s in servers:
            s.kill()
        api.stop()
        netlab.down(prefix)
    at_db = records_at(rows, db.host_if)
    assert at_db, rows
    assert sum(r["packetDeltaCount"] for r in at_db) == 2 * sum(counts.values()), at_db
    assert records_at(rows, web.host_if) == []  # web took no part
    for (ip, port), n in counts.items():
        # in: db's egress, from the masquerade (the node's address) to db:8080
        into = records_at(rows, db.host_if, sourceIPv4Address=NODE_IP,
                          destinationIPv4Address=db.ipv4, destinationTransportPort=8080,
                          destinationServiceIPv4=ip)
        back = records_at(rows, db.host_if, sourceIPv4Address=db.ipv4,
                          sourceTransportPort=8080, destinationIPv4Address=NODE_IP,
                          destinationServiceIPv4=ip)
        # the address used (168) is the node's, the external or the load balancer IP;
        # the Service's ClusterIP (106) is the same for all three
        assert {r["destinationClusterIPv4"] for r in into + back} == {DB_IP}, into + back
        for rs, packets, ftype, pods, nodes in (
                (into, n, 4, ("", "db"), ("", NODE)), (back, n, 3, ("db", ""), (NODE, ""))):
            assert sum(r["packetDeltaCount"] for r in rs) == packets, (ip, rs, rows)
            for r in rs:
                assert (r["destinationServicePortName"], r["destinationServicePort"],
                        r["flowType"], (r["sourcePodName"], r["destinationPodName"]),
                        (r["sourceNodeName"], r["destinationNodeName"])) == (
                    "shop/db:sql", port, ftype, pods, nodes), r
        assert {r["egressInterface"] for r in into} == {db_if}
        # tshark reads the same from the wire: 109, 108, 168, 106, flowType (137)
        (t,) = [t for t in raw if t.get("src") == NODE_IP
                and t.get(168) == bytes(map(int, ip.split(".")))]
        assert (t[109], t[108], t[106], t[103], t.get(101, b""), t[137], int(t["packets"])) == (
            b"shop/db:sql", port.to_bytes(2, "big"), bytes(map(int, DB_IP.split("."))), b"db",
            b"", b"\x04", n), t


# TCP echo: answer each message, close after the client's FIN
TCP_ECHO = ("import socket,sys;s=socket.create_server(('',int(sys.argv[1])));"
            "print('ready',flush=True);c,_=s.accept()\n"
            "while (b:=c.recv(9999)): c.sendall(b)\nc.close()")
# connect from a fixed port, send n messages each answered, FIN, wait for the server's
TCP_CLIENT = ("import socket,sys;ip,port,sport,n,size=sys.argv[1],*map(int,sys.argv[2:]);"
              "c=socket.create_connection((ip,port),3,('',sport))\n"
              "for _ in range(n):\n c.sendall(b'q'*size);got=0\n"
              " while got<size: got+=len(c.recv(9999))\n"
              "c.shutdown(socket.SHUT_WR);assert c.recv(1)==b'';c.close()")


def counter(node, chain: str, rule: str) -> tuple[int, int]:
    """Packets and octets (IP lengths) iptables counted for the one rule of a mangle
    chain whose listing shows `rule`."""
    out = netlab.sh(node.exec(f"iptables -t mangle -L {chain} -n -v -x")).stdout.splitlines()
    (line,) = [x for x in out[2:] if rule in x + " "]
    packets, octets = line.split()[:2]
    return int(packets), int(octets)


def test_a_tcp_connection_through_a_clusterip_is_counted_once_and_ends_as_it_ended():
    """web opens a TCP connection to db's ClusterIP (DNAT to db, a pod of the node),
    exchanges 5 messages of 300 octets each way, and both sides close it (SYN .. FIN).
    With --dedup (default) each direction is one record at its sender's veth: packets
    and octets equal what the node's own netfilter counted as they arrived from each
    veth, SYN and FIN seen, end reason end of flow (3), the Service and db named."""
    prefix = "sv2t"
    node = netlab.up(prefix, 2)
    api = FakeApiServer(node.netns)
    servers: list[subprocess.Popen] = []
    try:
        web, db = node.pods
        shop(api, web, db, ["10.99.200.1"])
        api.service("shop", "db", DB_IP, [("sql", "TCP", 80, 8080)])
        api.endpoint_slice("shop", "db", [("sql", "TCP", 8080)], [(db.ipv4, "db", NODE)])
        kube_proxy(node, "db", DB_IP, 80, db.ipv4, 8080, proto="tcp")
        # the oracle: mangle PREROUTING counts each packet as it arrives from a veth,
        # before DNAT (web's side) or un-DNAT (db's answers)
        forward, answer = f"-i {web.host_if}", f"-i {db.host_if}"
        netlab.sh(node.exec("iptables -t mangle -N SV2COUNT"))
        netlab.sh(node.exec("iptables -t mangle -A PREROUTING -p tcp -j SV2COUNT"))
        netlab.sh(node.exec(f"iptables -t mangle -A SV2COUNT {forward} -s {web.ipv4} "
                            f"-d {DB_IP} -p tcp --sport 43080 --dport 80"))
        netlab.sh(node.exec(f"iptables -t mangle -A SV2COUNT {answer} -s {db.ipv4} "
                            f"-d {web.ipv4} -p tcp --sport 8080 --dport 43080"))
        for i in range(2):
            pin_neighbours(node, i)
        server = subprocess.Popen(node.in_pod(1, f"{PY} -c \"{TCP_ECHO}\" 8080"), shell=True,
                                  stdout=subprocess.PIPE, text=True)
        servers.append(server)
        assert server.stdout.readline().strip() == "ready"
        collector = RunningCollector(node.netns, 4739)
        tshark = Tshark(node.netns, 4739)
        with k8s_agent(node, api, "--idle-timeout", "5", "--cluster-cidr", "10.99.0.0/16",
                       wait_attached=True) as running:
            time.sleep(1.5)
            netlab.sh(node.in_pod(0, f"{PY} -c \"{TCP_CLIENT}\" {DB_IP} 80 43080 5 300"))
            assert server.wait(5) == 0
            time.sleep(3)  # within the idle timeout: only the end of the flow ends them
            assert running.metrics()["cniflow_poll_errors_total"] == 0
        tshark.stop()
        assert tshark.expert() == []
        rows = collector.stop()
        sent = counter(node, "SV2COUNT", "spt:43080 ")
        answered = counter(node, "SV2COUNT", "spt:8080 ")
        raw = antrea_records(tshark.pcap, tshark.decode_args())
    finally:
        for s in servers:
            s.kill()
        api.stop()
        netlab.down(prefix)
    assert sent[0] >= 8 and answered[0] >= 7, (sent, answered)  # SYN, 5 data, FIN, ACKs
    tcp = [r for r in rows if r.get("protocolIdentifier") == 6]
    to_db = records_at(tcp, web.host_if, sourceIPv4Address=web.ipv4,
                       destinationIPv4Address=DB_IP, sourceTransportPort=43080)
    back = records_at(tcp, db.host_if, sourceIPv4Address=db.ipv4,
                      destinationIPv4Address=web.ipv4, destinationTransportPort=43080)
    assert len(to_db) + len(back) == len(tcp) == 2, tcp  # one record a direction, no others
    for (r,), oracle, pods in ((to_db, sent, ("web", "db")), (back, answered, ("db", "web"))):
        assert ((r["packetDeltaCount"], r["octetDeltaCount"]), r["flowEndReason"],
                r["tcpControlBits"] & 0x03, r["destinationServicePortName"],
                r["destinationServicePort"], r["destinationClusterIPv4"],
                (r["sourcePodName"], r["destinationPodName"]), r["flowType"]) == (
            oracle, 3, 0x03, "shop/db:sql", 80, DB_IP, pods, 1), r
    (t,) = [t for t in raw if t.get("src") == web.ipv4 and t.get("dport") == "80"]
    assert (t[109], t[103], int(t["packets"]), int(t["octets"])) == (b"shop/db:sql", b"db",
                                                                      *sent)


def test_ipv6_clusterips_name_the_service_and_its_backend_in_every_form():
    """The same two Services over IPv6 (ip6tables DNAT, conntrack's IPv6 tuples): db's
    ClusterIP lands on db of this node, cache's on cache-0 of node-b. With --dedup false
    every veth a packet crosses reports it, so each of the four forms conntrack knows
    (before DNAT, after it, the answer before and after un-DNAT) is a record of exactly
    the packets sent, naming the Service, the address and port the client used, and
    the backend."""
    prefix = "sv2v6"
    db6, cache6 = "fd00:96::10", "fd00:96::20"
    node = netlab.up(prefix, 2, remote=True)
    api = FakeApiServer(node.netns)
    servers: list[subprocess.Popen] = []
    try:
        web, db = node.pods
        shop(api, web, db, ["10.99.200.1", "fd00:99:200::1"], v6=True)
        api.service("shop", "db", db6, [("sql", "UDP", 80, 8080)])
        api.endpoint_slice("shop", "db", [("sql", "UDP", 8080)], [(db.ipv6, "db", NODE)])
        api.service("shop", "cache", cache6, [("", "UDP", 53, 5353)])
        api.endpoint_slice("shop", "cache", [("", "UDP", 5353)],
                           [(node.remote_ip6, "cache-0", "node-b")])
        kube_proxy(node, "db", db6, 80, db.ipv6, 8080, cluster_cidr="fd00:99::/32")
        kube_proxy(node, "cache", cache6, 53, node.remote_ip6, 5353, cluster_cidr="fd00:99::/32")
        for i in range(2):
            pin_neighbours(node, i)
        servers = [echo(node.in_pod(1, ""), 8080), echo(node.in_remote(""), 5353)]
        collector = RunningCollector(node.netns, 4739)
        tshark = Tshark(node.netns, 4739)
        with k8s_agent(node, api, "--idle-timeout", "1", "--dedup", "false", "--cluster-cidr",
                       "10.99.0.0/16,fd00:99::/32", wait_attached=True) as running:
            time.sleep(1.5)
            ask(node, db6, 80, 41180, 7)
            ask(node, cache6, 53, 41153, 5)
            time.sleep(3)
            assert running.metrics()["cniflow_poll_errors_total"] == 0
        tshark.stop()
        assert tshark.expert() == []
        rows = collector.stop()
        db_if = ifindex_of(node, db.host_if)
        raw = antrea_records(tshark.pcap, tshark.decode_args())
    finally:
        for s in servers:
            s.kill()
        api.stop()
        netlab.down(prefix)
    w, d = web.ipv6, db.ipv6
    expected = [  # interface, src, sport, dst, dport, packets, service, port, frontend,
        # source pod, destination pod, source node, destination node, flowType
        (web.host_if, w, 41180, db6, 80, 7, "shop/db:sql", 80, db6, "web", "db", NODE, NODE, 1),
        (db.host_if, w, 41180, d, 8080, 7, "shop/db:sql", 80, db6, "web", "db", NODE, NODE, 1),
        (db.host_if, d, 8080, w, 41180, 7, "shop/db:sql", 80, db6, "db", "web", NODE, NODE, 1),
        (web.host_if, db6, 80, w, 41180, 7, "shop/db:sql", 80, db6, "db", "web", NODE, NODE, 1),
        (web.host_if, w, 41153, cache6, 53, 5, "shop/cache", 53, cache6, "web", "cache-0", NODE,
         "node-b", 2),
        (web.host_if, cache6, 53, w, 41153, 5, "shop/cache", 53, cache6, "cache-0", "web",
         "node-b", NODE, 2)]
    udp6 = [r for r in rows if r.get("protocolIdentifier") == 17 and "sourceIPv6Address" in r]
    for at, src, sport, dst, dport, packets, *names in expected:
        rs = records_at(udp6, at, sourceIPv6Address=src, sourceTransportPort=sport,
                        destinationIPv6Address=dst, destinationTransportPort=dport)
        assert sum(r["packetDeltaCount"] for r in rs) == packets, (at, src, dst, rows)
        for r in rs:
            assert [r["destinationServicePortName"], r["destinationServicePort"],
                    r["destinationClusterIPv6"], r["sourcePodName"], r["destinationPodName"],
                    r["sourceNodeName"], r["destinationNodeName"], r["flowType"]] == names, r
            assert r["destinationServiceIPv6"] == r["destinationClusterIPv6"], r  # used it
    # nothing else: every packet is in one of the six
    assert sum(r["packetDeltaCount"] for r in udp6) == 4 * 7 + 2 * 5, udp6
    (to_db,) = records_at(udp6, web.host_if, destinationIPv6Address=db6)
    assert to_db["egressInterface"] == db_if
    # tshark: the Service's IPv6 ClusterIP (56506/107), the address the client used
    # (169: the same), the Service and its backend
    t = [t for t in raw if t.get(107) == bytes.fromhex("fd000096" + "0" * 22 + "10")
         and t.get(169) == t.get(107)
         and t.get(101) == b"web" and t.get("dport") == "80"]
    assert [(x[109], x[103], int(x["packets"])) for x in t] == [(b"shop/db:sql", b"db", 7)], raw
