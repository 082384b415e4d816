"""``python -m aggregator``: run the aggregator until SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from dataclasses import replace

from aggregator.config import AggregatorConfig
from aggregator.service import AggregatorService


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m aggregator",
        description=(
            "Consume usage events, keep exact token totals per tenant and period, and publish "
            "over-quota notices. Every flag has an environment variable; the flag wins."
        ),
    )
    parser.add_argument("--bootstrap-servers", help="Kafka bootstrap servers [KAFKA_BOOTSTRAP_SERVERS]")
    parser.add_argument("--topic-prefix", help="topic name prefix, default 'tokenguard.' [TOKENGUARD_TOPIC_PREFIX]")
    parser.add_argument("--partitions", type=int, help="partitions of usage/totals/notices when creating them [TOKENGUARD_PARTITIONS]")
    parser.add_argument("--group-id", help="consumer group, default 'tokenguard-aggregator' [TOKENGUARD_GROUP_ID]")
    parser.add_argument("--default-limit", type=int, help="tokens per tenant and period when the limits topic sets none; "
                        "without it, the limit each event carries [TOKENGUARD_DEFAULT_LIMIT]")
    parser.add_argument("--warning-ratio", type=float, help="fraction of the limit that triggers a warning notice, default 0.8")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> AggregatorConfig:
    config = AggregatorConfig.from_env(
        group_id=args.group_id, default_limit=args.default_limit, warning_ratio=args.warning_ratio
    )
    if args.bootstrap_servers:
        config = replace(config, connection=replace(config.connection, bootstrap_servers=args.bootstrap_servers))
    if args.topic_prefix or args.partitions:
        config = replace(
            config,
            topics=replace(
                config.topics,
                prefix=args.topic_prefix or config.topics.prefix,
                partitions=args.partitions or config.topics.partitions,
            ),
        )
    return config


async def serve(config: AggregatorConfig) -> int:
    service = AggregatorService(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return asyncio.run(serve(config_from_args(args)))


if __name__ == "__main__":
    sys.exit(main())
