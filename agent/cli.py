"""`cniflow` command line: `cniflow agent ...`."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from agent import config
from agent.stopping import Stop, on_signals

log = logging.getLogger("cniflow")

USAGE_ERROR = 2


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line that names the problem, exit 2."""

    def error(self, message: str):  # type: ignore[override]
        sys.stderr.write(f"cniflow: error: {message}\n")
        sys.exit(USAGE_ERROR)


def parser() -> Parser:
    p = Parser(prog="cniflow", description="Pod-level IPFIX flow exporter")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    agent = sub.add_parser("agent", help="meter interfaces with eBPF and export IPFIX")
    config.add_arguments(agent)
    collector = sub.add_parser("collector", help="receive IPFIX and write JSON lines")
    config.add_arguments(collector, config.COLLECTOR_SETTINGS, config.COLLECTOR_PREFIX)
    return p


def fail(message: str) -> int:
    sys.stderr.write(f"cniflow: error: {message}\n")
    return USAGE_ERROR


def run_agent(args: argparse.Namespace) -> int:
    from agent import logs, memory
    from agent.interfaces import InterfaceError
    from agent.transport import ResolveError, TlsError

    try:
        cfg = config.from_sources(args)
    except config.ConfigError as e:
        return fail(str(e))
    if not cfg.interface and not cfg.kubernetes:
        return fail("nothing to meter: give --interface NAME or a glob (CNIFLOW_INTERFACE), "
                    "or --kubernetes")
    logs.setup(cfg.log_level, cfg.log_format)
    memory.keep_heap()

    from agent.pipeline import Agent

    # before the start-up, which loads and compiles the program and adopts pins (many
    # seconds on a slow node): a SIGTERM meanwhile ends the agent cleanly once it is up,
    # not by the signal's default action halfway through
    stop = Stop()
    on_signals(stop)
    try:
        agent = Agent(cfg)
    except (ResolveError, InterfaceError, config.ConfigError) as e:
        return fail(str(e))
    except TlsError as e:
        return fail(str(e))
    if cfg.metrics_address:
        try:
            addr = cfg.metrics_address
            agent.metrics.serve("0.0.0.0" + addr if addr.startswith(":") else addr)
        except OSError as e:
            agent.shutdown()
            return fail(f"--metrics-address {cfg.metrics_address}: {e}")
    agent.run(stop)
    return agent.exit_code


def run_collector(args: argparse.Namespace) -> int:
    from agent import logs

    try:
        cfg = config.collector_from_sources(args)
    except config.ConfigError as e:
        return fail(str(e))
    logs.setup(cfg.log_level, cfg.log_format)
    os.environ.setdefault("POLARS_MAX_THREADS", "1")  # more cores: --workers
    if cfg.workers > 1:
        from agent.workers import supervise

        return supervise(cfg, collect)
    return collect(cfg)


def collect(cfg: config.CollectorConfig, lock: str = "", metrics: bool = True) -> int:
    """One receiving process: its outputs, its socket, until SIGTERM; then the outputs
    are flushed (Kafka: what is queued gets --kafka-flush-seconds). With `lock`, a
    worker of agent/workers.py: SIGINT is the supervisor's to act on."""
    from agent.collector import JOIN_SECONDS, Collector, CollectorMetrics, serve_metrics
    from agent.outputs import FileOutput, KafkaOutput
    from agent.transport import TlsError, server_tls

    counters = CollectorMetrics()
    outputs: list = []
    try:
        for o in cfg.output:
            if o.startswith("kafka://"):
                outputs.append(KafkaOutput(o, cfg.kafka_settings(), cfg.kafka_flush_seconds,
                                           counters))
            else:
                outputs.append(FileOutput(o, cfg.rotate_bytes, cfg.rotate_keep, lock))
        tls = server_tls(cfg.tls_cert, cfg.tls_key, cfg.tls_ca) if cfg.transport == "tls" else None
    except OSError as e:
        return _close(outputs, fail(f"--output {o}: {e.strerror}"))
    except (TlsError, config.ConfigError) as e:
        return _close(outputs, fail(str(e)))
    except Exception as e:  # noqa: BLE001  (librdkafka refusing a setting: KafkaException)
        return _close(outputs, fail(f"--output {o}: {e}"))
    collector = Collector(cfg, outputs, counters, tls=tls)
    stop = Stop()
    on_signals(stop, (signal.SIGTERM,) if lock else (signal.SIGTERM, signal.SIGINT))
    try:
        if metrics and cfg.metrics_address:
            serve_metrics(collector.metrics, cfg.metrics_address)
        collector.serve(stop)
    except OSError as e:  # the port is taken, the address is not ours
        return fail(f"--listen {cfg.listen}: {e.strerror or e}")
    finally:
        # a receiver still in a file's write keeps that file open: the kernel closes it
        _close([o for o in outputs if not (collector.stuck and isinstance(o, FileOutput))], 0)
        log.info("collector stopped", extra={"pid": os.getpid(), **{
            k: collector.decoder.stats[k] for k in ("messages", "records")}})
    if collector.gone is not None:
        sys.stderr.write(f"cniflow: error: {collector.gone}; "
                         f"{collector.gone.output.undelivered()} records not delivered\n")
        return 1
    if collector.stuck:
        sys.stderr.write(f"cniflow: error: an output did not return within {JOIN_SECONDS:g} s "
                         "of the stop: the batches being written to it are lost\n")
        return 1
    return 0


def _close(outputs: list, code: int) -> int:
    for output in outputs:
        output.close()
    return code


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "agent":
        return run_agent(args)
    if args.command == "collector":
        return run_collector(args)
    return USAGE_ERROR


if __name__ == "__main__":
    sys.exit(main())
