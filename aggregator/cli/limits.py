"""``tokenguard limits set|get|list|delete``: per-tenant limits on the compacted limits topic."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal, get_args

import click
from pydantic import TypeAdapter, ValidationError

from aggregator.cli.contract import EXIT_OK, EXIT_PROBLEM, Group, UsageError, run
from aggregator.cli.options import deployment_options, load
from aggregator.cli.output import printable, show_limit, validation_message
from aggregator.config import AggregatorConfig
from aggregator.limits import delete_limit, load_policies, write_limit
from aggregator.state import Limits
from schemas._types import Identifier
from schemas.limits import QuotaLimit

IDENTIFIER = TypeAdapter(Identifier)
Period = Literal["any", "month", "week", "day"]


def tenant_or_default(tenant: str | None, default: bool) -> str | None:
    """The tenant named, or None for ``--default``; ``UsageError`` unless exactly one is given."""
    if default == (tenant is not None):
        raise UsageError("name a tenant or give --default (not both)")
    if tenant is None:
        return None
    try:
        return IDENTIFIER.validate_python(tenant)
    except ValidationError as exc:
        raise UsageError(f"tenant id {tenant!r}: {validation_message(exc)}") from None


async def read_limits(config: AggregatorConfig) -> Limits:
    return await load_policies(config.connection, config.topics.limits)


@click.group(cls=Group)
def limits() -> None:
    """Per-tenant limits on the compacted limits topic."""


tenant_argument = click.argument("tenant", required=False)
default_flag = click.option("--default", "default", is_flag=True, help="the limit of tenants without their own")


@limits.command("set")
@tenant_argument
@default_flag
@click.option("--tokens", type=int, required=True, help="tokens per period")
@click.option("--period", type=click.Choice(get_args(Period)), default="any", show_default=True,
              help="period keys the limit applies to")
@click.option("--warning-ratio", type=float, help="fraction of the limit that triggers a warning notice")
@deployment_options()
@click.pass_context
def set_(ctx: click.Context, tenant: str | None, default: bool, tokens: int, period: Period,
         warning_ratio: float | None) -> int:
    """Set a tenant's limit, or with --default the limit of everyone else."""
    try:
        limit = QuotaLimit(tenant_id=tenant_or_default(tenant, default), limit_tokens=tokens, period=period,
                           warning_ratio=warning_ratio, updated_at=datetime.now(UTC))
    except ValidationError as exc:
        raise UsageError(validation_message(exc, {"tenant_id": "tenant", "limit_tokens": "--tokens",
                                                  "warning_ratio": "--warning-ratio", "period": "--period"})) from None
    settings, config = load(ctx)

    async def write() -> int:
        await write_limit(config.connection, config.topics, limit)
        print(f"set {show_limit(limit)}")
        return EXIT_OK

    return run(ctx.command_path, config.connection, settings.connect_timeout_s, write)


@limits.command()
@tenant_argument
@default_flag
@deployment_options()
@click.pass_context
def get(ctx: click.Context, tenant: str | None, default: bool) -> int:
    """Show one tenant's limit (or --default); exit 1 if it has none."""
    who = tenant_or_default(tenant, default)
    settings, config = load(ctx)

    async def show() -> int:
        known = await read_limits(config)
        found = known.topic_default if who is None else known.per_tenant.get(who)
        if found is None:
            print(f"no limit set for {'(default)' if who is None else printable(who)}")
            return EXIT_PROBLEM
        print(show_limit(found))
        return EXIT_OK

    return run(ctx.command_path, config.connection, settings.connect_timeout_s, show)


@limits.command("list")
@deployment_options()
@click.pass_context
def list_(ctx: click.Context) -> int:
    """Every limit on the topic, the default first."""
    settings, config = load(ctx)

    async def show_all() -> int:
        known = await read_limits(config)
        for item in ([known.topic_default] if known.topic_default else []) + sorted(
            known.per_tenant.values(), key=lambda item: item.tenant_id or ""
        ):
            print(show_limit(item))
        return EXIT_OK

    return run(ctx.command_path, config.connection, settings.connect_timeout_s, show_all)


@limits.command()
@tenant_argument
@default_flag
@deployment_options()
@click.pass_context
def delete(ctx: click.Context, tenant: str | None, default: bool) -> int:
    """Remove a tenant's limit (or --default)."""
    who = tenant_or_default(tenant, default)
    settings, config = load(ctx)

    async def remove() -> int:
        await delete_limit(config.connection, config.topics, who)
        print(f"deleted the limit of {'(default)' if who is None else printable(who)}")
        return EXIT_OK

    return run(ctx.command_path, config.connection, settings.connect_timeout_s, remove)
