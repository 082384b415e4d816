"""``tokenguard usage show`` (the totals on the changelog) and ``tokenguard replay`` (rebuild them)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import click
from pydantic import ValidationError

from aggregator.changelog import read_changelog
from aggregator.cli.contract import EXIT_OK, Command, Group, UsageError, run
from aggregator.cli.limits import IDENTIFIER
from aggregator.cli.options import deployment_options, load
from aggregator.cli.output import TOTALS_HEADER, printable, totals_json, totals_row, validation_message
from aggregator.replay import replay as rebuild


@click.group(cls=Group)
def usage() -> None:
    """Current totals from the aggregator's changelog."""


@usage.command()
@click.option("--tenant", help="only this tenant")
@click.option("--period", help="only this period key, e.g. 2026-11")
@click.option("--json", "as_json", is_flag=True, help="one JSON object per line, exact values")
@deployment_options()
@click.pass_context
def show(ctx: click.Context, tenant: str | None, period: str | None, as_json: bool) -> int:
    """Totals per tenant and period."""
    if tenant is not None:
        try:
            IDENTIFIER.validate_python(tenant)
        except ValidationError as exc:
            raise UsageError(f"--tenant {tenant!r}: {validation_message(exc)}") from None
    if period is not None and not (0 < len(period) <= 64 and period.isprintable()):
        raise UsageError(f"--period must be 1 to 64 printable characters, got {period!r:.80}")
    settings, config = load(ctx)

    async def totals() -> int:
        records = await read_changelog(config.connection, config.topics.totals)
        rows = [record for (who, when), record in sorted(records.items())
                if tenant in (None, who) and period in (None, when)]
        if not as_json:
            print(TOTALS_HEADER)
        for record in rows:
            print(totals_json(record) if as_json else totals_row(record))
        return EXIT_OK

    return run(ctx.command_path, config.connection, settings.connect_timeout_s, totals)


class IsoTime(click.ParamType):
    """An ISO 8601 date or time; UTC when it has no offset."""

    name = "ISO-TIME"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> datetime:
        if isinstance(value, datetime):
            return value
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            self.fail(f"{value!r} is not an ISO 8601 date or time (2026-11-01, 2026-11-01T12:00+01:00)", param, ctx)
        return parsed.replace(tzinfo=parsed.tzinfo or UTC)


@click.command(cls=Command, short_help="rebuild totals from the usage topic (aggregators stopped)")
@click.option("--since", type=IsoTime(), help="rebuild only the tenant-periods whose events are all at or after this "
              "time (UTC if no offset); those with an earlier event keep their totals")
@deployment_options()
@click.pass_context
def replay(ctx: click.Context, since: datetime | None) -> int:
    """Rebuild the aggregator's totals from the usage topic. Stop the aggregators first (it refuses
    while the group has members); they resume on the rebuilt state. Tenant-periods some of whose
    events retention has deleted keep the totals the aggregator counted (never lowered to what is
    left)."""
    settings, config = load(ctx)

    async def rebuilt() -> int:
        result = await rebuild(config, since=since)
        print(f"rebuilt {result.written} tenant-periods from {printable(config.topics.usage)}; "
              f"group {printable(repr(config.group_id))} resumes at its end")
        if result.kept_truncated:
            print(f"kept {result.kept_truncated} tenant-periods as counted: some of their events are before the "
                  "usage topic's log start (retention), so the topic cannot rebuild them")
        if result.kept_before_since:
            print(f"kept {result.kept_before_since} tenant-periods as counted: they have events before --since")
        if result.lost_and_truncated:
            print(f"WARNING: {result.lost_and_truncated} tenant-periods had no changelog record on partitions that "
                  "lost events to retention: rebuilt from what is left, which may be less than was used")
        return EXIT_OK

    return run(ctx.command_path, config.connection, settings.connect_timeout_s, rebuilt)
