"""``tokenguard``: one command for operators.

    tokenguard aggregator [...]                      run the service (same flags as python -m aggregator)
    tokenguard limits set acme --tokens 2000000      set a tenant's limit (--default for everyone else)
    tokenguard limits get acme | list | delete acme
    tokenguard usage show [--tenant acme] [--period 2026-11]
    tokenguard verify                                independent recompute; exit 1 on any difference
    tokenguard replay [--since 2026-11-01]           rebuild totals from the usage topic (aggregators stopped)
    tokenguard topics create | check
    tokenguard acls --agent User:a --aggregator User:g --operator User:o [--apply]

Connection flags come first or after the subcommand; every one has an environment variable.
Exit codes: 0 done, 1 a check found a problem (differences, topic mismatch, no such limit),
2 usage error, 3 Kafka unreachable (or refusing: authentication, authorization).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import UTC, datetime
from typing import NoReturn, get_args

from aiokafka.client import AIOKafkaClient
from aiokafka.errors import KafkaConnectionError, KafkaError
from pydantic import TypeAdapter, ValidationError

from aggregator.acls import AclError, Principals, apply_acls, deployment_acls, kafka_acls_commands
from aggregator.changelog import read_changelog
from aggregator.config import AggregatorConfig
from aggregator.errors import AggregatorError
from aggregator.limits import LimitsFeed, delete_limit, write_limit
from aggregator.replay import replay
from aggregator.state import Limits
from schemas._types import Identifier
from schemas.errors import SchemaError
from schemas.limits import QuotaLimit
from schemas.totals import TotalsRecord
from transport.admin import TopicMismatchError, ensure_topics, topic_partitions
from transport.connection import KafkaConnection, SecurityProtocol
from transport.errors import TransportError

EXIT_OK, EXIT_PROBLEM, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
DEFAULT_CONNECT_TIMEOUT_S = 10.0


class UsageError(AggregatorError):
    """The command line or the environment asks for something invalid: exit 2, before any Kafka I/O."""


class KafkaUnreachableError(AggregatorError):
    """No Kafka answer within the connect timeout (or the cluster refused the connection): exit 3."""


# -- output an operator's terminal can trust ---------------------------------------------------


def printable(value: object) -> str:
    """``str(value)`` with every non-printable character (ESC and other controls, line breaks,
    bidi overrides, zero-width characters) written as its Python escape (``\\x1b``).

    Tenant ids, period keys and reasons come from topics anyone with write access may fill; raw,
    they could clear the operator's screen, forge lines or hide text. Printable text is unchanged.
    """
    text = str(value)
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in text)


def totals_row(record: TotalsRecord) -> str:
    """One ``usage show`` line."""
    return (f"{printable(record.tenant_id):<24} {printable(record.period_key):<12} {record.used_tokens:>14,} "
            f"{record.limit_tokens:>14,} {record.event_count:>10,}  {printable(record.state)}")


def totals_json(record: TotalsRecord) -> str:
    """One ``usage show --json`` line: exact values, every non-ASCII character escaped."""
    return json.dumps(record.model_dump(mode="json"), ensure_ascii=True)


def show_limit(limit: QuotaLimit) -> str:
    who = "(default)" if limit.tenant_id is None else printable(limit.tenant_id)
    ratio = f", warning at {limit.warning_ratio:.0%}" if limit.warning_ratio else ""
    return (f"{who}: {limit.limit_tokens:,} tokens per {printable(limit.period)} period{ratio} "
            f"(set {limit.updated_at:%Y-%m-%d %H:%M} UTC)")


# -- the exit-code contract --------------------------------------------------------------------


class OneLineParser(argparse.ArgumentParser):
    """argparse with its usage errors on one line (exit 2); ``--help`` still prints the usage."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: {printable(message)} (--help for usage)\n")


def validation_message(exc: ValidationError, flags: dict[str, str] | None = None) -> str:
    """A pydantic error as one line, naming the flag that set each field."""
    flags = flags or {}
    parts = []
    for error in exc.errors():
        field = ".".join(str(part) for part in error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        parts.append(f"{flags.get(field, field)}: {message}" if field else message)
    return "; ".join(parts)


def connect_timeout_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--connect-timeout", type=float, metavar="SECONDS",
        help=f"give up (exit 3) when Kafka does not answer within this, default {DEFAULT_CONNECT_TIMEOUT_S:g} "
        "[TOKENGUARD_CONNECT_TIMEOUT_S]",
    )


