"""``tokenguard limits set|get|list|delete``: per-tenant limits and quota rules on the compacted
limits topic.

Without ``--rule`` a command reads or writes a tenant's limit (``schemas.limits.QuotaLimit``), as
it always has. With ``--rule NAME`` it reads or writes a quota rule (``schemas.policy.QuotaRule``):
any number per tenant, each with its own window, measure, selectors, limit, thresholds and action.
A rule that cannot be written (an unknown time zone, ``--rate`` with ``--window``, a threshold of
1.5) is one line naming the flag and exit 2, before any Kafka I/O.
"""

from __future__ import annotations

import json
import re
import sys
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, get_args

import click
from aiokafka.structs import ConsumerRecord
from pydantic import TypeAdapter, ValidationError

from aggregator.cli.contract import EXIT_OK, EXIT_PROBLEM, Group, UsageError, run
from aggregator.cli.options import deployment_options, load
from aggregator.cli.output import printable, show_limit, validation_message
from aggregator.cli.prices import instant, to_micros, units
from aggregator.config import AggregatorConfig
from aggregator.limits import apply_policy, delete_limit, delete_rule, write_limit, write_rule
from aggregator.state import Limits
from schemas._types import Identifier
from schemas.errors import DecodeError
from schemas.limits import QuotaLimit
from schemas.policy import MAX_RATE_WINDOW_S, Action, Measure, QuotaRule, RuleName, UnknownModel
from schemas.prices import format_instant
from schemas.rules import RuleRecord, read_policy_record
from transport.follower import TopicFollower

IDENTIFIER = TypeAdapter(Identifier)
RULE_NAME = TypeAdapter(RuleName)
Period = Literal["any", "month", "week", "day"]
CalendarWindow = Literal["hour", "day", "week", "month", "year"]
RuleId = tuple[str | None, str]  # (tenant or None for a default rule, name)

# The flag that sets each QuotaRule field, for one-line errors (a field's nested errors, such as
# ``thresholds.1`` or ``attributes.user``, name the same flag).
RULE_FLAGS = {"name": "--rule", "tenant_id": "tenant", "limit": "--limit", "window": "--window",
              "window_seconds": "--rate", "timezone": "--timezone", "measure": "--measure",
              "input_weight": "--input-weight", "output_weight": "--output-weight", "currency": "--currency",
              "unknown_model": "--unknown-model", "model": "--model", "attributes": "--attribute",
              "thresholds": "--threshold", "action": "--action", "effective_from": "--effective-from"}
RATE = re.compile(r"^(\d{1,6})([smh])$")
SECONDS = {"s": 1, "m": 60, "h": 3600}
# How long a new rule waits before it counts: every aggregator and middleware reads the limits
# topic within this, so none counts a call the others do not (see ``new_effective_from``).
READ_DELAY = timedelta(seconds=1)


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


def rule_name(name: str | None) -> str | None:
    """``--rule NAME`` validated as a rule's name (None: no ``--rule``); ``UsageError`` if it cannot be one."""
    if name is None:
        return None
    try:
        return RULE_NAME.validate_python(name)
    except ValidationError as exc:
        raise UsageError(f"--rule {name!r:.60}: {validation_message(exc)}") from None


def scope_name(tenant_id: str | None) -> str:
    return "(default)" if tenant_id is None else printable(tenant_id)


async def read_limits(config: AggregatorConfig) -> Limits:
    limits, _, _ = await read_policies(config)
    return limits


async def read_policies(config: AggregatorConfig) -> tuple[Limits, dict[RuleId, QuotaRule], Counter[str]]:
    """Everything on the limits topic, read to its end: the limits (and rules and prices, compiled)
    as ``load_policies`` keeps them, every rule as written (a ``RuleBook`` keeps only what judging
    needs, not the time zone's name or the timestamps), and the records skipped per reason."""
    limits = Limits()
    rules: dict[RuleId, QuotaRule] = {}
    follower: TopicFollower

    async def take(records: list[ConsumerRecord]) -> None:
        for record in records:
            try:
                change = read_policy_record(record.key, record.value)
            except DecodeError as exc:
                follower.skip(partition=record.partition, offset=record.offset, reason=exc.reason, detail=exc.detail)
                continue
            apply_policy(limits, change)
            if isinstance(change, RuleRecord):
                if change.rule is None:
                    rules.pop((change.tenant_id, change.name), None)
                else:
                    rules[(change.tenant_id, change.name)] = change.rule

    follower = TopicFollower(config.connection, config.topics.limits, take, client_id="tokenguard-limits-reader")
    await follower.start()
    await follower.stop()
    return limits, rules, Counter(follower.skipped)


