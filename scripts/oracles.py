"""Independent IPFIX readers run inside a lab node: nfcapd/nfdump, nfacctd, tshark.

Each starts before the exporter, stops cleanly (which flushes its output) and
returns the flows it decoded as dicts with common names:
src, dst, sport, dport, proto, packets, octets (plus whatever else it knows).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path


def _wait_port(netns: str, port: int, proto: str = "u", timeout: float = 5.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        out = subprocess.run(
            f"ip netns exec {netns} ss -ln{proto}H sport = :{port}",
            shell=True,
            capture_output=True,
            text=True,
        ).stdout
        if out.strip():
            return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on {port} in {netns}")


class Nfcapd:
    """nfdump's collector: UDP only; keys exporters by source IP and domain id."""

    def __init__(self, netns: str, port: int) -> None:
        self.netns, self.port = netns, port
        self.dir = Path(tempfile.mkdtemp(prefix="cniflow-nfcapd-"))
        self.proc = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                netns,
                "nfcapd",
                "-w",
                str(self.dir),
                "-b",
                "127.0.0.1",
                "-p",
                str(port),
                "-t",
                "3600",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        _wait_port(netns, port)

    def stop(self) -> list[dict]:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=10)
        return self.records()

    def records(self) -> list[dict]:
        out = subprocess.run(
            ["nfdump", "-R", str(self.dir), "-o", "raw"], capture_output=True, text=True, check=True
        ).stdout
        return parse_nfdump_raw(out)


def parse_nfdump_raw(text: str) -> list[dict]:
    flows = []
    for block in text.split("Flow Record:")[1:]:
        f = {}
        for line in block.splitlines():
            m = re.match(r"\s+(.+?)\s+=\s+(\S+)(?:\s+(.*))?$", line)
            if m:
                f[m.group(1)] = m.group(2)
        if "src addr" not in f:
            continue
        icmp = f.get("ICMP")
        sport = int(f.get("src port", 0))
        dport = int(f.get("dst port", 0))
        if icmp:
            t, c = icmp.split(".")
            dport = int(t) << 8 | int(c)
        flows.append(
            {
                "src": f["src addr"],
                "dst": f["dst addr"],
                "sport": sport,
                "dport": dport,
                "proto": int(f["proto"]),
                "packets": int(f["in packets"]),
                "octets": int(f["in bytes"]),
                "input": int(f.get("input", 0)),
                "output": int(f.get("output", 0)),
                "end_reason": int(f.get("end reason", "0"), 16),
                "first_ms": int(f["first"]),
                "last_ms": int(f["last"]),
            }
        )
    return flows


class Nfacctd:
    """pmacct's collector, printing JSON lines; SIGINT purges its cache."""

    # Antrea's pod elements as pmacct custom primitives (see shared/reference/oracles.md)
    PRIMITIVES = "".join(
        f"name={name}\tfield_type=56506:{ie}\tlen=vlen\tsemantics=str\n"
        for name, ie in (
            ("src_pod_ns", 100),
            ("src_pod", 101),
            ("dst_pod_ns", 102),
            ("dst_pod", 103),
            ("src_node", 104),
            ("dst_node", 105),
        )
    )

    def __init__(self, netns: str, port: int, pods: bool = False) -> None:
        self.netns, self.port = netns, port
        self.dir = Path(tempfile.mkdtemp(prefix="cniflow-nfacctd-"))
        self.out = self.dir / "flows.jsonl"
        conf = self.dir / "nfacctd.conf"
        extra_keys, extra_conf = "", ""
        if pods:
            (self.dir / "primitives.lst").write_text(self.PRIMITIVES)
            extra_keys = ", src_pod_ns, src_pod, dst_pod_ns, dst_pod, src_node, dst_node"
            extra_conf = f"aggregate_primitives: {self.dir}/primitives.lst\n"
        self.pods = pods
        conf.write_text(
            "daemonize: false\n"
            f"logfile: {self.dir}/nfacctd.log\n"
            "nfacctd_ip: 127.0.0.1\n"
            f"nfacctd_port: {port}\n"
            "plugins: print[flows]\n"
            "aggregate[flows]: src_host, dst_host, src_port, dst_port, proto, in_iface, "
            f"out_iface, timestamp_start, timestamp_end{extra_keys}\n"
            + extra_conf
            + "print_output[flows]: json\n"
            f"print_output_file[flows]: {self.out}\n"
            "print_output_file_append[flows]: true\n"
            "print_refresh_time[flows]: 60\n"
        )
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", netns, "nfacctd", "-f", str(conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        _wait_port(netns, port)

    def stop(self) -> list[dict]:
        os.killpg(self.proc.pid, signal.SIGINT)
        self.proc.wait(timeout=15)
        flows = []
        if self.out.exists():
            for line in self.out.read_text().splitlines():
                r = json.loads(line)
                flows.append(
                    {
                        "src": r["ip_src"],
                        "dst": r["ip_dst"],
                        "sport": r["port_src"],
                        "dport": r["port_dst"],
                        "proto": _proto_number(r["ip_proto"]),
                        "packets": r["packets"],
                        "octets": r["bytes"],
                        "input": r.get("iface_in"),
                        "output": r.get("iface_out"),
                        **{k: r[k] for k in Tshark.ANTREA.values() if k in r},
                    }
                )
        return flows


