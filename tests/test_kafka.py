"""`cniflow collector` to Kafka, against a real Kafka-protocol broker (Tansu, started
by the tests), read back with a stock consumer (confluent-kafka)."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import socket
import subprocess
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from broker import Broker, DenyingFront, SaslFront, TlsFront, free_port
from conftest import CNIFLOW, terminate, wait_for

from agent.ipfix import flows as flowmap
from agent.ipfix.message import Template, encode_records, message, pack, template_sets
from agent.jsonlines import flow_key
from agent.records import FLOW_DTYPE

FIXED = Template.of(400, flowmap.V4 + flowmap.COMMON)


def ipfix(n: int, seed: int, domain: int = 9) -> list[bytes]:
    """A template message, then data messages of `n` records: flows between 40 hosts
    with both directions of many connections, so one flow key has several records."""
    rng = np.random.default_rng(seed)
    f = np.zeros(n, FLOW_DTYPE)
    k = f["key"]
    k["ip_version"], k["ifindex"] = 4, 7
    k["proto"] = rng.choice([6, 17], n)
    a, b = rng.integers(1, 40, n), rng.integers(1, 40, n)
    pa, pb = rng.integers(1024, 1040, n), rng.choice([53, 80, 443], n)
    swap = rng.random(n) < 0.5  # the reply direction of the same connection
    k["src"][:, :2], k["dst"][:, :2] = [10, 1], [10, 1]
    k["src"][:, 3], k["dst"][:, 3] = np.where(swap, b, a), np.where(swap, a, b)
    k["sport"], k["dport"] = np.where(swap, pb, pa), np.where(swap, pa, pb)
    f["packets"] = rng.integers(1, 1000, n)
    f["octets"] = f["packets"] * 100
    f["first_ms"], f["last_ms"], f["end_reason"] = 1_795_000_000_000, 1_795_000_001_000, 1
    groups = encode_records(FIXED, flowmap.columns(f, {}), n)
    msgs = pack(FIXED.id, groups, 1400, 1_795_000_000, domain, 0)
    buf = msgs.buf.tobytes()
    return [message(template_sets([FIXED]), 1_795_000_000, 0, domain)] + [
        buf[o : o + ln] for o, ln in zip(msgs.offsets.tolist(), msgs.lengths.tolist(),
                                         strict=True)]


class Collector:
    """`cniflow collector` on host loopback writing a file and/or Kafka."""

    def __init__(self, tmp: Path, *outputs: str, extra: tuple[str, ...] = ()) -> None:
        self.port, self.metrics_port = free_port(), free_port()
        self.out = tmp / "records.jsonl"
        self.log = tmp / "collector.log"
        self.proc = subprocess.Popen(
            [str(CNIFLOW), "collector", "--listen", f"127.0.0.1:{self.port}",
             "--metrics-address", f"127.0.0.1:{self.metrics_port}",
             *[a for o in outputs for a in ("--output", o)], *extra],
            stderr=self.log.open("w"))
        assert wait_for(self._listening, 15), self.log.read_text()
        workers = int(extra[extra.index("--workers") + 1]) if "--workers" in extra else 1
        proto = "t" if "tcp" in extra else "u"
        assert wait_for(lambda: len(subprocess.run(  # every worker's socket bound
            ["ss", f"-ln{proto}H", f"sport = :{self.port}"], capture_output=True,
            text=True).stdout.splitlines()) == workers, 15), self.log.read_text()

    def _listening(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.metrics_port), 0.2).close()
            return True
        except OSError:
            assert self.proc.poll() is None, self.log.read_text()
            return False

    def send(self, msgs: list[bytes], sock: socket.socket | None = None) -> None:
        s = sock or socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for i, m in enumerate(msgs):
            s.sendto(m, ("127.0.0.1", self.port))
            if i % 20 == 19:
                time.sleep(0.005)  # within the socket's buffer on a busy machine: the
                # tests count exactly (a drop would show in cniflow_collector_socket_drops)

    def metrics(self) -> dict[str, float]:
        import urllib.request

        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics").read()
        vals: dict[str, float] = defaultdict(float)
        for line in text.decode().splitlines():
            if line and not line.startswith("#"):
                k, _, v = line.rpartition(" ")
                vals[k.split("{")[0]] += float(v)
        return vals

    def lines(self) -> list[bytes]:
        return self.out.read_bytes().splitlines() if self.out.exists() else []

    def stop(self) -> None:
        assert terminate(self.proc, self.log) == 0, self.log.read_text()


@contextlib.contextmanager
def collector_process(tmp_path: Path, *args: str, stdout=None):
    """`cniflow collector` with `args` on a free port: (process, its log, its port);
    killed whatever the test did."""
    log = tmp_path / "log"
    port = free_port()
    proc = subprocess.Popen([str(CNIFLOW), "collector", "--listen", f"127.0.0.1:{port}",
                             *args], stdout=stdout, stderr=log.open("w"))
    try:
        yield proc, log, port
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def stalled_collector(tmp_path: Path, *args: str):
    """The collector writing to standard output, a pipe nobody reads."""
    return collector_process(tmp_path, "--output", "-", *args, stdout=subprocess.PIPE)


def rotated_lines(tmp_path: Path) -> list[dict]:
    """Every line of records.jsonl and its rotated files, parsed (each must be whole)."""
    return [json.loads(x) for f in tmp_path.glob("records.jsonl*")
            for x in f.read_bytes().splitlines()]


@pytest.fixture
def broker():
    b = Broker().start()
    try:
        yield b
    finally:
        b.stop()


def test_kafka_messages_equal_the_json_lines_and_each_flow_keeps_to_one_partition(tmp_path,
                                                                                   broker):
    broker.topic("flows", 3)
    c = Collector(tmp_path, str(tmp_path / "records.jsonl"), f"kafka://{broker.address}/flows")
    try:
        c.send(ipfix(6000, seed=1))
        assert wait_for(lambda: c.metrics()["cniflow_collector_kafka_delivered_total"] >= 6000, 30)
        m = c.metrics()
        assert m["cniflow_collector_kafka_delivered_total"] == 6000
        assert m["cniflow_collector_kafka_failed_total"] == 0
        assert m["cniflow_collector_kafka_dropped_total"] == 0
    finally:
        c.stop()
    got = broker.consume("flows", 6000)
    lines = c.lines()
    assert len(lines) == 6000
    assert sorted(v for _, _, v in got) == sorted(lines)  # the same JSON, byte for byte
    partitions: dict[bytes, set[int]] = defaultdict(set)
    for part, key, value in got:
        assert key == flow_key(json.loads(value))
        partitions[key].add(part)
    assert all(len(p) == 1 for p in partitions.values())  # both directions too
    assert {p for ps in partitions.values() for p in ps} == {0, 1, 2}
    both_ways = [k for k in partitions if sum(1 for _, key, v in got if key == k
                                              and b'"sourceTransportPort":53' in v)]
    assert both_ways  # keys that carry replies as well as requests


def test_while_the_brokers_are_away_records_wait_in_the_bounded_queue(tmp_path):
    """No broker yet: the first --kafka-queue records wait, the rest are counted dropped
    at once (reception goes on: the file gets them all); the broker comes, the waiting
    records are delivered, exactly those."""
    broker = Broker()
    c = Collector(tmp_path, str(tmp_path / "records.jsonl"), f"kafka://{broker.address}/flows",
                  extra=("--kafka-queue", "1000"))
    try:
        c.send(ipfix(2500, seed=2))
        assert wait_for(lambda: len(c.lines()) == 2500, 20)
        assert wait_for(lambda: c.metrics()["cniflow_collector_kafka_dropped_total"] == 1500, 10)
        assert c.metrics()["cniflow_collector_kafka_queued"] == 1000
        broker.start()
        broker.topic("flows", 2)
        assert wait_for(lambda: c.metrics()["cniflow_collector_kafka_delivered_total"] == 1000, 60)
        m = c.metrics()
        assert (m["cniflow_collector_kafka_queued"], m["cniflow_collector_kafka_failed_total"]) \
            == (0, 0)
        c.send(ipfix(500, seed=3))
        assert wait_for(lambda: c.metrics()["cniflow_collector_kafka_delivered_total"] == 1500, 30)
    finally:
        c.stop()
        got = broker.consume("flows", 1500)
        broker.stop()
    lines = c.lines()
    assert len(lines) == 3000
    assert sorted(v for _, _, v in got) == sorted(lines[:1000] + lines[2500:])


def test_sigterm_flushes_what_is_queued(tmp_path, broker):
    broker.topic("flows", 1)
    c = Collector(tmp_path, f"kafka://{broker.address}/flows",
                  extra=("--kafka-option", "linger.ms=5000"))  # held in the producer
    # 1,000 records' lines are some 450 kB: less than a request may carry (1 MB), which
    # librdkafka would send at once, linger or not
    c.send(ipfix(1000, seed=4))
    assert wait_for(lambda: c.metrics()["cniflow_collector_kafka_queued"] == 1000, 20)
    c.stop()
    assert len(broker.consume("flows", 1000)) == 1000


def test_a_record_the_producer_refuses_costs_only_itself(broker):
    """librdkafka refuses a record larger than message.max.bytes at produce(): that
    record is counted failed, and the records after it in the same piece still go."""
    from agent.collector import CollectorMetrics
    from agent.jsonlines import Lines
    from agent.outputs import KafkaOutput

    metrics = CollectorMetrics()
    out = KafkaOutput(f"kafka://{broker.address}/sizes", {"message.max.bytes": 1000}, 10,
                      metrics)
    lines = [b'{"n":%d,"pad":"%s"}' % (i, b"x" * (2000 if i % 5 == 2 else 10))
             for i in range(20)]
    out.write(Lines(b"\n".join(lines) + b"\n", 20))
    out.close()
    got = broker.consume("sizes", 16)
    assert sorted(v for _, _, v in got) == sorted(x for i, x in enumerate(lines) if i % 5 != 2)
    value = metrics.registry.get_sample_value
    assert value("cniflow_collector_kafka_failed_total") == 4
    assert value("cniflow_collector_kafka_delivered_total") == 16
    assert value("cniflow_collector_kafka_dropped_total") == 0


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_a_broker_that_refuses_the_producer_ends_the_collector_and_the_file_keeps_all(
        tmp_path, transport):
    """A broker whose ACLs do not let the collector write answers the idempotent
    producer's InitProducerId with CLUSTER_AUTHORIZATION_FAILED, fatal to librdkafka:
    this producer can never deliver. The records waiting for it are counted lost, the
    file still gets every line, and the collector exits 1 by itself, saying why (no
    further traffic needed to notice), so the kubelet restarts it and shows the crash
    loop; a stuck collector that looks healthy would hide it."""
    front = DenyingFront()
    broker = Broker(advertised=front.address)
    front.forward(broker.start())
    try:
        broker.topic("flows", 1)
        c = Collector(tmp_path, str(tmp_path / "records.jsonl"), f"kafka://{front.address}/flows",
                      extra=("--transport", transport))
        if transport == "udp":
            c.send(ipfix(500, seed=5))
        else:
            with socket.create_connection(("127.0.0.1", c.port)) as s:
                s.sendall(b"".join(ipfix(500, seed=5)))
        assert wait_for(lambda: c.metrics()["cniflow_collector_kafka_queued"] == 500, 20), \
            c.log.read_text()  # waiting for the producer id, which the front holds
        assert len(c.lines()) == 500
        front.release()
        c.proc.wait(20)
        assert broker.consume("flows", 1, timeout=3) == []
    finally:
        c.proc.kill()
        c.proc.wait()
        broker.stop()
        front.stop()
    log = c.log.read_text()
    assert c.proc.returncode == 1, log
    assert front.denied >= 1
    said = log.strip().splitlines()[-1]
    assert said.startswith("cniflow: error: --output kafka://") and \
        "Cluster authorization failed" in said, log
    assert "500 records not delivered" in said, log
    assert len(c.lines()) == 500 and all(json.loads(x) for x in c.lines())


def test_kafka_settings_librdkafka_refuses_are_a_clear_error(tmp_path):
    r = subprocess.run([str(CNIFLOW), "collector", "--output", "kafka://127.0.0.1:1/flows",
                        "--kafka-option", "no.such.setting=1", "--metrics-address", "off"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "no.such.setting" in r.stderr, r
    assert len(r.stderr.strip().splitlines()) == 1
    r = subprocess.run([str(CNIFLOW), "collector", "--output", "kafka://127.0.0.1:1"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "kafka://HOST:PORT" in r.stderr, r


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_workers_share_the_port_and_keep_each_exporter_whole(tmp_path, transport):
    """Two workers; 16 exporters (UDP: each sends its template once, then data: were one
    exporter's messages split between workers, the worker without its template would
    drop them; TCP: 16 connections spread over the workers). Every record arrives once,
    both workers received, the metrics are summed over them, and the shared file,
    rotated by whichever worker fills it, holds whole lines only."""
    out = tmp_path / "records.jsonl"
    c = Collector(tmp_path, str(out), extra=("--workers", "2", "--transport", transport,
                                             "--rotate-bytes", "2000000",
                                             "--rotate-keep", "100"))
    kind = socket.SOCK_DGRAM if transport == "udp" else socket.SOCK_STREAM
    socks = [socket.socket(socket.AF_INET, kind) for _ in range(16)]
    try:
        for i, s in enumerate(socks):
            msgs = ipfix(2000, seed=10 + i, domain=i)
            if transport == "udp":
                c.send(msgs, s)
            else:
                s.connect(("127.0.0.1", c.port))
                s.sendall(b"".join(msgs))

        # the files are read once the workers stopped: read while one rotates, a file
        # could be renamed between listing and reading
        assert wait_for(lambda: c.metrics().get("cniflow_collector_lines_total") == 32_000,
                        30), c.metrics()
        m = c.metrics()
        assert m["cniflow_collector_records_total"] == 32_000
        assert m["cniflow_collector_dropped_sets_total"] == 0
    finally:
        for s in socks:
            s.close()
        c.stop()
    assert len(list(tmp_path.glob("records.jsonl.*"))) >= 2  # rotated, by both workers
    rows = rotated_lines(tmp_path)  # every line whole
    assert len(rows) == 32_000
    by_exporter = defaultdict(int)
    for r in rows:
        by_exporter[r["@exporter"]] += 1
    assert sorted(by_exporter.values()) == [2000] * 16
    stopped = [json.loads(line) for line in c.log.read_text().splitlines()
               if '"collector stopped"' in line]
    assert len(stopped) == 2 and all(s["records"] > 0 for s in stopped), stopped
    assert sum(s["records"] for s in stopped) == 32_000
    assert len({s["pid"] for s in stopped}) == 2 and os.getpid() not in {
        s["pid"] for s in stopped}


def test_stopped_while_exporters_stream_over_tcp_every_record_decoded_is_written(tmp_path):
    """SIGTERM while four exporters stream over TCP: the connections end their batches
    before the file closes, so the collector exits 0 and its file holds, whole, a line
    for every record it decoded (none decoded and then lost)."""
    import threading

    c = Collector(tmp_path, str(tmp_path / "records.jsonl"), extra=("--transport", "tcp"))
    msgs = b"".join(ipfix(2000, seed=3))
    done = threading.Event()

    def stream() -> None:
        with socket.create_connection(("127.0.0.1", c.port)) as s:
            try:
                while not done.is_set():
                    s.sendall(msgs)
            except OSError:  # the collector went away mid-stream
                pass

    senders = [threading.Thread(target=stream) for _ in range(4)]
    for t in senders:
        t.start()
    try:
        assert wait_for(lambda: c.metrics().get("cniflow_collector_lines_total", 0) > 50_000,
                        30)
        c.stop()
    finally:
        done.set()
        for t in senders:
            t.join()
    stopped = [json.loads(x) for x in c.log.read_text().splitlines() if "collector stopped" in x]
    rows = rotated_lines(tmp_path)
    assert len(rows) == stopped[0]["records"] > 50_000


def _stall(transport: str, port: int, seed: int) -> None:
    """2.5 MB of lines from one exporter: a pipe holds 64 KB."""
    if transport == "tcp":
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"".join(ipfix(5000, seed=seed)))
            time.sleep(1)
        return
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for m in ipfix(5000, seed=seed):
            s.sendto(m, ("127.0.0.1", port))
            time.sleep(0.0005)
    time.sleep(1)


@pytest.mark.parametrize("transport", ["tcp", "udp"])
def test_sigterm_stops_the_collector_even_while_its_output_is_stalled(tmp_path, transport):
    """The lines go to standard output, a pipe nobody reads: the receiver that fills it
    (a TCP connection's thread, the UDP receiving thread) blocks in write(), holding the
    collector's lock. SIGTERM still stops the process within the receivers' deadline
    (5 s), saying what was left behind."""
    with stalled_collector(tmp_path, "--transport", transport) as (proc, log, port):
        assert wait_for(lambda: "collector listening" in log.read_text(), 15)
        _stall(transport, port, 4)
        started = time.monotonic()
        assert terminate(proc, log, 15) == 1  # lines were lost: said, and in the exit code
        assert time.monotonic() - started < 10
        assert "receivers still writing at exit" in log.read_text()
        assert "an output did not return within 5 s of the stop" in log.read_text()


def test_a_sigterm_the_kernel_gives_another_thread_still_stops_the_collector(tmp_path):
    """Python runs signal handlers in the main thread only: a SIGTERM delivered to the
    UDP receiving thread (the kernel may pick any thread that does not block it) must
    still wake the main thread, which waits for the stop."""
    with collector_process(tmp_path, "--output", str(tmp_path / "records.jsonl")) as (
            proc, log, _):
        assert wait_for(lambda: "collector listening" in log.read_text(), 15)
        others = [int(t) for t in os.listdir(f"/proc/{proc.pid}/task") if int(t) != proc.pid]
        assert others
        libc = ctypes.CDLL(None, use_errno=True)
        started = time.monotonic()
        assert libc.syscall(234, proc.pid, others[-1], signal.SIGTERM) == 0  # tgkill
        assert proc.wait(10) == 0
        assert time.monotonic() - started < 3


def _workers_of(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def test_workers_stuck_in_a_stalled_output_still_stop(tmp_path):
    """--workers 2 over UDP, lines to a pipe nobody reads: the worker that fills it
    blocks in write(); it still stops within its receivers' deadline on SIGTERM (exit
    1: lines lost), and the supervisor with it, without a kill."""
    with stalled_collector(tmp_path, "--workers", "2", "--kafka-flush-seconds", "0.1") as (
            proc, log, port):
        assert wait_for(lambda: log.read_text().count("collector listening") == 2, 15)
        _stall("udp", port, 5)  # one exporter: one worker
        started = time.monotonic()
        assert terminate(proc, log, 20) == 1  # that worker's lines were lost
        assert time.monotonic() - started < 12
        assert log.read_text().count("receivers still writing at exit") == 1
        assert "did not stop: killed" not in log.read_text()


def test_a_worker_that_cannot_stop_is_killed_and_the_supervisor_says_so(tmp_path):
    """A worker that does not act on SIGTERM (stopped here with SIGSTOP, as one in an
    uninterruptible write to a hung mount): the supervisor kills it once the deadline
    (--kafka-flush-seconds + 20 s) is over and exits 1, saying why."""
    with stalled_collector(tmp_path, "--workers", "2", "--kafka-flush-seconds", "0.1") as (
            proc, log, port):
        assert wait_for(lambda: log.read_text().count("collector listening") == 2, 15)
        stuck, other = _workers_of(proc.pid)
        os.kill(stuck, signal.SIGSTOP)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(40) == 1
        assert 19 < time.monotonic() - started < 30
        assert log.read_text().count("collector worker did not stop: killed") == 1
        assert wait_for(lambda: not any(Path(f"/proc/{p}").exists() for p in (stuck, other)), 5)


def test_the_kafka_overlays_collector_runs_against_a_broker(tmp_path, broker):
    """The collector container of daemonset/overlays/kafka as rendered: its command and
    environment, with only the node's paths and the brokers' address swapped for the
    lab's; records reach both the file and the topic."""
    from test_daemonset import containers, render

    c = containers(render(Path(__file__).resolve().parents[1] / "daemonset/overlays/kafka"))
    collector = c["collector"]
    out = tmp_path / "records.jsonl"
    port = free_port()
    cmd = [a.replace("/var/log/cniflow/records.jsonl", str(out))
           .replace("127.0.0.1:4739", f"127.0.0.1:{port}") for a in collector["command"]]
    cmd = [f"kafka://{broker.address}/cniflow-flows" if a.startswith("kafka://") else a
           for a in cmd]
    env = {**os.environ, **{e["name"]: e["value"] for e in collector["env"]},
           "CNIFLOW_COLLECTOR_METRICS_ADDRESS": "off"}
    broker.topic("cniflow-flows", 3)
    proc = subprocess.Popen([str(CNIFLOW), *cmd[1:]], env=env, stderr=subprocess.PIPE)
    try:
        time.sleep(2)
        assert proc.poll() is None, proc.stderr.read()
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for m in ipfix(1000, seed=5):
            s.sendto(m, ("127.0.0.1", port))
        assert wait_for(lambda: out.exists() and len(out.read_bytes().splitlines()) == 1000, 20)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    got = broker.consume("cniflow-flows", 1000)
    assert sorted(v for _, _, v in got) == sorted(out.read_bytes().splitlines())