# --- rules: parsing the flags, showing a rule --------------------------------------------------


def rate_seconds(text: str) -> int:
    """``"60s"``, ``"5m"``, ``"1h"`` -> seconds; ``UsageError`` for anything else, or outside 1s..24h."""
    found = RATE.match(text)
    if found is None:
        raise UsageError(f"--rate: {text!r:.40} is not a duration such as 60s, 5m or 1h")
    seconds = int(found[1]) * SECONDS[found[2]]
    if not 1 <= seconds <= MAX_RATE_WINDOW_S:
        raise UsageError(f"--rate: {text!r:.40} must be between 1s and 24h")
    return seconds


def rule_limit(text: str, measure: Measure) -> int:
    """The rule's limit in its stored unit: a whole number of tokens or requests; for a cost rule,
    currency units converted exactly to integer micro-units (``"12.5"`` -> ``12_500_000``)."""
    if measure == "cost":
        return to_micros(text, "--limit")
    try:
        return int(text)
    except ValueError:
        raise UsageError(f"--limit: {text!r:.40} is not a whole number of {measure}") from None


def selectors(attributes: tuple[str, ...], user: str | None, agent: str | None) -> dict[str, str]:
    """``--attribute k=v`` (repeatable), ``--user U`` (``user=U``) and ``--agent A`` (``agent=A``)."""
    found: dict[str, str] = {}
    for item in attributes:
        key, equals, value = item.partition("=")
        if not equals:
            raise UsageError(f"--attribute: {item!r:.60} is not KEY=VALUE")
        if found.get(key, value) != value:
            raise UsageError(f"--attribute: {key!r:.60} given twice with different values")
        found[key] = value
    for key, chosen, flag in (("user", user, "--user"), ("agent", agent, "--agent")):
        if chosen is None:
            continue
        if found.get(key, chosen) != chosen:
            raise UsageError(f"{flag} {chosen!r:.60} contradicts --attribute {key}={found[key]!r:.60}")
        found[key] = chosen
    return found


def rule_problem(exc: ValidationError) -> str:
    """A ``QuotaRule`` validation error as one line naming the flags."""
    flags = {}
    for error in exc.errors():
        loc = error["loc"]
        if loc and str(loc[0]) in RULE_FLAGS:
            flags[".".join(str(part) for part in loc)] = RULE_FLAGS[str(loc[0])]
    return validation_message(exc, flags)


def new_effective_from(now: datetime) -> datetime:
    """When a new rule (or one that now counts something else) starts counting: a second from now.

    Every aggregator and every middleware follows the limits topic and reads a new record well
    within that second; a rule effective at once would count on the aggregators that have read it
    the calls the middlewares that have not yet read it let through unjudged, and the middleware
    and the aggregator would disagree about the same counter. From a moment in the near future
    every reader applies the rule to the same calls."""
    return now + READ_DELAY


def kept_effective_from(rule: QuotaRule, old: QuotaRule | None) -> QuotaRule:
    """``rule`` with ``old``'s effective_from when it counts exactly what ``old`` counts (only the
    limit, thresholds or action changed), so its counters continue; else ``rule`` unchanged."""
    if old is None:
        return rule
    same = rule.model_copy(update={"effective_from": old.effective_from})
    return same if same.basis == old.basis else rule