def connect_timeout(args: argparse.Namespace) -> float:
    value = getattr(args, "connect_timeout", None)
    if value is None:
        raw = os.environ.get("TOKENGUARD_CONNECT_TIMEOUT_S")
        try:
            value = float(raw) if raw else DEFAULT_CONNECT_TIMEOUT_S
        except ValueError:
            raise UsageError(f"TOKENGUARD_CONNECT_TIMEOUT_S must be a number of seconds, got {raw!r}") from None
    if not 0 < value <= 600:
        raise UsageError(f"the connect timeout must be more than 0 and at most 600 seconds, got {value:g}")
    return value


def check_connection(connection: KafkaConnection) -> None:
    """What aiokafka would only refuse later, with a traceback."""
    if connection.security_protocol not in get_args(SecurityProtocol):
        raise UsageError(f"KAFKA_SECURITY_PROTOCOL must be one of {', '.join(get_args(SecurityProtocol))}, "
                         f"got {connection.security_protocol!r}")
    if not connection.bootstrap_servers.strip():
        raise UsageError("no Kafka bootstrap servers given")


class _Capture(logging.Handler):
    """Keeps aiokafka's own account of a failed connection, for the one-line message."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.last: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.WARNING:
            self.last = record.getMessage()


async def probe(connection: KafkaConnection, timeout_s: float) -> None:
    """Return once the cluster answers a metadata request; ``KafkaUnreachableError`` if it does not
    within ``timeout_s``. Every command that talks to Kafka starts with it, so an unreachable
    cluster is one line and exit 3 within the timeout, whatever the command would do next."""
    capture = _Capture()
    logger = logging.getLogger("aiokafka")
    logger.addHandler(capture)
    propagate, logger.propagate = logger.propagate, False
    level = logger.level
    logger.setLevel(logging.WARNING)
    where = connection.bootstrap_servers
    try:
        client = AIOKafkaClient(**connection.client_kwargs(), client_id="tokenguard-probe",
                                request_timeout_ms=max(1000, int(timeout_s * 1000)))
        try:
            async with asyncio.timeout(timeout_s):
                await client.bootstrap()
        except TimeoutError:
            raise KafkaUnreachableError(f"Kafka at {where} did not answer within {timeout_s:g}s") from None
        except KafkaError as exc:
            raise KafkaUnreachableError(f"cannot reach Kafka at {where}: {capture.last or exc}") from None
        finally:
            await client.close()
    finally:
        logger.removeHandler(capture)
        logger.propagate = propagate
        logger.setLevel(level)


def exit_code(exc: BaseException, connection: KafkaConnection) -> tuple[int, str] | None:
    """The exit code and one-line message for an error that ends a command; None for a bug."""
    where = connection.bootstrap_servers
    if isinstance(exc, UsageError):
        return EXIT_USAGE, str(exc)
    if isinstance(exc, KafkaUnreachableError):
        return EXIT_UNREACHABLE, str(exc)
    if isinstance(exc, KafkaConnectionError | OSError):  # TimeoutError is an OSError
        return EXIT_UNREACHABLE, f"cannot reach Kafka at {where}: {exc or type(exc).__name__}"
    if isinstance(exc, KafkaError):
        return EXIT_UNREACHABLE, f"Kafka at {where} refused: {type(exc).__name__}: {exc}"
    if isinstance(exc, AggregatorError | TransportError | SchemaError):
        return EXIT_PROBLEM, str(exc)
    return None


def run(
    prog: str, connection: KafkaConnection, timeout_s: float | None, command: Callable[[], Awaitable[int]]
) -> int:
    """Run ``command`` (after a probe when ``timeout_s`` is given) under the exit-code contract."""

    async def guarded() -> int:
        if timeout_s is not None:
            await probe(connection, timeout_s)
        return await command()

    try:
        return asyncio.run(guarded())
    except Exception as exc:
        outcome = exit_code(exc, connection)
        if outcome is None:
            raise
        code, message = outcome
        print(f"{prog}: {printable(message)}", file=sys.stderr)
        return code


def usage_error(prog: str, message: str) -> int:
    print(f"{prog}: {printable(message)}", file=sys.stderr)
    return EXIT_USAGE


# -- the commands ------------------------------------------------------------------------------


def _connection_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bootstrap-servers", help="Kafka bootstrap servers [KAFKA_BOOTSTRAP_SERVERS]")
    parser.add_argument("--topic-prefix", "--prefix", dest="topic_prefix",
                        help="topic name prefix, default 'tokenguard.' [TOKENGUARD_TOPIC_PREFIX]")
    parser.add_argument("--group-id", "--group", dest="group_id",
                        help="aggregator consumer group, default 'tokenguard-aggregator' [TOKENGUARD_GROUP_ID]")
    connect_timeout_flag(parser)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="tokenguard", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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

    acls = commands.add_parser(
        "acls", help="the deployment's Kafka ACLs as kafka-acls.sh commands; --apply creates them",
        description="Print the ACLs each kind of client needs (agents, aggregators, operators) for one "
        "topic prefix and aggregator group, as kafka-acls.sh command lines. With --apply, create them "
        "through the admin API, connected as a principal allowed to alter ACLs.",
    )
    acls.add_argument("--agent", required=True, metavar="PRINCIPAL", help="the agents' principal, e.g. User:agent")
    acls.add_argument("--aggregator", required=True, metavar="PRINCIPAL", help="the aggregators' principal")
    acls.add_argument("--operator", required=True, metavar="PRINCIPAL", help="the operators' principal")
    acls.add_argument("--apply", action="store_true", help="create the ACLs now, and wait until they are in force")
    _connection_flags(acls)
    return parser


def _config(args: argparse.Namespace) -> AggregatorConfig:
    config = AggregatorConfig.from_env(group_id=getattr(args, "group_id", None))
    if getattr(args, "bootstrap_servers", None):
        config = replace(config, connection=replace(config.connection, bootstrap_servers=args.bootstrap_servers))
    prefix, partitions = getattr(args, "topic_prefix", None), getattr(args, "partitions", None)
    if partitions is not None and not 1 <= partitions <= 10_000:
        raise UsageError(f"--partitions must be between 1 and 10000, got {partitions}")
    if prefix is not None and not (prefix and prefix.isprintable() and len(prefix) <= 200):
        raise UsageError("--topic-prefix must be 1 to 200 printable characters")
    if prefix or partitions:
        config = replace(config, topics=replace(
            config.topics, prefix=prefix or config.topics.prefix, partitions=partitions or config.topics.partitions))
    check_connection(config.connection)
    return config


_IDENTIFIER = TypeAdapter(Identifier)


def _tenant(args: argparse.Namespace) -> str | None:
    if args.default == (args.tenant is not None):
        raise UsageError("name a tenant or give --default (not both)")
    if args.default:
        return None
    try:
        return _IDENTIFIER.validate_python(args.tenant)
    except ValidationError as exc:
        raise UsageError(f"tenant id {args.tenant!r}: {validation_message(exc)}") from None


def _new_limit(args: argparse.Namespace) -> QuotaLimit:
    try:
        return QuotaLimit(tenant_id=_tenant(args), limit_tokens=args.tokens, period=args.period,
                          warning_ratio=args.warning_ratio, updated_at=datetime.now(UTC))
    except ValidationError as exc:
        flags = {"tenant_id": "tenant", "limit_tokens": "--tokens", "warning_ratio": "--warning-ratio",
                 "period": "--period"}
        raise UsageError(validation_message(exc, flags)) from None


async def _read_limits(config: AggregatorConfig) -> Limits:
    limits = Limits()

    async def ignore(_: str | None) -> None:
        return None

    feed = LimitsFeed(config, limits, on_change=ignore)
    await feed.start()
    await feed.stop()
    return limits


def _limits(args: argparse.Namespace, config: AggregatorConfig) -> Callable[[], Awaitable[int]]:
    """Validate first (usage errors exit 2 before any Kafka I/O), then return the work."""
    if args.action == "set":
        limit = _new_limit(args)

        async def set_limit() -> int:
            await write_limit(config.connection, config.topics, limit)
            print(f"set {show_limit(limit)}")
            return EXIT_OK

        return set_limit
    tenant = _tenant(args) if args.action in ("get", "delete") else None
    who = "(default)" if tenant is None else printable(tenant)

    async def limits_command() -> int:
        if args.action == "delete":
            await delete_limit(config.connection, config.topics, tenant)
            print(f"deleted the limit of {who}")
            return EXIT_OK
        limits = await _read_limits(config)
        if args.action == "list":
            for item in ([limits.topic_default] if limits.topic_default else []) + sorted(
                limits.per_tenant.values(), key=lambda item: item.tenant_id or ""
            ):
                print(show_limit(item))
            return EXIT_OK
        found = limits.topic_default if tenant is None else limits.per_tenant.get(tenant)
        if found is None:
            print(f"no limit set for {who}")
            return EXIT_PROBLEM
        print(show_limit(found))
        return EXIT_OK

    return limits_command


def _usage(args: argparse.Namespace, config: AggregatorConfig) -> Callable[[], Awaitable[int]]:
    if args.tenant is not None:
        try:
            _IDENTIFIER.validate_python(args.tenant)
        except ValidationError as exc:
            raise UsageError(f"--tenant {args.tenant!r}: {validation_message(exc)}") from None
    if args.period is not None and not (0 < len(args.period) <= 64 and args.period.isprintable()):
        raise UsageError(f"--period must be 1 to 64 printable characters, got {args.period!r:.80}")

    async def show() -> int:
        records = await read_changelog(config.connection, config.topics.totals)
        rows = [r for (tenant, period), r in sorted(records.items())
                if (args.tenant is None or tenant == args.tenant) and (args.period is None or period == args.period)]
        if args.json:
            for record in rows:
                print(totals_json(record))
            return EXIT_OK
        print(f"{'tenant':<24} {'period':<12} {'used':>14} {'limit':>14} {'events':>10}  state")
        for record in rows:
            print(totals_row(record))
        return EXIT_OK

    return show


def _topics(args: argparse.Namespace, config: AggregatorConfig) -> Callable[[], Awaitable[int]]:
    async def topics() -> int:
        if args.action == "create":
            partitions = await ensure_topics(config.connection, config.topics)
            for name, count in sorted(partitions.items()):
                print(f"{printable(name)}: {count} partitions")
            return EXIT_OK
        problems = 0
        for spec in config.topics.specs():
            try:
                count = len(await topic_partitions(config.connection, spec.name))
                print(f"{printable(spec.name)}: {count} partitions")
            except TopicMismatchError as exc:
                print(f"MISSING {printable(exc)}")
                problems += 1
        return EXIT_PROBLEM if problems else EXIT_OK

    return topics


def _replay(args: argparse.Namespace, config: AggregatorConfig) -> Callable[[], Awaitable[int]]:
    since = args.since.replace(tzinfo=args.since.tzinfo or UTC) if args.since else None

    async def rebuild() -> int:
        written = await replay(config, since=since)
        print(f"rebuilt {written} tenant-periods from {printable(config.topics.usage)}; "
              f"group {printable(repr(config.group_id))} resumes at its end")
        return EXIT_OK

    return rebuild


def _acls(args: argparse.Namespace, config: AggregatorConfig) -> Callable[[], Awaitable[int]]:
    try:
        principals = Principals(agent=args.agent, aggregator=args.aggregator, operator=args.operator)
        acls = deployment_acls(config.topics, principals, config.group_id)
    except AclError as exc:
        raise UsageError(str(exc)) from None

    async def acls_command() -> int:
        print(f"# Kafka ACLs for topic prefix {config.topics.prefix!r} and aggregator group {config.group_id!r}")
        print("# run as a principal allowed to alter ACLs; add --command-config FILE for its credentials")
        for line in kafka_acls_commands(acls, config.connection.bootstrap_servers):
            print(printable(line))
        if args.apply:
            await apply_acls(config.connection, acls)
            print(f"# applied: {len(acls)} ACLs in force")
        return EXIT_OK

    return acls_command


_COMMANDS = {"limits": _limits, "usage": _usage, "topics": _topics, "replay": _replay, "acls": _acls}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["aggregator"]:
        from aggregator.__main__ import main as run_aggregator

        return run_aggregator(argv[1:], prog="tokenguard aggregator")
    if argv[:1] == ["verify"]:
        from aggregator.__main__ import main as run_aggregator

        return run_aggregator(argv, prog="tokenguard verify")
    args = build_parser().parse_args(argv)
    # aiokafka's warnings (retries, "sending username and password in the clear") are not the
    # operator's business; the error that ends a command is, as one line.
    logging.basicConfig(level=logging.WARNING, format="tokenguard: %(levelname)s %(name)s: %(message)s")
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    try:
        config = _config(args)
        timeout_s = connect_timeout(args)
        command = _COMMANDS[args.command](args, config)
    except UsageError as exc:
        return usage_error("tokenguard", str(exc))
    except ValueError as exc:  # from the environment: TOKENGUARD_PARTITIONS=abc and the like
        return usage_error("tokenguard", f"invalid setting: {exc}")
    needs_kafka = args.command != "acls" or args.apply
    return run("tokenguard", config.connection, timeout_s if needs_kafka else None, command)


if __name__ == "__main__":
    sys.exit(main())
