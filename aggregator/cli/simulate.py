"""``tokenguard simulate --rules FILE``: replay the usage topic under proposed rules (``aggregator.simulate``)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import click

from aggregator.cli.contract import EXIT_OK, Command, UsageError, run
from aggregator.cli.options import deployment_options, load
from aggregator.cli.output import printable
from aggregator.cli.prices import units
from aggregator.cli.totals import IsoTime
from aggregator.rulefile import RuleFileError, load_rules
from aggregator.simulate import RuleOutcome, SimulationReport, simulate_topic

HEADER = (f"{'tenant':<20} {'rule':<16} {'action':<6} {'limit':>16} {'first refused (UTC)':<20} "
          f"{'calls':>7} {'tokens':>12} {'amount':>16} {'windows':>7}")


def amount(value: int, unit: str) -> str:
    """An amount in a rule's unit as an operator reads it: ``1,200 tokens``, ``USD 12.50``."""
    if unit.startswith("micro-"):
        return f"{unit.removeprefix('micro-')} {units(value)}"
    return f"{value:,} {unit}"


def _when(value: datetime | None) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S") if value is not None else "-"


def outcome_row(outcome: RuleOutcome) -> str:
    """One table line: for a block rule what it refused, for a warn rule what was spent past its limit."""
    if outcome.action == "warn":
        calls, tokens, spent = outcome.over_calls, "", amount(outcome.over_amount, outcome.unit)
        first = f"(warn) {_when(outcome.reached_at)}" if outcome.reached_at else "(warn) -"
    else:
        calls, tokens = outcome.refused_calls, f"{outcome.refused_tokens:,}"
        spent, first = amount(outcome.refused_amount, outcome.unit), _when(outcome.first_refused)
    return (f"{printable(outcome.tenant_id):<20} {printable(outcome.rule):<16} {outcome.action:<6} "
            f"{amount(outcome.limit, outcome.unit):>16} {first:<20} {calls:>7,} {tokens:>12} {spent:>16} "
            f"{len(outcome.affected):>7}")


def report_lines(report: SimulationReport) -> list[str]:
    lines = [HEADER, *(outcome_row(outcome) for outcome in report.outcomes)]
    cost = ", ".join(f"{currency} {units(micros)}" for currency, micros in sorted(report.refused_cost.items()))
    lines.append(f"total: {report.events:,} calls simulated, {report.refused_calls:,} refused, "
                 f"{report.refused_tokens:,} tokens refused" + (f", cost refused {cost}" if cost else ""))
    skipped = [f"{report.before_since:,} before --since"] if report.before_since else []
    if report.duplicates:
        skipped.append(f"{report.duplicates:,} repeats")
    if report.invalid:
        skipped.append(f"{sum(report.invalid.values()):,} invalid {dict(sorted(report.invalid.items()))}")
    if skipped:
        lines.append(f"not simulated: {'; '.join(skipped)}")
    return lines


@click.command(cls=Command, short_help="replay the usage topic under proposed rules: who would be refused")
@click.option("--rules", "rules_file", required=True, metavar="FILE",
              type=click.Path(dir_okay=False, path_type=Path),
              help="the proposed rules: JSON (a list of rules, or {\"rules\": [...]}); YAML when PyYAML is installed")
@click.option("--since", type=IsoTime(), help="simulate only events at or after this time (UTC if no offset)")
@click.option("--json", "as_json", is_flag=True, help="one JSON document, exact integers (costs in micro-units)")
@deployment_options()
@click.pass_context
def simulate(ctx: click.Context, rules_file: Path, since: datetime | None, as_json: bool) -> int:
    """Replay the usage topic under the rules in FILE and print, per tenant and rule, when calls
    would have been refused and how many tokens / how much cost. A call is refused when a blocking
    rule's counter had already reached its limit before it (the call that crosses the limit is
    admitted); a refused call counts in no counter. Prices are the limits topic's."""
    try:
        rules = load_rules(rules_file)
    except RuleFileError as exc:
        raise UsageError(str(exc)) from None
    if not rules:
        raise UsageError(f"--rules {str(rules_file)!r}: the file has no rules")
    settings, config = load(ctx)

    async def simulated() -> int:
        report = await simulate_topic(config.connection, config.topics, rules, since=since)
        if as_json:
            print(json.dumps(report.as_json(), ensure_ascii=True))
        else:
            print("\n".join(report_lines(report)))
        return EXIT_OK

    return run(ctx.command_path, config.connection, settings.connect_timeout_s, simulated)
