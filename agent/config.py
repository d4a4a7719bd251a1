"""Every agent setting, in one place: its flag, CNIFLOW_ variable, default and help.

The CLI builds its parser from SETTINGS, the README's table mirrors it (a test
keeps them equal), and the DaemonSet's ConfigMap sets the variables.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path


class ConfigError(ValueError):
    """A setting has a value the agent cannot use; the message names it."""


def _positive(kind: Callable[[str], float | int]) -> Callable[[str], float | int]:
    def parse(text: str) -> float | int:
        value = kind(text)
        if value <= 0:
            raise ValueError(f"must be > 0, got {text!r}")
        return value

    parse.__name__ = kind.__name__
    return parse


def _ranged(lo: int, hi: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text, 0)
        if not lo <= value <= hi:
            raise ValueError(f"must be between {lo} and {hi}, got {text!r}")
        return value

    parse.__name__ = "int"
    return parse


def _choice(*options: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in options:
            raise ValueError(f"must be one of {', '.join(options)}, got {text!r}")
        return text

    parse.__name__ = "choice"
    return parse


def _entry_points(text: str) -> str:
    """auto, off, or interface names and globs, comma-separated."""
    if text in ("auto", "off"):
        return text
    names = [n.strip() for n in text.split(",")]
    bad = [n for n in names if not n or len(n) > 15 or re.search(r"[\s/:]", n)
           or n in ("auto", "off")]
    if bad:
        raise ValueError(f"must be auto, off or interface names (at most 15 characters, "
                         f"no spaces, '/' or ':'), got {text!r}")
    return ",".join(names)


def host_port(text: str) -> tuple[str, int]:
    """HOST:PORT, with [v6]:PORT for IPv6 literals."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"must be HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def _address(text: str) -> str:
    if text in ("", "off"):
        return ""
    host_port(text if not text.startswith(":") else "0.0.0.0" + text)
    return text


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("true", "1", "yes", "on"):
        return True
    if value in ("false", "0", "no", "off", ""):
        return False
    raise ValueError(f"must be true or false, got {text!r}")


def _handover(text: str) -> str:
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return "true" if _bool(text) else "false"
    except ValueError:
        raise ValueError(f"must be true, false or auto, got {text!r}") from None


def _pin_path(text: str) -> str:
    """An absolute directory, or "" for off (a bpffs under it is checked at load)."""
    if text.strip() in ("", "off"):
        return ""
    if not text.startswith("/"):
        raise ValueError(f"must be an absolute path or off, got {text!r}")
    return text.rstrip("/") or "/"


def _non_negative(text: str) -> float:
    value = float(text)
    if value < 0:
        raise ValueError(f"must be >= 0, got {text!r}")
    return value


def _split(text: str) -> list[str]:
    return [p for p in text.replace(",", " ").split() if p]


_LABEL_NAME = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?")
_LABEL_PREFIX = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")


def _label_keys(text: str) -> list[str]:
    """Kubernetes label keys: [prefix/]name, as the API server validates them."""
    keys = _split(text)
    for key in keys:
        prefix, _, name = key.rpartition("/")
        if not _LABEL_NAME.fullmatch(name) or (prefix and not _LABEL_PREFIX.fullmatch(prefix)):
            raise ValueError(f"must be label keys ([prefix/]name), got {key!r}")
    return keys


def _cidrs(text: str) -> list[str]:
    return [str(ipaddress.ip_network(p, strict=False)) for p in _split(text)]


def _transport():
    return field(default="udp", metadata={"parse": _choice("udp", "tcp", "tls"),
                                          "help": "udp, tcp, or tls (TCP with TLS)"})


def _metrics_address(default: str):
    return field(default=default, metadata={
        "parse": _address, "help": "Prometheus /metrics HOST:PORT; empty or 'off' disables"})


def _log_level():
    return field(default="info", metadata={"parse": _choice("debug", "info", "warning", "error"),
                                           "help": "debug, info, warning or error"})