def pki(tmp: Path) -> dict[str, str]:
    """A CA, the brokers' certificate for 127.0.0.1 and a client's, both signed by it,
    and another CA that signed neither."""
    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=tmp)

    for ca in ("ca", "other"):
        run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
            f"/CN={ca}", "-keyout", f"{ca}.key", "-out", f"{ca}.pem")
    (tmp / "san").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name in ("server", "client"):
        run("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout",
            f"{name}.key", "-out", f"{name}.csr")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "1", "-out", f"{name}.pem",
            *(["-extfile", "san"] if name == "server" else []))
    return {n: str(tmp / n) for n in ("ca.pem", "other.pem", "server.pem", "server.key",
                                      "client.pem", "client.key")}


def behind(tmp_path: Path, name: str, front, *args: str, file: bool = False) -> Collector:
    """A collector in a directory of its own writing to Kafka behind `front` (queued
    records get 1 s at exit) and, with file, to its own records.jsonl."""
    d = tmp_path / name
    d.mkdir()
    return Collector(d, *([str(d / "records.jsonl")] if file else []),
                     f"kafka://{front.address}/flows",
                     extra=("--kafka-flush-seconds", "1", *args))


def delivered_and_refused(broker: Broker, good: Collector, refused: list[Collector],
                          seeds: tuple[int, int]) -> None:
    """1,000 records to `good`, all delivered and read back equal to its file's lines;
    300 to each of `refused`, which the brokers do not let in: every one waits in the
    queue, none lost, none counted delivered, once librdkafka tried and retried."""
    good.send(ipfix(1000, seed=seeds[0]))
    for c in refused:
        c.send(ipfix(300, seed=seeds[1]))
    assert wait_for(lambda: good.metrics()["cniflow_collector_kafka_delivered_total"]
                    == 1000, 60), good.log.read_text()
    for c in refused:
        assert wait_for(lambda c=c: c.metrics()["cniflow_collector_kafka_queued"] == 300, 20)
    time.sleep(3)  # librdkafka has tried (and retried) by now
    for c in refused:
        m = c.metrics()
        assert (m["cniflow_collector_kafka_delivered_total"],
                m["cniflow_collector_kafka_queued"]) == (0, 300), c.log.read_text()
    got = broker.consume("flows", 1000)
    assert sorted(v for _, _, v in got) == sorted(good.lines())


