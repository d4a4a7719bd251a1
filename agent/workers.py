"""`cniflow collector --workers N`: N receiving processes on one port.

Each worker binds the port with SO_REUSEPORT. The kernel picks a worker by hashing
the sender's address and port, so one exporter's messages (and its templates) stay
in one worker while it keeps its source port; TCP connections are spread the same
way and their templates die with them anyway. Workers write one file under a lock
(agent/outputs.py) and their metrics are summed by prometheus_client's multiprocess
mode; this supervisor serves them, restarts a worker that dies, and passes SIGTERM on.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable

from agent.config import CollectorConfig
from agent.stopping import Stop, on_signals

log = logging.getLogger(__name__)

STARTUP_SECONDS = 5.0  # a worker failing sooner failed on its settings: stop, do not loop
STOP_SECONDS = 20.0  # after --kafka-flush-seconds, a worker that has not stopped is killed
STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


def supervise(cfg: CollectorConfig, collect: Callable[..., int]) -> int:
    state = tempfile.mkdtemp(prefix="cniflow-collector-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = state  # before prometheus_client is imported
    lock = os.path.join(state, "output.lock")
    ctx = multiprocessing.get_context("fork")
    stop = Stop()
    on_signals(stop)

    def start(i: int):
        p = ctx.Process(target=_worker, args=(collect, cfg, lock), name=f"worker-{i}",
                        daemon=False)
        # blocked across the fork: a SIGTERM waits, in the worker, until collect()'s own
        # handler is in (the inherited one would set the supervisor's Stop, a copy)
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            p.start()
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        return p, time.monotonic()

    workers = [start(i) for i in range(cfg.workers)]
    code = 0
    try:
        if cfg.metrics_address:
            _serve_metrics(state, cfg.metrics_address)
        log.info("collector workers started", extra={"workers": cfg.workers})
        while not stop.wait(0.5):
            for i, (p, started) in enumerate(workers):
                if p.is_alive():
                    continue
                _dead(p.pid)
                if p.exitcode and time.monotonic() - started < STARTUP_SECONDS:
                    code = p.exitcode  # the worker said why on stderr
                    stop.set()
                    break
                log.warning("collector worker died; restarting",
                            extra={"worker": i, "exit_code": p.exitcode})
                workers[i] = start(i)
    except OSError as e:
        sys.stderr.write(f"cniflow: error: --metrics-address {cfg.metrics_address}: {e}\n")
        code = 2
    finally:
        for p, _ in workers:
            if p.is_alive():
                p.terminate()  # SIGTERM: each flushes its outputs
        for p, _ in workers:
            p.join(cfg.kafka_flush_seconds + STOP_SECONDS)
            if p.is_alive():  # stuck in an output that does not return
                log.error("collector worker did not stop: killed", extra={"pid": p.pid})
                p.kill()
                p.join()
            code = code or (p.exitcode or 0)
        shutil.rmtree(state, ignore_errors=True)
    return code


def _worker(collect: Callable[..., int], cfg: CollectorConfig, lock: str) -> None:
    """Starts with SIGTERM blocked (start()); collect() unblocks it once its handler is
    in. Should it fail first, the default action: the inherited handler would set the
    supervisor's Stop, a copy, and the worker would never stop."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides
    sys.exit(collect(cfg, lock=lock, metrics=False))


def _serve_metrics(path: str, address: str) -> None:
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=path)
    host, _, port = address.rpartition(":")
    start_http_server(int(port), addr=host or "0.0.0.0", registry=registry)


def _dead(pid: int | None) -> None:
    from prometheus_client import multiprocess

    if pid:
        multiprocess.mark_process_dead(pid)