def _log_format():
    return field(default="json", metadata={"parse": _choice("json", "text"),
                                           "help": "json (lines) or text"})


VPP_SOCKETS = ("/run/vpp/api.sock", "/var/run/vpp/vpp-api.sock", "/run/vpp-api.sock")


def _ip_or_empty(text: str) -> str:
    if text:
        ipaddress.IPv4Address(text)  # VPP's flowprobe exports over IPv4 only
    return text


@dataclass
class Config:
    interface: list[str] = field(
        default_factory=list,
        metadata={
            "parse": _split,
            "many": True,
            "help": "interface to meter: a name or a glob such as 'veth*' (repeatable; "
            "interfaces that appear later are attached too)",
        },
    )
    kubernetes: bool = field(
        default=False,
        metadata={"parse": _bool, "switch": True, "help":
                  "meter the pods of this node that opt in (annotation cniflow.io/export)"},
    )
    node_name: str = field(
        default="",
        metadata={"parse": str, "help":
                  "this node's name, for the pod watch; default: $NODE_NAME"},
    )
    pod_name: str = field(
        default="",
        metadata={"parse": str, "help":
                  "this agent's own pod, for --handover auto; default: $POD_NAME"},
    )
    pod_namespace: str = field(
        default="",
        metadata={"parse": str, "help":
                  "the namespace of --pod-name; default: $POD_NAMESPACE"},
    )
    kubeconfig: str = field(
        default="",
        metadata={"parse": str, "help":
                  "kubeconfig file; default: in-cluster service account, then $KUBECONFIG"},
    )
    collector: str = field(
        default="127.0.0.1:4739",
        metadata={"parse": lambda t: (host_port(t), t)[1], "help": "IPFIX collector, HOST:PORT"},
    )
    transport: str = _transport()
    tls_ca: str = field(
        default="", metadata={"parse": str, "help":
                              "with tls: CA file that signed the collector's certificate"}
    )
    tls_cert: str = field(
        default="", metadata={"parse": str, "help":
                              "with tls: this agent's certificate, when the collector asks for one"}
    )
    tls_key: str = field(
        default="", metadata={"parse": str, "help": "with tls: the key of --tls-cert"}
    )
    biflow: bool = field(
        default=False,
        metadata={"parse": _bool, "switch": True, "help":
                  "export RFC 5103 biflows: both directions of a connection in one record"},
    )
    active_timeout: float = field(
        default=60.0,
        metadata={
            "parse": _positive(float),
            "help": "seconds after which a long flow is reported (flowEndReason 2)",
        },
    )
    idle_timeout: float = field(
        default=15.0,
        metadata={
            "parse": _positive(float),
            "help": "seconds without packets after which a flow ends (flowEndReason 1)",
        },
    )
    poll_interval: float = field(
        default=1.0,
        metadata={"parse": _positive(float), "help": "seconds between drains of the kernel map"},
    )
    observation_domain_id: int = field(
        default=1,
        metadata={
            "parse": _ranged(0, 0xFFFFFFFF),
            "help": "IPFIX observation domain id; give each node's agent its own",
        },
    )
    max_message_size: int = field(
        default=1400,
        metadata={
            "parse": _ranged(512, 65535),
            "help": "largest IPFIX message in octets (keep UDP under the path MTU)",
        },
    )
    template_refresh: float = field(
        default=0.0,
        metadata={"parse": _non_negative, "help":
                  "seconds between template resends over UDP; 0: with every export, so a "
                  "collector that restarted between two exports decodes the first data it gets"},
    )
    map_size: int = field(
        default=65536,
        metadata={
            "parse": _ranged(1, 1 << 26),
            "help": "flows the kernel map holds between two drains",
        },
    )
    max_flows: int = field(
        default=250_000,  # bench/run.py: 215 MB peak with every flow ending at once
        metadata={
            "parse": _ranged(1, 1 << 28),
            "help": "flows the agent's table holds; beyond it the oldest end (flowEndReason 5)",
        },
    )
    export_backlog: int = field(
        default=100_000,
        metadata={
            "parse": _ranged(0, 1 << 28),
            "help": "records kept while the collector is unreachable; overflow is counted",
        },
    )
    tc_priority: int = field(
        default=1,
        metadata={"parse": _ranged(1, 0xFFFF), "help": "tc filter priority of cniflow's filters"},
    )
    attach: str = field(
        default="auto",
        metadata={"parse": _choice("auto", "tcx", "tc"), "help":
                  "tcx (BPF links at the head of the TCX chain, before a CNI's programs), tc "
                  "(clsact + cls_bpf), or auto: tcx where the kernel has it (6.6+)"},
    )
    entry_points: str = field(
        default="auto",
        metadata={"parse": _entry_points, "help":
                  "interfaces whose ingress counts packets for metered pods that a CNI could "
                  "deliver past their veths (Cilium's BPF host routing): auto (every other "
                  "interface whose ingress holds a program, e.g. the uplink, cilium_vxlan, "
                  "unmetered pods' lxc), off, or names and globs, comma-separated"},
    )
    dedup: bool = field(
        default=True,
        metadata={"parse": _bool, "help":
                  "a packet between two metered interfaces of this node is counted once, at "
                  "the sender's; off: at every metered interface it crosses"},
    )
    pod_side: bool = field(
        default=False,
        metadata={"parse": _bool, "help":
                  "count what metered pods receive at their own end of the veth (TCX, in "
                  "the pod's namespace): also what a CNI delivers past the host side after "
                  "rewriting it (Cilium's NodePort, LoadBalancer, hostPort to a local pod); "
                  "needs --kubernetes, TCX and CAP_SYS_ADMIN (daemonset/overlays/pod-side)"},
    )
    pin_path: str = field(
        default="/sys/fs/bpf/cniflow",
        metadata={"parse": _pin_path, "help":
                  "directory on a bpffs where the maps, the TCX links and the not yet exported "
                  "flows live, so a killed or updated agent's successor adopts them and loses "
                  "nothing; off: no pins, a restart loses what was not exported"},
    )
    handover: str = field(
        default="auto",
        metadata={"parse": _handover, "help":
                  "on SIGTERM, true: leave the pins (maps, links, pending flows) for the next "
                  "agent; false: export everything, detach and unpin; auto: with "
                  "--kubernetes, leave the links and maps (no gap in counting) but export "
                  "everything when this pod's DaemonSet will start another agent here (a "
                  "rolling update), false when not (an uninstall) or unsure"},
    )
    cluster_cidr: list[str] = field(
        default_factory=list,
        metadata={"parse": _cidrs, "many": True, "help":
                  "the cluster's pod address ranges (repeatable or comma-separated): the other "
                  "end of a flow in them is inter-node (flowType 2), outside them external"},
    )
    pod_labels: list[str] = field(
        default_factory=list,
        metadata={"parse": _label_keys, "many": True, "help":
                  "pod label keys (comma-separated or repeatable) whose values records carry "
                  "as JSON text in Antrea's sourcePodLabels / destinationPodLabels; none: "
                  "those elements are not sent"},
    )
    enterprise_number: int = field(
        default=0,
        metadata={"parse": _ranged(0, 0xFFFFFFFF), "help":
                  "IANA private enterprise number to carry the pods' workload kind and name "
                  "under (elements 1 to 4, announced by RFC 5610 records); 0: not sent "
                  "(cniflow has no registered number of its own)"},
    )
    workload_series_limit: int = field(
        default=500,
        metadata={"parse": _ranged(1, 100_000), "help":
                  "most workloads, and most Services, with Prometheus series; traffic of "
                  "more is counted in cniflow_series_limited_packets_total"},
    )
    cilium_endpoints: str = field(
        default="/sys/fs/bpf/tc/globals/cilium_lxc",
        metadata={"parse": str, "help":
                  "Cilium's pinned endpoint map, read to find pods' lxc interfaces where Cilium "
                  "installs no per-pod routes"},
    )
    dataplane: str = field(
        default="auto",
        metadata={"parse": _choice("auto", "ebpf", "vpp"), "help":
                  "ebpf (TC on veths), vpp (VPP's flowprobe, mediated), or auto: vpp when a "
                  "VPP API socket is found"},
    )
    vpp_socket: str = field(
        default="",
        metadata={"parse": str, "help": "VPP API socket; default: the first that exists of "
                  + ", ".join(VPP_SOCKETS)},
    )
    vpp_collector_address: str = field(
        default="",
        metadata={"parse": _ip_or_empty, "help":
                  "host address VPP sends IPFIX to, where the agent listens; default: "
                  "discovered (Contiv: --vpp-host-interface; Calico/VPP: the node IP)"},
    )
    vpp_source_address: str = field(
        default="",
        metadata={"parse": _ip_or_empty, "help":
                  "VPP's source address for IPFIX; default: discovered (Contiv: VPP's end of "
                  "the host interconnect; Calico/VPP: 169.254.0.1)"},
    )
    vpp_vrf: int = field(
        default=-1,
        metadata={"parse": _ranged(-1, 0xFFFFFFFE), "help":
                  "VPP table the IPFIX is routed in; -1: discovered (Contiv 0; Calico/VPP: "
                  "the host-tap table)"},
    )
    vpp_host_interface: str = field(
        default="vpp1",
        metadata={"parse": str, "help":
                  "Contiv-VPP: the host's end of the VPP interconnect (its IPv4 is the default "
                  "collector address)"},
    )
    vpp_port: int = field(
        default=4739,
        metadata={"parse": _ranged(1, 65535), "help":
                  "UDP port VPP sends to and the agent listens on (19.08 sends data to 4739 "
                  "whatever is set)"},
    )
    vpp_path_mtu: int = field(
        default=1450,
        metadata={"parse": _ranged(68, 1450), "help": "VPP's IPFIX path MTU"},
    )
    vpp_template_interval: int = field(
        default=20,
        metadata={"parse": _ranged(1, 3600), "help": "seconds between VPP's template resends"},
    )
    vpp_observation_domain_id: int = field(
        default=0,
        metadata={"parse": _ranged(0, 0xFFFFFFFF), "help":
                  "observation domain of the mediated VPP records; 0: --observation-domain-id "
                  "+ 1000"},
    )
    metrics_address: str = _metrics_address("0.0.0.0:9477")
    log_level: str = _log_level()
    log_format: str = _log_format()

    @property
    def collector_host_port(self) -> tuple[str, int]:
        return host_port(self.collector)