def test_kafka_over_tls_verifies_the_brokers_and_presents_a_client_certificate(tmp_path):
    """Brokers behind TLS that requires client certificates (a terminating front: Tansu
    serves no TLS itself). With the CA and a client certificate every record arrives,
    read back over TLS equal to the file's lines; with a CA that did not sign the
    brokers' certificate, or without a client certificate, nothing is delivered, every
    record waits in the queue (none lost, none counted delivered) and the refusal is
    logged."""
    certs = pki(tmp_path)
    front = TlsFront(certs["server.pem"], certs["server.key"], client_ca=certs["ca.pem"])
    mine = {"security.protocol": "ssl", "ssl.ca.location": certs["ca.pem"],
            "ssl.certificate.location": certs["client.pem"],
            "ssl.key.location": certs["client.key"]}
    broker = Broker(advertised=front.address, client=mine)
    front.forward(broker.start())
    collectors = []
    try:
        broker.topic("flows", 2)
        for name, ca, cert, file in (("good", "ca.pem", True, True),
                                     ("wrong-ca", "other.pem", True, False),
                                     ("no-cert", "ca.pem", False, False)):
            collectors.append(behind(
                tmp_path, name, front, "--kafka-security", "ssl", "--kafka-tls-ca", certs[ca],
                *(("--kafka-tls-cert", certs["client.pem"], "--kafka-tls-key",
                   certs["client.key"]) if cert else ()), file=file))
        good, wrong_ca, no_cert = collectors
        delivered_and_refused(broker, good, [wrong_ca, no_cert], (7, 8))
        assert "certificate verify failed" in wrong_ca.log.read_text()
        assert "SSL" in no_cert.log.read_text() or "ssl" in no_cert.log.read_text()
        assert front.connections >= 2  # the producer and the consumer came through TLS
    finally:
        for c in collectors:
            c.stop()
        broker.stop()
        front.stop()
    for c in (wrong_ca, no_cert):  # at exit, what never reached a broker is said dropped
        assert "records not delivered at exit" in c.log.read_text()


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
def test_kafka_over_sasl_delivers_with_the_password_file_and_waits_without(tmp_path,
                                                                          mechanism):
    """Brokers behind SASL (a front that authenticates as Kafka's SASL listener does:
    Tansu cannot be given users). With the user and its password file (a Secret's file,
    trailing newline and all) every record arrives, read back over SASL equal to the
    file's lines; with a wrong password none is delivered, every record waits in the
    queue (none lost) and the refusal is logged."""
    password = "correct horse"
    front = SaslFront("flows", password)
    broker = Broker(advertised=front.address, client={
        "security.protocol": "sasl_plaintext", "sasl.mechanism": mechanism,
        "sasl.username": "flows", "sasl.password": password})
    front.forward(broker.start())
    collectors = []
    try:
        broker.topic("flows", 2)
        for name, secret in (("good", password), ("wrong", "battery staple")):
            (tmp_path / f"{name}.password").write_text(secret + "\n")
            collectors.append(behind(
                tmp_path, name, front, "--kafka-security", "sasl_plaintext",
                "--kafka-sasl-mechanism", mechanism, "--kafka-sasl-username", "flows",
                "--kafka-sasl-password-file", str(tmp_path / f"{name}.password"),
                file=name == "good"))
        good, wrong = collectors
        delivered_and_refused(broker, good, [wrong], (9, 10))
        assert "Authentication failed" in wrong.log.read_text(), wrong.log.read_text()
        assert front.authenticated >= 3 and front.refused >= 1  # admin, producer, consumer
    finally:
        for c in collectors:
            c.stop()
        broker.stop()
        front.stop()


