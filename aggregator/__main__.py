"""``python -m aggregator``: run the aggregator until SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from dataclasses import replace

from aggregator.cli import (
    EXIT_OK,
    EXIT_PROBLEM,
    OneLineParser,
    UsageError,
    check_connection,
    connect_timeout,
    connect_timeout_flag,
    printable,
    run,
    usage_error,
)
from aggregator.config import AggregatorConfig
from aggregator.service import AggregatorService
from aggregator.verify import verify


def _common(parser: argparse.ArgumentParser, log_level: str = "INFO") -> None:
    parser.add_argument("--bootstrap-servers", help="Kafka bootstrap servers [KAFKA_BOOTSTRAP_SERVERS]")
    parser.add_argument("--topic-prefix", "--prefix", dest="topic_prefix",
                        help="topic name prefix, default 'tokenguard.' [TOKENGUARD_TOPIC_PREFIX]")
    parser.add_argument("--group-id", "--group", dest="group_id",
                        help="consumer group, default 'tokenguard-aggregator' [TOKENGUARD_GROUP_ID]")
    parser.add_argument("--log-level", default=log_level, choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    connect_timeout_flag(parser)


def parse_args(argv: list[str] | None = None, prog: str = "python -m aggregator") -> argparse.Namespace:
    """Usage errors exit 2 with one line on stderr."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["verify"]:
        parser = OneLineParser(
            prog=prog if prog.endswith("verify") else f"{prog} verify",
            description=(
                "Recompute totals from the usage topic by an independent code path (same validation, "
                "every repeated event id dropped) and compare them with the aggregator's changelog. "
                "Exit 0: no differences; 1: differences (printed), or the group did not catch up in time; "
                "2: usage error; 3: Kafka unreachable."
            ),
        )
        _common(parser, log_level="WARNING")  # an operator command: its report, then one line per problem
        parser.add_argument("--wait-s", type=float, default=60.0, help="how long to wait for the group to catch up")
        args = parser.parse_args(argv[1:])
        args.command = "verify"
        return args
    parser = OneLineParser(
        prog=prog,
        description=(
            "Consume usage events, keep exact token totals per tenant and period, and publish "
            "over-quota notices. Every flag has an environment variable; the flag wins. "
            "'python -m aggregator verify --help' for the verifier. Exit codes: 0 stopped by a signal, "
            "1 failed while running, 2 usage error, 3 Kafka unreachable at start."
        ),
    )
    _common(parser)
    parser.add_argument("--partitions", type=int, help="partitions of usage/totals/notices when creating them [TOKENGUARD_PARTITIONS]")
    parser.add_argument("--default-limit", type=int, help="tokens per tenant and period when the limits topic sets none; "
                        "without it, the limit each event carries [TOKENGUARD_DEFAULT_LIMIT]")
    parser.add_argument("--warning-ratio", type=float, help="fraction of the limit that triggers a warning notice, default 0.8")
    parser.add_argument("--metrics-port", type=int, help="serve /metrics, /healthz and /readyz on 127.0.0.1 at this port "
                        "[TOKENGUARD_METRICS_PORT]")
    parser.add_argument("--instance-id", help="static group membership id: a restart takes its partitions back at once "
                        "[TOKENGUARD_AGGREGATOR_INSTANCE_ID]")
    args = parser.parse_args(argv)
    args.command = "run"
    return args


def config_from_args(args: argparse.Namespace) -> AggregatorConfig:
    """The flags over the environment; ``ValueError`` (or ``UsageError``) for an invalid value."""
    if getattr(args, "wait_s", 0) < 0:
        raise UsageError(f"--wait-s must be >= 0, got {args.wait_s:g}")
    partitions = getattr(args, "partitions", None)
    if partitions is not None and not 1 <= partitions <= 10_000:
        raise UsageError(f"--partitions must be between 1 and 10000, got {partitions}")
    port = getattr(args, "metrics_port", None)
    if port is not None and not 0 < port < 65536:
        raise UsageError(f"--metrics-port must be a TCP port (1-65535), got {port}")
    config = AggregatorConfig.from_env(
        group_id=args.group_id,
        default_limit=getattr(args, "default_limit", None),
        warning_ratio=getattr(args, "warning_ratio", None),
        group_instance_id=getattr(args, "instance_id", None),
        metrics_port=getattr(args, "metrics_port", None),
    )
    if args.bootstrap_servers:
        config = replace(config, connection=replace(config.connection, bootstrap_servers=args.bootstrap_servers))
    check_connection(config.connection)
    if args.topic_prefix or partitions:
        config = replace(
            config,
            topics=replace(
                config.topics,
                prefix=args.topic_prefix or config.topics.prefix,
                partitions=partitions or config.topics.partitions,
            ),
        )
    return config


def dump_tasks() -> None:
    """SIGUSR1: print every asyncio task's stack to stderr, to see where a live process waits."""
    for task in asyncio.all_tasks():
        print(f"--- {task.get_name()}", file=sys.stderr)
        task.print_stack(file=sys.stderr)


async def serve(config: AggregatorConfig) -> int:
    service = AggregatorService(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, dump_tasks)
    await service.start()
    log = logging.getLogger("aggregator")
    log.info("aggregator %s consuming %s", config.aggregator_id, config.topics.usage)
    runner = asyncio.create_task(service.wait())
    stopper = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait({runner, stopper}, return_when=asyncio.FIRST_COMPLETED)
    failed = runner in done and runner.exception() is not None
    if failed:
        log.error("aggregator failed: %r", runner.exception())
    stopper.cancel()
    await service.stop()
    log.info("aggregator stopped: %s", service.stats)
    return 1 if failed else 0


async def run_verify(config: AggregatorConfig, wait_s: float) -> int:
    report = await verify(config.connection, config.topics, config.group_id, wait_s=wait_s)
    print(
        f"usage records read: {report.records}; events counted: {report.events}; "
        f"tenant-periods: {report.keys}; duplicates dropped: {report.duplicates}; "
        f"invalid: {report.invalid or 0}; group lag: {report.lag}"
    )
    for difference in report.differences:
        print(f"DIFFERENCE {printable(difference)}")
    print(f"differences: {len(report.differences)}")
    if report.lag > 0:
        print(f"the aggregator group {printable(repr(config.group_id))} is {report.lag} records behind; "
              "totals are not final")
        return EXIT_PROBLEM
    return EXIT_PROBLEM if report.differences else EXIT_OK


def main(argv: list[str] | None = None, *, prog: str = "python -m aggregator") -> int:
    """0 done, 1 a check found a problem (or the service failed), 2 usage error, 3 Kafka unreachable."""
    args = parse_args(argv, prog)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "verify" and args.log_level != "DEBUG":
        logging.getLogger("aiokafka").setLevel(logging.CRITICAL)  # retries, "password in the clear": noise here
    try:
        config = config_from_args(args)
        timeout_s = connect_timeout(args)
    except UsageError as exc:
        return usage_error(prog, str(exc))
    except ValueError as exc:  # AggregatorConfig's own checks, numbers in the environment
        return usage_error(prog, f"invalid setting: {exc}")
    if args.command == "verify":
        return run(prog, config.connection, timeout_s, lambda: run_verify(config, args.wait_s))
    return run(prog, config.connection, timeout_s, lambda: serve(config))


if __name__ == "__main__":
    sys.exit(main())