SETTINGS = fields(Config)


def kafka_url(url: str) -> tuple[str, str]:
    """kafka://HOST:PORT[,HOST:PORT...]/TOPIC -> (bootstrap servers, topic)."""
    rest = url.removeprefix("kafka://")
    brokers, _, topic = rest.partition("/")
    if not brokers or not topic:
        raise ValueError(f"must be kafka://HOST:PORT[,HOST:PORT]/TOPIC, got {url!r}")
    return brokers, topic


def _outputs(text: str) -> list[str]:
    out = text.split()
    for o in out:
        if o.startswith("kafka://"):
            kafka_url(o)
    return out


def _kafka_options(text: str) -> list[str]:
    out = text.split()
    for o in out:
        if "=" not in o.strip("="):
            raise ValueError(f"must be KEY=VALUE, got {o!r}")
    return out


@dataclass
class CollectorConfig:
    """`cniflow collector`: its own settings, the same rules (CNIFLOW_COLLECTOR_...)."""

    listen: str = field(
        default="0.0.0.0:4739",
        metadata={"parse": lambda t: (host_port(t), t)[1], "help": "HOST:PORT to receive IPFIX on"},
    )
    transport: str = _transport()
    tls_cert: str = field(
        default="", metadata={"parse": str, "help": "with tls: the collector's certificate"}
    )
    tls_key: str = field(
        default="", metadata={"parse": str, "help": "with tls: the key of --tls-cert"}
    )
    tls_ca: str = field(
        default="", metadata={"parse": str, "help":
                              "with tls: CA file; if given, exporters must present a certificate "
                              "it signed"}
    )
    output: list[str] = field(
        default_factory=lambda: ["-"],
        metadata={"parse": _outputs, "many": True, "help":
                  "where JSON lines go: - (standard output), a file, or "
                  "kafka://HOST:PORT[,HOST:PORT]/TOPIC (repeatable: several at once)"},
    )
    kafka_compression: str = field(
        default="lz4", metadata={"parse": _choice("none", "gzip", "snappy", "lz4", "zstd"),
                                 "help": "with kafka://: compression of message batches"})
    kafka_queue: int = field(
        default=100_000,
        metadata={"parse": _ranged(1000, 10_000_000), "help":
                  "with kafka://: records waiting for the brokers (at most 128 MiB); "
                  "beyond it they are counted dropped"})
    kafka_flush_seconds: float = field(
        default=10.0, metadata={"parse": _positive(float), "help":
                                "with kafka://: at exit, how long queued records may take to "
                                "reach the brokers before they are counted dropped"})
    kafka_security: str = field(
        default="plaintext",
        metadata={"parse": _choice("plaintext", "ssl", "sasl_plaintext", "sasl_ssl"),
                  "help": "with kafka://: plaintext, ssl, sasl_plaintext or sasl_ssl"})
    kafka_tls_ca: str = field(
        default="", metadata={"parse": str, "help":
                              "with kafka:// and ssl: CA file of the brokers' certificates"})
    kafka_tls_cert: str = field(
        default="", metadata={"parse": str, "help":
                              "with kafka:// and ssl: client certificate, if brokers ask"})
    kafka_tls_key: str = field(
        default="", metadata={"parse": str, "help": "with kafka:// and ssl: its key"})
    kafka_sasl_mechanism: str = field(
        default="PLAIN", metadata={"parse": _choice("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"),
                                   "help": "with kafka:// and sasl_*: PLAIN or SCRAM-SHA-*"})
    kafka_sasl_username: str = field(
        default="", metadata={"parse": str, "help": "with kafka:// and sasl_*: user name"})
    kafka_sasl_password_file: str = field(
        default="", metadata={"parse": str, "help":
                              "with kafka:// and sasl_*: file holding the password (a Secret)"})
    kafka_option: list[str] = field(
        default_factory=list,
        metadata={"parse": _kafka_options, "many": True, "help":
                  "with kafka://: any librdkafka setting, KEY=VALUE (repeatable), e.g. "
                  "acks=all"})
    receive_buffer: int = field(
        default=8 << 20, metadata={"parse": _ranged(1 << 16, 1 << 30), "help":
                                   "UDP: octets of datagrams the socket holds while the "
                                   "collector is busy (past net.core.rmem_max with "
                                   "CAP_NET_ADMIN)"})
    workers: int = field(
        default=1, metadata={"parse": _ranged(1, 64), "help":
                             "receiving processes (SO_REUSEPORT); each exporter's records stay "
                             "in one"})
    rotate_bytes: int = field(
        default=100_000_000,
        metadata={"parse": _ranged(0, 1 << 40), "help":
                  "rotate the output file at this size (0: never); FILE.1 is the newest old one"},
    )
    rotate_keep: int = field(
        default=5, metadata={"parse": _ranged(1, 1000), "help": "rotated files kept"}
    )
    hold_seconds: float = field(
        default=5.0,
        metadata={"parse": _positive(float), "help":
                  "how long data waits for its template before it is counted as dropped"},
    )
    metrics_address: str = _metrics_address("0.0.0.0:9478")
    log_level: str = _log_level()
    log_format: str = _log_format()

    @property
    def listen_host_port(self) -> tuple[str, int]:
        return host_port(self.listen)

    def kafka_settings(self) -> dict:
        """librdkafka's configuration from the kafka_ settings (the password read from
        its file here, so a missing Secret is a clear error at start)."""
        conf = {"compression.type": self.kafka_compression,
                "queue.buffering.max.messages": self.kafka_queue,
                "queue.buffering.max.kbytes": 128 << 10,
                "security.protocol": self.kafka_security}
        for key, value in (("ssl.ca.location", self.kafka_tls_ca),
                           ("ssl.certificate.location", self.kafka_tls_cert),
                           ("ssl.key.location", self.kafka_tls_key)):
            if value:
                conf[key] = value
        if self.kafka_security.startswith("sasl"):
            conf["sasl.mechanism"] = self.kafka_sasl_mechanism
            conf["sasl.username"] = self.kafka_sasl_username
            if self.kafka_sasl_password_file:
                try:
                    conf["sasl.password"] = Path(self.kafka_sasl_password_file).read_text().strip()
                except OSError as e:
                    raise ConfigError(f"--kafka-sasl-password-file: {e.strerror}: "
                                      f"{self.kafka_sasl_password_file}") from None
        for option in self.kafka_option:
            key, _, value = option.partition("=")
            conf[key] = value
        return conf


