"""``tokenguard aggregator`` (the service) and ``tokenguard verify`` (its independent check)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import sys

import click

from aggregator.cli.contract import EXIT_OK, EXIT_PROBLEM, Command, run
from aggregator.cli.deploy import retention_options
from aggregator.cli.options import SERVICE_LOG, deployment_options, load, setting
from aggregator.cli.output import printable
from aggregator.config import AggregatorConfig
from aggregator.service import AggregatorService
from aggregator.verify import verify as recompute


def dump_tasks() -> None:
    """SIGUSR1: print every asyncio task's stack to stderr, to see where a live process waits."""
    for task in asyncio.all_tasks():
        print(f"--- {task.get_name()}", file=sys.stderr)
        task.print_stack(file=sys.stderr)


def tune_gc() -> None:
    """The aggregator keeps hundreds of thousands of long-lived objects (totals, dedup windows) and
    allocates a few per event; with CPython's default thresholds the cyclic collector rescans them
    every few thousand events (about a fifth of the per-event cost, measured). Its objects are
    freed by reference counting: fewer, larger young collections, and what exists once the state
    is restored frozen out of the full ones. A process-wide setting, so the command sets it, not
    the service (which an application may embed)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 10)


async def serve(config: AggregatorConfig) -> int:
    """Run until SIGTERM or SIGINT (0) or until the service fails (1)."""
    service = AggregatorService(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, dump_tasks)
    log = logging.getLogger("aggregator")
    # start() waits for Kafka as long as it takes; a signal meanwhile ends the wait (exit 0).
    starting = asyncio.create_task(service.start())
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait({starting, stopper}, return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():
        starting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await starting
        await service.stop()
        log.info("aggregator stopped before Kafka answered")
        return EXIT_OK
    starting.result()
    tune_gc()
    log.info("aggregator %s consuming %s", config.aggregator_id, config.topics.usage)
    runner = asyncio.create_task(service.wait())
    done, _ = await asyncio.wait({runner, stopper}, return_when=asyncio.FIRST_COMPLETED)
    failed = runner in done and runner.exception() is not None
    if failed:
        log.error("aggregator failed: %r", runner.exception())
    stopper.cancel()
    await service.stop()
    log.info("aggregator stopped: %s", service.stats)
    return EXIT_PROBLEM if failed else EXIT_OK


@click.command(cls=Command, short_help="run the aggregator service", epilog="Exit codes: 0 stopped by a signal (also while waiting for Kafka), 1 failed while running, "
               "or at start when the usage topic keeps events for less than its periods need, 2 usage error, "
               "3 Kafka unreachable at start (unless --wait-for-kafka: then it waits, logging every ~10 s). SIGUSR1 prints every asyncio task's stack to stderr.")
@deployment_options(log_default="INFO")
@setting("partitions", "--partitions", type=int, help="partitions of usage/totals/notices when creating them")
@setting("default_limit", "--default-limit", type=int, metavar="TOKENS",
         help="tokens per tenant and period when the limits topic sets none; without it, the limit each event carries")
@setting("warning_ratio", "--warning-ratio", type=float, help="fraction of the limit that publishes a warning notice")
@setting("group_instance_id", "--instance-id", metavar="ID",
         help="static group membership id: a restart takes its partitions back at once")
@setting("session_timeout_ms", "--session-timeout-ms", type=int, help="how long a silent member keeps its partitions")
@setting("dedup_window", "--dedup-window", type=int, metavar="EVENTS",
         help="event ids remembered per partition to drop duplicates")
@setting("reassert_interval_s", "--reassert-interval", type=float, metavar="SECONDS",
         help="every not-ok notice is published again this often")
@setting("metrics_port", "--metrics-port", type=int, metavar="PORT", help="serve /metrics, /healthz and /readyz at this port")
@setting("metrics_host", "--metrics-host", metavar="ADDRESS", help="the address the metrics endpoint listens on")
@setting("idempotence", "--idempotence/--no-idempotence",
         help="idempotent producer; off for Kafka-compatible services without it")
@retention_options
@setting("seal_periods", "--seal-periods/--no-seal-periods",
         help="seal each tenant-period --seal-grace after its period ends (final totals to the sealed topic)")
@setting("allow_short_retention", "--allow-short-retention/--no-allow-short-retention",
         help="start (with a warning) even if the usage topic keeps events for less than the periods need")
@setting("wait_for_kafka", "--wait-for-kafka/--no-wait-for-kafka",
         help="started before Kafka, wait for it (logged every ~10 s; /healthz 200, /readyz 503) instead of exit 3")
@click.pass_context
def aggregator(ctx: click.Context) -> int:
    """Run the aggregator: consume usage events, keep exact token totals per tenant and period,
    publish over-quota notices. Several processes with one group share the partitions."""
    settings, config = load(ctx, log_level="INFO", log_format=SERVICE_LOG, quiet_kafka=False)
    # Waiting, the service itself retries Kafka (AggregatorService.start); else the probe's exit 3.
    return run(ctx.command_path, config.connection, None if settings.wait_for_kafka else settings.connect_timeout_s,
               lambda: serve(config))


async def report(config: AggregatorConfig, wait_s: float) -> int:
    result = await recompute(config.connection, config.topics, config.group_id, wait_s=wait_s,
                             seal_grace_s=config.seal_grace_s if config.seal_periods else None)
    print(
        f"usage records read: {result.records}; events counted: {result.events}; "
        f"tenant-periods: {result.keys}; duplicates dropped: {result.duplicates}; "
        f"invalid: {result.invalid or 0}; group lag: {result.lag}"
        + (f"; sealed tenant-periods: {result.sealed}, adjustments: {result.adjustments}" if result.sealed else "")
    )
    for difference in result.differences:
        print(f"DIFFERENCE {printable(difference)}")
    for sealed in result.unverifiable:
        print(f"NOT VERIFIABLE {printable(sealed)}")
    if result.unverifiable:
        print(f"not verifiable (events before the usage topic's log start; kept as the aggregator counted "
              f"them, not differences): {len(result.unverifiable)}")
    print(f"differences: {len(result.differences)}")
    if result.lag > 0:
        print(f"the aggregator group {printable(repr(config.group_id))} is {result.lag} records behind; "
              "totals are not final")
        return EXIT_PROBLEM
    return EXIT_PROBLEM if result.differences else EXIT_OK


@click.command(cls=Command, short_help="recompute totals independently and compare, exit 1 on a difference",
               epilog="Exit codes: 0 no differences; 1 differences (printed), or the group did not "
               "catch up in time; 2 usage error; 3 Kafka unreachable.")
@deployment_options()
@setting("verify_wait_s", "--wait-s", type=float, metavar="SECONDS", help="how long to wait for the group to catch up")
@click.pass_context
def verify(ctx: click.Context) -> int:
    """Recompute totals from the usage topic by an independent code path (same validation, every
    repeated event id dropped) and compare them with the aggregator's changelog."""
    settings, config = load(ctx, log_format=SERVICE_LOG)
    return run(ctx.command_path, config.connection, settings.connect_timeout_s,
               lambda: report(config, settings.verify_wait_s))