def test_tls_and_sasl_settings_reach_librdkafka_as_it_names_them(tmp_path):
    """TLS and SASL are librdkafka's: the settings map onto its names, and librdkafka
    itself accepts them (a name or value it does not know fails here, as at start); both
    run against a broker in the tests above."""
    from confluent_kafka import Producer

    from agent.config import CollectorConfig, ConfigError

    pki = tmp_path / "ca.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=ca", "-keyout", str(tmp_path / "ca.key"), "-out", str(pki)],
                   check=True, capture_output=True)
    (tmp_path / "password").write_text("s3cret\n")
    cfg = CollectorConfig(kafka_security="sasl_ssl", kafka_tls_ca=str(pki),
                          kafka_sasl_mechanism="SCRAM-SHA-512", kafka_sasl_username="flows",
                          kafka_sasl_password_file=str(tmp_path / "password"),
                          kafka_option=["acks=all"])
    conf = cfg.kafka_settings()
    assert {k: conf[k] for k in ("security.protocol", "ssl.ca.location", "sasl.mechanism",
                                 "sasl.username", "sasl.password", "acks")} == {
        "security.protocol": "sasl_ssl", "ssl.ca.location": str(pki),
        "sasl.mechanism": "SCRAM-SHA-512", "sasl.username": "flows",
        "sasl.password": "s3cret", "acks": "all"}
    Producer({"bootstrap.servers": "127.0.0.1:1", **conf}).flush(0)  # librdkafka accepts
    missing = CollectorConfig(kafka_security="sasl_plaintext",
                              kafka_sasl_password_file=str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="--kafka-sasl-password-file"):
        missing.kafka_settings()