COLLECTOR_SETTINGS = fields(CollectorConfig)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def env_name(name: str, prefix: str = "CNIFLOW_") -> str:
    return prefix + name.upper()


COLLECTOR_PREFIX = "CNIFLOW_COLLECTOR_"


def _parse(f, text: str, prefix: str = "CNIFLOW_"):
    try:
        return f.metadata["parse"](text)
    except ValueError as e:
        raise ConfigError(f"{flag(f.name)} / {env_name(f.name, prefix)}: {e}") from None


def add_arguments(parser: argparse.ArgumentParser, settings=SETTINGS,
                  prefix: str = "CNIFLOW_") -> None:
    for f in settings:
        help_text = f"{f.metadata['help']} [{env_name(f.name, prefix)}]"
        if f.metadata.get("switch"):
            parser.add_argument(
                flag(f.name), dest=f.name, action="store_const", const="true", help=help_text
            )
            continue
        parser.add_argument(
            flag(f.name),
            dest=f.name,
            metavar=f.name.upper(),
            action="append" if f.metadata.get("many") else "store",
            help=help_text,
        )


def _values(args, env, settings, prefix) -> dict:
    values = {}
    for f in settings:
        given = getattr(args, f.name, None)
        if given is not None:
            if f.metadata.get("many"):
                values[f.name] = [p for g in given for p in _parse(f, g, prefix)]
            else:
                values[f.name] = _parse(f, given, prefix)
        elif env_name(f.name, prefix) in env:
            values[f.name] = _parse(f, env[env_name(f.name, prefix)], prefix)
    return values


