"""``tokenguard``: one command for operators.

    tokenguard aggregator [...]                      run the service (same flags as python -m aggregator)
    tokenguard limits set acme --tokens 2000000      set a tenant's limit (--default for everyone else)
    tokenguard limits get acme | list | delete acme
    tokenguard usage show [--tenant acme] [--period 2026-11]
    tokenguard verify                                independent recompute; exit 1 on any difference
    tokenguard replay [--since 2026-11-01]           rebuild totals from the usage topic (aggregators stopped)
    tokenguard topics create | check

Connection flags come first or after the subcommand; every one has an environment variable.
Exit codes: 0 done, 1 a check found a problem (differences, topic mismatch, no such limit),
2 usage error, 3 Kafka unreachable.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from dataclasses import replace
from datetime import datetime, timezone

from aggregator.changelog import read_changelog
from aggregator.config import AggregatorConfig
from aggregator.errors import AggregatorError
from aggregator.limits import LimitsFeed, delete_limit, write_limit
from aggregator.replay import replay
from aggregator.state import Limits
from producer.kafka_admin import TopicMismatchError, ensure_topics, topic_partitions
from schemas.limits import QuotaLimit


def _connection_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bootstrap-servers", help="Kafka bootstrap servers [KAFKA_BOOTSTRAP_SERVERS]")
    parser.add_argument("--topic-prefix", help="topic name prefix, default 'tokenguard.' [TOKENGUARD_TOPIC_PREFIX]")
    parser.add_argument("--group-id", help="aggregator consumer group [TOKENGUARD_GROUP_ID]")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokenguard", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("aggregator", help="run the aggregator service", add_help=False)

    limits = commands.add_parser("limits", help="per-tenant limits on the compacted limits topic")
    limit_commands = limits.add_subparsers(dest="action", required=True, metavar="ACTION")
    set_ = limit_commands.add_parser("set", help="set a tenant's limit, or the default with --default")
    set_.add_argument("tenant", nargs="?")
    set_.add_argument("--default", action="store_true", help="the limit of tenants without their own")
    set_.add_argument("--tokens", type=int, required=True, help="tokens per period")
    set_.add_argument("--period", choices=["any", "month", "week", "day"], default="any",
                      help="period keys the limit applies to (default: any)")
    set_.add_argument("--warning-ratio", type=float, help="fraction of the limit that triggers a warning notice")
    get = limit_commands.add_parser("get", help="show one tenant's limit (or --default)")
    get.add_argument("tenant", nargs="?")
    get.add_argument("--default", action="store_true")
    limit_commands.add_parser("list", help="every limit on the topic")
    delete = limit_commands.add_parser("delete", help="remove a tenant's limit (or --default)")
    delete.add_argument("tenant", nargs="?")
    delete.add_argument("--default", action="store_true")
    for sub in (set_, get, limit_commands.choices["list"], delete):
        _connection_flags(sub)

    usage = commands.add_parser("usage", help="current totals from the aggregator's changelog")
    usage_commands = usage.add_subparsers(dest="action", required=True, metavar="ACTION")
    show = usage_commands.add_parser("show", help="totals per tenant and period")
    show.add_argument("--tenant")
    show.add_argument("--period")
    show.add_argument("--json", action="store_true", help="one JSON object per line")
    _connection_flags(show)

    verify = commands.add_parser("verify", help="recompute totals from the usage topic and compare")
    verify.add_argument("--wait-s", type=float, default=60.0)
    _connection_flags(verify)

    replay = commands.add_parser(
        "replay", help="rebuild the aggregator's totals from the usage topic (stop the aggregators first)"
    )
    replay.add_argument("--since", type=datetime.fromisoformat,
                        help="count only events at or after this time (ISO 8601, UTC if no offset)")
    _connection_flags(replay)

    topics = commands.add_parser("topics", help="create the deployment's topics, or check them")
    topics.add_argument("action", choices=["create", "check"])
    topics.add_argument("--partitions", type=int, help="partitions of usage/totals/notices when creating")
    _connection_flags(topics)
    return parser


def _config(args: argparse.Namespace) -> AggregatorConfig:
    config = AggregatorConfig.from_env(group_id=getattr(args, "group_id", None))
    if getattr(args, "bootstrap_servers", None):
        config = replace(config, connection=replace(config.connection, bootstrap_servers=args.bootstrap_servers))
    prefix, partitions = getattr(args, "topic_prefix", None), getattr(args, "partitions", None)
    if prefix or partitions:
        config = replace(config, topics=replace(
            config.topics, prefix=prefix or config.topics.prefix, partitions=partitions or config.topics.partitions))
    return config


def _tenant(args: argparse.Namespace) -> str | None:
    if args.default == (args.tenant is not None):
        raise SystemExit("tokenguard: name a tenant or give --default (not both)")
    return None if args.default else args.tenant


async def _read_limits(config: AggregatorConfig) -> Limits:
    limits = Limits()

    async def ignore(_: str | None) -> None:
        return None

    feed = LimitsFeed(config, limits, on_change=ignore)
    await feed.start()
    await feed.stop()
    return limits


def _show_limit(limit: QuotaLimit) -> str:
    who = "(default)" if limit.tenant_id is None else limit.tenant_id
    ratio = f", warning at {limit.warning_ratio:.0%}" if limit.warning_ratio else ""
    return f"{who}: {limit.limit_tokens:,} tokens per {limit.period} period{ratio} (set {limit.updated_at:%Y-%m-%d %H:%M} UTC)"


async def _limits(args: argparse.Namespace, config: AggregatorConfig) -> int:
    if args.action == "set":
        if args.tokens < 0:
            raise SystemExit("tokenguard: --tokens must be >= 0")
        limit = QuotaLimit(tenant_id=_tenant(args), limit_tokens=args.tokens, period=args.period,
                           warning_ratio=args.warning_ratio, updated_at=datetime.now(timezone.utc))
        await write_limit(config.connection, config.topics, limit)
        print(f"set {_show_limit(limit)}")
        return 0
    if args.action == "delete":
        tenant = _tenant(args)
        await delete_limit(config.connection, config.topics, tenant)
        print(f"deleted the limit of {'(default)' if tenant is None else tenant}")
        return 0
    limits = await _read_limits(config)
    if args.action == "list":
        for limit in ([limits.topic_default] if limits.topic_default else []) + sorted(
            limits.per_tenant.values(), key=lambda item: item.tenant_id or ""
        ):
            print(_show_limit(limit))
        return 0
    tenant = _tenant(args)
    found = limits.topic_default if tenant is None else limits.per_tenant.get(tenant)
    if found is None:
        print(f"no limit set for {'(default)' if tenant is None else tenant}")
        return 1
    print(_show_limit(found))
    return 0


async def _usage(args: argparse.Namespace, config: AggregatorConfig) -> int:
    records = await read_changelog(config.connection, config.topics.totals)
    rows = [r for (tenant, period), r in sorted(records.items())
            if (args.tenant is None or tenant == args.tenant) and (args.period is None or period == args.period)]
    if args.json:
        for record in rows:
            print(record.model_dump_json())
        return 0
    print(f"{'tenant':<24} {'period':<12} {'used':>14} {'limit':>14} {'events':>10}  state")
    for r in rows:
        print(f"{r.tenant_id:<24} {r.period_key:<12} {r.used_tokens:>14,} {r.limit_tokens:>14,} {r.event_count:>10,}  {r.state}")
    return 0


async def _topics(args: argparse.Namespace, config: AggregatorConfig) -> int:
    if args.action == "create":
        partitions = await ensure_topics(config.connection, config.topics)
        for name, count in sorted(partitions.items()):
            print(f"{name}: {count} partitions")
        return 0
    problems = 0
    for spec in config.topics.specs():
        try:
            count = len(await topic_partitions(config.connection, spec.name))
            print(f"{spec.name}: {count} partitions")
        except TopicMismatchError as exc:
            print(f"MISSING {exc}")
            problems += 1
    return 1 if problems else 0


async def _replay(args: argparse.Namespace, config: AggregatorConfig) -> int:
    since = args.since.replace(tzinfo=args.since.tzinfo or timezone.utc) if args.since else None
    written = await replay(config, since=since)
    print(f"rebuilt {written} tenant-periods from {config.topics.usage}; group {config.group_id!r} resumes at its end")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["aggregator"]:
        from aggregator.__main__ import main as run_aggregator

        return run_aggregator(argv[1:])
    if argv[:1] == ["verify"]:
        from aggregator.__main__ import main as run_aggregator

        return run_aggregator(argv)
    args = build_parser().parse_args(argv)
    config = _config(args)
    handler = {"limits": _limits, "usage": _usage, "topics": _topics, "replay": _replay}[args.command]
    try:
        return asyncio.run(handler(args, config))
    except (TopicMismatchError, AggregatorError) as exc:
        print(f"tokenguard: {exc}", file=sys.stderr)
        return 1
    except (OSError, ConnectionError) as exc:
        print(f"tokenguard: cannot reach Kafka at {config.connection.bootstrap_servers}: {exc}", file=sys.stderr)
        return 3
    except Exception as exc:  # aiokafka's connection errors are not OSErrors
        if type(exc).__module__.startswith("aiokafka"):
            print(f"tokenguard: Kafka error at {config.connection.bootstrap_servers}: {exc!r}", file=sys.stderr)
            return 3
        raise


if __name__ == "__main__":
    sys.exit(main())
