"""`cniflow` command line: `cniflow agent ...`."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from agent import config

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

    try:
        agent = Agent(cfg)
    except (ResolveError, InterfaceError, config.ConfigError) as e:
        return fail(str(e))
    except TlsError as e:
        return fail(str(e))
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
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
    from agent.collector import Collector, Output, serve_metrics

    try:
        cfg = config.collector_from_sources(args)
    except config.ConfigError as e:
        return fail(str(e))
    logs.setup(cfg.log_level, cfg.log_format)
    try:
        output = Output(cfg.output, cfg.rotate_bytes, cfg.rotate_keep)
    except OSError as e:
        return fail(f"--output {cfg.output}: {e.strerror}")
    from agent.transport import TlsError, server_tls

    try:
        tls = server_tls(cfg.tls_cert, cfg.tls_key, cfg.tls_ca) if cfg.transport == "tls" else None
    except TlsError as e:
        output.close()
        return fail(str(e))
    collector = Collector(cfg, output, tls=tls)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        if cfg.metrics_address:
            serve_metrics(collector.metrics, cfg.metrics_address)
        collector.serve(stop)
    except OSError as e:  # the port is taken, the address is not ours
        return fail(f"--listen {cfg.listen}: {e.strerror or e}")
    finally:
        output.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "agent":
        return run_agent(args)
    if args.command == "collector":
        return run_collector(args)
    return USAGE_ERROR


if __name__ == "__main__":
    sys.exit(main())