def collector_from_sources(args: argparse.Namespace,
                           env: Mapping[str, str] = os.environ) -> CollectorConfig:
    return CollectorConfig(**_values(args, env, COLLECTOR_SETTINGS, COLLECTOR_PREFIX))


def from_sources(args: argparse.Namespace, env: Mapping[str, str] = os.environ) -> Config:
    """Flags win over CNIFLOW_ variables, which win over defaults."""
    cfg = Config(**_values(args, env, SETTINGS, "CNIFLOW_"))
    if cfg.kubernetes and not cfg.node_name:
        cfg.node_name = env.get("NODE_NAME", "")
        if not cfg.node_name:
            raise ConfigError("--node-name / CNIFLOW_NODE_NAME (or NODE_NAME) is needed "
                              "with --kubernetes")
    if cfg.kubernetes:  # the downward API's, as the DaemonSet sets them
        cfg.pod_name = cfg.pod_name or env.get("POD_NAME", "")
        cfg.pod_namespace = cfg.pod_namespace or env.get("POD_NAMESPACE", "")
    if cfg.pod_side and (not cfg.kubernetes or cfg.dataplane == "vpp"):
        raise ConfigError("--pod-side / CNIFLOW_POD_SIDE needs --kubernetes (the pods' "
                          "addresses) and the ebpf dataplane")
    return cfg