def show_rule(rule: QuotaRule) -> str:
    """One line of a rule: scope, name, limit and measure, window, selectors, thresholds, action,
    effective_from."""
    if rule.measure == "cost":
        amount = f"{units(rule.limit)} {rule.currency} cost"
        if rule.unknown_model == "refuse":
            amount += " (unpriced models refused)"
    elif rule.measure == "weighted_tokens":
        amount = f"{rule.limit:,} weighted_tokens (input x{rule.input_weight:g}, output x{rule.output_weight:g})"
    else:
        amount = f"{rule.limit:,} {rule.measure}"
    window = f"{rule.window_seconds}s (rate)" if rule.window == "rate" else f"{rule.window} ({printable(rule.timezone)})"
    chosen = ([f"model={printable(rule.model)}"] if rule.model is not None else []) + [
        f"{printable(key)}={printable(value)}" for key, value in sorted(rule.attributes.items())]
    thresholds = "warn at " + ", ".join(f"{threshold:.0%}" for threshold in rule.thresholds) if rule.thresholds \
        else "no thresholds"
    return (f"{scope_name(rule.tenant_id)} rule {printable(rule.name)}: {amount} per {window}, "
            f"{' '.join(chosen) or 'every call'}, {thresholds}, {rule.action}, "
            f"from {format_instant(rule.effective_from)} (set {rule.updated_at:%Y-%m-%d %H:%M} UTC)")


def policy_json(item: QuotaLimit | QuotaRule) -> str:
    """One ``limits list --json`` line: ``kind`` (limit or rule), then the record as stored
    (a cost rule's limit in integer micro-units), ASCII only."""
    kind = "rule" if isinstance(item, QuotaRule) else "limit"
    return json.dumps({"kind": kind, **item.model_dump(mode="json")}, ensure_ascii=True)


# --- the commands -------------------------------------------------------------------------------


@click.group(cls=Group)
def limits() -> None:
    """Per-tenant limits and quota rules on the compacted limits topic."""


tenant_argument = click.argument("tenant", required=False)
default_flag = click.option("--default", "default", is_flag=True,
                            help="the limit (or rule) of tenants without their own")
rule_flag = click.option("--rule", metavar="NAME", help="a quota rule of this name, not the tenant's limit")
LIMIT_FLAGS = ("--tokens", "--period", "--warning-ratio")


@limits.command("set")
@tenant_argument
@default_flag
@click.option("--tokens", type=int, help="tokens per period (a tenant limit, without --rule)")
@click.option("--period", type=click.Choice(get_args(Period)),
              help="period keys the limit applies to (without --rule) [default: any]")
@click.option("--warning-ratio", type=float, help="fraction of the limit that triggers a warning notice (without --rule)")
@rule_flag
@click.option("--limit", "limit_", metavar="N",
              help="the rule's limit: tokens or requests; with --measure cost, currency units (12.50, exact to "
                   "6 decimal places, stored as integer micro-units)")
@click.option("--window", type=click.Choice(get_args(CalendarWindow)),
              help="calendar window, in --timezone [default: month]")
@click.option("--rate", metavar="DURATION", help="a fixed rate window instead: 60s, 5m, 1h (at most 24h)")
@click.option("--timezone", metavar="ZONE", help="IANA time zone of the calendar window, e.g. Europe/Paris "
                                                 "[default: UTC]")
@click.option("--measure", type=click.Choice(get_args(Measure)),
              help="what a call adds to the counter [default: total_tokens]")
@click.option("--input-weight", type=float, help="weighted_tokens: weight of an input token [default: 1]")
@click.option("--output-weight", type=float, help="weighted_tokens: weight of an output token [default: 1]")
@click.option("--currency", metavar="CODE", help="cost: the prices' ISO 4217 code, e.g. USD (required)")
@click.option("--unknown-model", type=click.Choice(get_args(UnknownModel)),
              help="cost: a model without a price is priced at model '*' (default) or its calls refused "
                   "(refuse) [default: default]")
@click.option("--model", help="count only calls of this model")
@click.option("--user", help="count only calls of this user: the selector user=U (events carry the user in "
                             "their attributes, under 'user')")
@click.option("--agent", help="count only calls of this agent: the selector agent=A (events carry the agent in "
                              "their attributes, under 'agent')")
@click.option("--attribute", "attributes", multiple=True, metavar="KEY=VALUE",
              help="count only calls whose event attributes include this (repeatable, all must match)")