def _proto_number(name: str | int) -> int:
    """nfacctd prints protocol names ("udp", "ipv6-icmp")."""
    if isinstance(name, int) or str(name).isdigit():
        return int(name)
    return socket.getprotobyname(name)


def replay(pcap: Path, netns: str, port: int, decode_port: int) -> int:
    """Send the UDP payloads of a capture, in order, to 127.0.0.1:port inside netns."""
    hexes = subprocess.run(
        [
            "tshark",
            "-r",
            str(pcap),
            "-d",
            f"udp.port=={decode_port},cflow",
            "-T",
            "fields",
            "-e",
            "udp.payload",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    code = (
        "import socket,sys,time\n"
        "s=socket.socket(2,2)\n"
        "for h in sys.stdin.read().split():\n"
        f"    s.sendto(bytes.fromhex(h),('127.0.0.1',{port})); time.sleep(0.01)\n"
    )
    subprocess.run(
        ["ip", "netns", "exec", netns, "/usr/bin/python3", "-c", code],
        input="\n".join(hexes),
        text=True,
        check=True,
    )
    return len(hexes)


class Tshark:
    """A capture on the node's loopback, decoded afterwards with expert info."""

    FIELDS = (
        "cflow.od_id",
        "cflow.sequence",
        "cflow.flowset_id",
        "cflow.srcaddr",
        "cflow.dstaddr",
        "cflow.srcaddrv6",
        "cflow.dstaddrv6",
        "cflow.srcport",
        "cflow.dstport",
        "cflow.protocol",
        "cflow.packets",
        "cflow.octets",
        "cflow.flow_end_reason",
        "cflow.icmp_type_code_ipv4",
        "cflow.icmp_ipv6_type",
        "cflow.icmp_ipv6_code",
        "cflow.if_name",
        "cflow.direction",
    )

    # A collector's socket where the test runs none: without one the kernel refuses every
    # datagram (ICMP port unreachable) and the agent, as it should, keeps and sends again
    # what was refused. Where a collector already listens, its bind fails and it exits.
    SINK = ("import socket,sys;s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);"
            "s.bind(('127.0.0.1',int(sys.argv[1])))\nwhile True: s.recv(65535)")

    def __init__(self, netns: str, port: int, proto: str = "udp") -> None:
        self.port, self.proto = port, proto
        self.pcap = Path(tempfile.mkdtemp(prefix="cniflow-tshark-")) / "export.pcap"
        self.sink = None
        if proto == "udp":
            self.sink = subprocess.Popen(["ip", "netns", "exec", netns, "python3", "-c",
                                          self.SINK, str(port)], stderr=subprocess.DEVNULL)
            _wait_port(netns, port, "u")
        self.proc = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                netns,
                "tshark",
                "-i",
                "lo",
                "-f",
                f"{proto} port {port}",
                "-F",
                "pcap",
                "-w",
                str(self.pcap),
                "-q",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.time() + 10
        while time.time() < deadline:  # tshark says "Capturing on 'Loopback: lo'" when ready
            line = self.proc.stderr.readline()
            if "Capturing on" in line or not line:
                break
        time.sleep(0.3)

    def stop(self) -> Path:
        time.sleep(0.5)
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(timeout=10)
        if self.sink is not None:
            self.sink.kill()
            self.sink.wait()
        return self.pcap

    def decode_args(self) -> list[str]:
        return ["-d", f"{self.proto}.port=={self.port},cflow"]

    def expert(self) -> list[str]:
        """Expert messages of severity warning or worse (and malformed packets); TCP's
        chat-level notes about SYN and FIN are not problems."""
        out = subprocess.run(
            [
                "tshark",
                "-r",
                str(self.pcap),
                *self.decode_args(),
                "-Y",
                '_ws.expert.severity >= "warning" or _ws.malformed',
                "-T",
                "fields",
                "-e",
                "_ws.expert.message",
                "-e",
                "_ws.malformed",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return [line for line in out.splitlines() if line.strip()]

    def messages(self) -> list[dict[str, list[str]]]:
        """One dict per IPFIX message: field -> list of values in record order."""
        cmd = [
            "tshark",
            "-r",
            str(self.pcap),
            *self.decode_args(),
            "-T",
            "fields",
            "-E",
            "occurrence=a",
            "-E",
            "aggregator=|",
            "-E",
            "separator=\t",
        ]
        for f in self.FIELDS:
            cmd += ["-e", f]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        msgs = []
        for line in out.splitlines():
            cols = line.split("\t")
            msgs.append({f: (c.split("|") if c else []) for f, c in zip(self.FIELDS, cols)})
        return msgs

    ANTREA = {
        100: "src_pod_ns",
        101: "src_pod",
        102: "dst_pod_ns",
        103: "dst_pod",
        104: "src_node",
        105: "dst_node",
    }

    def pod_records(self) -> list[dict]:
        """Flow records with the Antrea strings (tshark shows them as hex), read from
        tshark's decoded tree: src, dst, proto, packets, octets, interface, and
        src_pod_ns, src_pod, dst_pod_ns, dst_pod, src_node, dst_node."""
        records = [{**{k: v for k, v in r.items() if isinstance(k, str)},
                    **{self.ANTREA[k]: v.decode() for k, v in r.items() if k in self.ANTREA}}
                   for r in tshark_tree(self.pcap, self.decode_args())]
        # tshark shows no line for an empty string: a record with any Antrea field has
        # them all, the missing ones empty
        names = set(self.ANTREA.values())
        flows = [{**dict.fromkeys(names, ""), **r} for r in records if names & set(r)]
        for r in flows:
            r["packets"], r["octets"], r["dport"] = (
                int(r["packets"]),
                int(r["octets"]),
                int(r["dport"]),
            )
        return flows

    def records(self) -> list[dict]:
        flows = []
        for m in self.messages():
            n = len(m["cflow.packets"])
            v4 = m["cflow.srcaddr"]
            src = v4 if len(v4) == n else m["cflow.srcaddrv6"]
            dst = m["cflow.dstaddr"] if len(v4) == n else m["cflow.dstaddrv6"]
            if len(src) != n:  # a message with v4 and v6 sets: not produced by cniflow
                raise AssertionError(f"mixed message {m}")
            # tshark shows icmpTypeCodeIPv6 (139) as two fields, type and code
            icmp = m["cflow.icmp_type_code_ipv4"] or [
                str(int(t) << 8 | int(c))
                for t, c in zip(m["cflow.icmp_ipv6_type"], m["cflow.icmp_ipv6_code"])
            ]
            for i in range(n):
                proto = int(m["cflow.protocol"][i])
                flows.append(
                    {
                        "src": src[i],
                        "dst": dst[i],
                        "proto": proto,
                        "sport": int(m["cflow.srcport"][i]),
                        "dport": int(m["cflow.dstport"][i])
                        if proto not in (1, 58)
                        else int(icmp[i], 0),
                        "packets": int(m["cflow.packets"][i]),
                        "octets": int(m["cflow.octets"][i]),
                        "end_reason": int(m["cflow.flow_end_reason"][i]),
                        "interface": m["cflow.if_name"][i] if m["cflow.if_name"] else "",
                        "direction": int(m["cflow.direction"][i]),
                    }
                )
        return flows


def tshark_tree(pcap: Path, decode: list[str]) -> list[dict]:
    """Flow records from tshark's decoded tree (`-V`): src, dst, sport, dport, proto,
    packets, octets, interface, direction as tshark prints them, and each Antrea
    element by its id, as bytes (tshark 4.0 names none of them and shows them in hex;
    an empty string shows no line)."""
    out = subprocess.run(["tshark", "-r", str(pcap), *decode, "-O", "cflow", "-V"],
                         capture_output=True, text=True, check=True).stdout
    records, cur = [], None
    for line in out.splitlines():
        text = line.strip()
        if re.match(r"^Flow \d+$", text):
            cur = {}
            records.append(cur)
        elif text.startswith(("Set ", "Frame ")):
            cur = None
        elif cur is not None:
            m = re.match(r"Enterprise Private entry: \(Project Antrea\) Type (\d+)(.*)", text)
            if m:
                hexed = re.search(r"Value \(hex bytes\):?\s*([0-9a-f ]*)", m.group(2))
                cur[int(m.group(1))] = bytes.fromhex(hexed.group(1) if hexed else "")
                continue
            for label, key in (("SrcAddr", "src"), ("DstAddr", "dst"), ("SrcPort", "sport"),
                               ("DstPort", "dport"), ("Packets", "packets"),
                               ("Octets", "octets"), ("IfName", "interface"),
                               ("Protocol", "proto"), ("Direction", "direction")):
                if text.startswith(label + ":"):
                    cur[key] = text.split(":", 1)[1].strip().split(" ")[0]
    return records
