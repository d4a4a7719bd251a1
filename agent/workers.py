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

    workers: list = []
    code = 0
    try:
        if cfg.metrics_address:
            try:
                _serve_metrics(state, cfg.metrics_address)
            except OSError as e:
                sys.stderr.write(f"cniflow: error: --metrics-address {cfg.metrics_address}: "
                                 f"{e}\n")
                return 2
        workers = [start(i) for i in range(cfg.workers)]
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
                try:
                    workers[i] = start(i)
                except OSError as e:  # no process to be had (a pids limit): next round
                    log.error("collector worker not restarted", extra={
                        "worker": i, "error": str(e)})
    except OSError as e:  # the first workers could not be started
        sys.stderr.write(f"cniflow: error: collector workers: {e}\n")
        code = 1
    finally:
        stopped = _stop(workers, cfg.kafka_flush_seconds + STOP_SECONDS)
        code = code or stopped
        shutil.rmtree(state, ignore_errors=True)
    return code


def _stop(workers: list, seconds: float) -> int:
    """SIGTERM to each (each flushes its outputs), one deadline for all; one that has
    not stopped by then (stuck in an output that does not return) is killed. The
    first non-zero exit code, a signal's as 1."""
    for p, _ in workers:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + seconds
    for p, _ in workers:
        p.join(max(0.0, deadline - time.monotonic()))
    code = 0
    for p, _ in workers:
        if p.is_alive():
            log.error("collector worker did not stop: killed", extra={"pid": p.pid})
            p.kill()
            p.join(5)
        exit_code = p.exitcode or 0
        code = code or (1 if exit_code < 0 else exit_code)
    return code


def _worker(collect: Callable[..., int], cfg: CollectorConfig, lock: str) -> None:
    """Starts with SIGTERM blocked (start()); collect() unblocks it once its handler is
    in (a SIGTERM meanwhile waits for it). The default action until then: were the
    inherited handler ever to run, it would set the supervisor's Stop, a copy."""
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