@click.option("--threshold", "thresholds", multiple=True, type=float, metavar="RATIO",
              help="warn when this fraction of the limit is reached, e.g. 0.8 (repeatable)")
@click.option("--action", type=click.Choice(get_args(Action)),
              help="at the limit: refuse calls (block) or only notify (warn) [default: block]")
@click.option("--effective-from", metavar="ISO8601",
              help="counts calls from then on (UTC if no offset) [default: the rule's current effective_from "
                   "if only the limit, thresholds or action change, else now + 1s]")
@deployment_options()
@click.pass_context
def set_(ctx: click.Context, tenant: str | None, default: bool, tokens: int | None, period: Period | None,
         warning_ratio: float | None, rule: str | None, **rule_options: Any) -> int:
    """Set a tenant's limit (--tokens), or with --default the limit of everyone else; with
    --rule NAME, a quota rule of that tenant (or with --default, of every tenant, each counted
    apart; a tenant's rule overrides the default rule of the same name)."""
    who = tenant_or_default(tenant, default)
    if rule is not None:
        return set_rule(ctx, who, rule, given_limit_flags={"--tokens": tokens, "--period": period,
                                                           "--warning-ratio": warning_ratio}, **rule_options)
    given_rule_flags = [f"--{name.rstrip('_').replace('_', '-')}" for name, value in rule_options.items()
                        if value not in (None, ())]
    if given_rule_flags:
        raise UsageError(f"{', '.join(given_rule_flags)}: only for a rule (give --rule NAME)")
    if tokens is None:
        raise UsageError("Missing option '--tokens' (or --rule NAME for a quota rule)")
    try:
        limit = QuotaLimit(tenant_id=who, limit_tokens=tokens, period=period or "any",
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


def set_rule(ctx: click.Context, tenant_id: str | None, name: str, *, given_limit_flags: dict[str, object],
             limit_: str | None, window: CalendarWindow | None, rate: str | None, timezone: str | None,
             measure: Measure | None, input_weight: float | None, output_weight: float | None, currency: str | None,
             unknown_model: UnknownModel | None, model: str | None, user: str | None, agent: str | None,
             attributes: tuple[str, ...], thresholds: tuple[float, ...], action: Action | None,
             effective_from: str | None) -> int:
    """``limits set ... --rule NAME``: validate the whole rule (exit 2 naming the flag), then write it."""
    measure = measure or "total_tokens"
    wrong = [flag for flag, value in given_limit_flags.items() if value is not None]
    if wrong:
        raise UsageError(f"{', '.join(wrong)}: only for a tenant limit; a rule takes --limit (and --window or --rate)")
    if limit_ is None:
        raise UsageError("Missing option '--limit' (the rule's limit)")
    if rate is not None and window is not None:
        raise UsageError("--rate and --window: give one (a rate window or a calendar window)")
    if rate is not None and timezone is not None:
        raise UsageError("--timezone: a --rate window has no time zone (it is aligned to the epoch)")
    if (measure == "cost") != (currency is not None):
        raise UsageError("--currency: required with --measure cost, and only with it")
    if unknown_model is not None and measure != "cost":
        raise UsageError("--unknown-model: only with --measure cost")
    if (input_weight is not None or output_weight is not None) and measure != "weighted_tokens":
        raise UsageError("--input-weight, --output-weight: only with --measure weighted_tokens")
    now = datetime.now(UTC)
    fields: dict[str, object] = {
        "name": name, "tenant_id": tenant_id, "limit": rule_limit(limit_, measure), "measure": measure,
        "model": model, "attributes": selectors(attributes, user, agent), "thresholds": thresholds,
        "action": action or "block", "updated_at": now,
        "effective_from": instant(effective_from) if effective_from else new_effective_from(now),
    }
    optional = {"window": "rate" if rate is not None else window, "timezone": timezone,
                "window_seconds": rate_seconds(rate) if rate is not None else None,
                "input_weight": input_weight, "output_weight": output_weight,
                "currency": currency, "unknown_model": unknown_model}
    fields.update({key: value for key, value in optional.items() if value is not None})
    try:
        quota_rule = QuotaRule.model_validate(fields)
    except ValidationError as exc:
        raise UsageError(rule_problem(exc)) from None
    settings, config = load(ctx)

    async def write() -> int:
        chosen = quota_rule
        if effective_from is None:  # from now, not from before the probe and the read of the topic
            _, rules, _ = await read_policies(config)
            fresh = quota_rule.model_copy(update={"effective_from": new_effective_from(datetime.now(UTC))})
            chosen = kept_effective_from(fresh, rules.get((tenant_id, name)))
        await write_rule(config.connection, config.topics, chosen)
        print(f"set {show_rule(chosen)}")
        return EXIT_OK

    return run(ctx.command_path, config.connection, settings.connect_timeout_s, write)


@limits.command()
@tenant_argument
@default_flag
@rule_flag
@deployment_options()
@click.pass_context
def get(ctx: click.Context, tenant: str | None, default: bool, rule: str | None) -> int:
    """Show one tenant's limit and rules (or --default's); with --rule, that rule only. Exit 1 if
    there is none."""
    who, rule = tenant_or_default(tenant, default), rule_name(rule)
    settings, config = load(ctx)

    async def show() -> int:
        known, rules, _ = await read_policies(config)
        if rule is not None:
            found_rule = rules.get((who, rule))
            if found_rule is None:
                inherited = " (the default rule of that name applies)" if who is not None and (None, rule) in rules \
                    else ""
                print(f"no rule {printable(rule)} set for {scope_name(who)}{inherited}")
                return EXIT_PROBLEM
            print(show_rule(found_rule))
            return EXIT_OK
        found = known.topic_default if who is None else known.per_tenant.get(who)
        own = [item for (tenant_id, _), item in sorted(rules.items(), key=lambda pair: pair[0][1])
               if tenant_id == who]
        print(show_limit(found) if found is not None else f"no limit set for {scope_name(who)}")
        for item in own:
            print(show_rule(item))
        return EXIT_OK if found is not None or own else EXIT_PROBLEM

    return run(ctx.command_path, config.connection, settings.connect_timeout_s, show)


@limits.command("list")
@click.option("--json", "as_json", is_flag=True,
              help="one JSON object per line (kind: limit or rule), cost limits in integer micro-units")
@deployment_options()
@click.pass_context
def list_(ctx: click.Context, as_json: bool) -> int:
    """Every limit on the topic, the default first; then every rule, the default rules first."""
    settings, config = load(ctx)

    async def show_all() -> int:
        known, rules, skipped = await read_policies(config)
        items: list[QuotaLimit | QuotaRule] = [known.topic_default] if known.topic_default else []
        items += sorted(known.per_tenant.values(), key=lambda item: item.tenant_id or "")
        items += [rules[key] for key in sorted(rules, key=lambda key: (key[0] is not None, key[0] or "", key[1]))]
        for item in items:
            if as_json:
                print(policy_json(item))
            else:
                print(show_rule(item) if isinstance(item, QuotaRule) else show_limit(item))
        if skipped:
            print(f"skipped {sum(skipped.values())} unreadable records: {dict(skipped)}", file=sys.stderr)
        return EXIT_OK

    return run(ctx.command_path, config.connection, settings.connect_timeout_s, show_all)


@limits.command()
@tenant_argument
@default_flag
@rule_flag
@deployment_options()
@click.pass_context
def delete(ctx: click.Context, tenant: str | None, default: bool, rule: str | None) -> int:
    """Remove a tenant's limit (or --default); with --rule NAME, that rule (its counters stop
    being judged)."""
    who, rule = tenant_or_default(tenant, default), rule_name(rule)
    settings, config = load(ctx)

    async def remove() -> int:
        if rule is None:
            await delete_limit(config.connection, config.topics, who)
            print(f"deleted the limit of {scope_name(who)}")
        else:
            await delete_rule(config.connection, config.topics, who, rule)
            print(f"deleted rule {printable(rule)} of {scope_name(who)}")
        return EXIT_OK

    return run(ctx.command_path, config.connection, settings.connect_timeout_s, remove)
