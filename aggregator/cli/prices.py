"""``tokenguard prices set|list|delete``: prices per model on the compacted limits topic.

Prices are given as the operator reads them, in currency units per million tokens (``2.50``), and
stored as integer micro-units (``2_500_000``): the conversion is decimal and exact, and a price
that has no exact micro-unit form is a usage error rather than a silent rounding.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation

import click
from aiokafka.structs import ConsumerRecord
from pydantic import TypeAdapter, ValidationError

from aggregator.cli.contract import EXIT_OK, Group, UsageError, run
from aggregator.cli.options import deployment_options, load
from aggregator.cli.output import printable, validation_message
from aggregator.limits import _write
from schemas._types import Identifier
from schemas.errors import DecodeError
from schemas.prices import MICROS, ModelPrice, PriceTable, format_instant, is_price_key, price_key, read_price_record
from schemas.topics import TopicLayout
from schemas.wire import encode
from transport.connection import KafkaConnection
from transport.follower import TopicFollower

MODEL = TypeAdapter(Identifier)
FLAGS = {"model": "MODEL", "input_per_mtok": "--input", "output_per_mtok": "--output", "currency": "--currency",
         "cached_input_per_mtok": "--cached-input", "reasoning_per_mtok": "--reasoning",
         "effective_from": "--effective-from"}


def to_micros(text: str, flag: str) -> int:
    """``"2.50"`` -> ``2_500_000``, exactly; ``UsageError`` for a negative, non-finite or finer value."""
    try:
        amount = Decimal(text)
    except InvalidOperation:
        raise UsageError(f"{flag}: {text!r:.40} is not a number") from None
    if not amount.is_finite() or amount < 0:
        raise UsageError(f"{flag}: {text!r:.40} must be a price of 0 or more")
    micros = amount.scaleb(6)
    if micros != micros.to_integral_value():
        raise UsageError(f"{flag}: {text!r:.40} has more than 6 decimal places")
    return int(micros)


def units(micros: int) -> str:
    """``2_500_000`` -> ``"2.50"``: exact, at least two decimals, no trailing zeros beyond them."""
    whole, fraction = divmod(micros, MICROS)
    return f"{whole}.{f'{fraction:06d}'.rstrip('0'):0<2}"


def instant(text: str, flag: str = "--effective-from") -> datetime:
    """An ISO 8601 time in UTC (UTC too if it names no offset)."""
    try:
        when = datetime.fromisoformat(text)
        return when.astimezone(UTC) if when.tzinfo is not None else when.replace(tzinfo=UTC)
    except (ValueError, OverflowError):
        raise UsageError(f"{flag}: {text!r:.60} is not an ISO 8601 time (2026-11-01T00:00:00Z)") from None


def model_name(model: str) -> str:
    try:
        return MODEL.validate_python(model)
    except ValidationError as exc:
        raise UsageError(f"model {model!r:.60}: {validation_message(exc)}") from None


def show_price(price: ModelPrice) -> str:
    """One ``prices list`` line."""
    cached = "input" if price.cached_input_per_mtok is None else units(price.cached_input_per_mtok)
    reasoning = "output" if price.reasoning_per_mtok is None else units(price.reasoning_per_mtok)
    return (f"{printable(price.model)} from {format_instant(price.effective_from)}: {price.currency} per 1M tokens: "
            f"input {units(price.input_per_mtok)}, output {units(price.output_per_mtok)}, cached input {cached}, "
            f"reasoning {reasoning} (set {price.updated_at:%Y-%m-%d %H:%M} UTC)")


def price_json(price: ModelPrice) -> str:
    """One ``prices list --json`` line: the record as stored (integer micro-units), ASCII only."""
    return json.dumps(price.model_dump(mode="json"), ensure_ascii=True)


async def write_price(connection: KafkaConnection, layout: TopicLayout, price: ModelPrice) -> None:
    """Set one version of a model's price on the limits topic."""
    await _write(connection, layout.limits, price_key(price.model, price.effective_from), encode(price))


async def delete_price(connection: KafkaConnection, layout: TopicLayout, model: str, effective_from: datetime) -> None:
    """Remove one version (a tombstone); the version before it applies again from then on."""
    await _write(connection, layout.limits, price_key(model, effective_from), None)


async def read_prices(connection: KafkaConnection, layout: TopicLayout) -> tuple[PriceTable, Counter[str]]:
    """Every price on the limits topic, read to its end, and the records skipped per reason.

    Limits and other keys are not prices and are passed over without a count; a price key whose
    record does not read (or a record the Kafka client cannot parse) is counted and logged.
    """
    table = PriceTable()
    follower: TopicFollower

    async def take(records: list[ConsumerRecord]) -> None:
        for record in records:
            if not is_price_key(record.key):
                continue
            try:
                model, effective_from, price = read_price_record(record.key, record.value)
            except DecodeError as exc:
                follower.skip(partition=record.partition, offset=record.offset, reason=exc.reason, detail=exc.detail)
                continue
            if price is None:
                table.delete(model, effective_from)
            else:
                table.set(price)

    follower = TopicFollower(connection, layout.limits, take, client_id="tokenguard-prices-reader")
    await follower.start()
    await follower.stop()
    return table, Counter(follower.skipped)


@click.group(cls=Group)
def prices() -> None:
    """Prices per model on the compacted limits topic (model "*": the default)."""


@prices.command("set")
@click.argument("model")
@click.option("--input", "input_", required=True, metavar="PRICE", help="per 1M input tokens, e.g. 2.50")
@click.option("--output", "output", required=True, metavar="PRICE", help="per 1M output tokens")
@click.option("--currency", required=True, metavar="CODE", help="ISO 4217 code, e.g. USD")
@click.option("--cached-input", metavar="PRICE", help="per 1M cached input tokens [default: the input price]")
@click.option("--reasoning", metavar="PRICE", help="per 1M reasoning tokens [default: the output price]")
@click.option("--effective-from", metavar="ISO8601", help="in force from (UTC if no offset) [default: now]")
@deployment_options()
@click.pass_context
def set_(ctx: click.Context, model: str, input_: str, output: str, currency: str, cached_input: str | None,
         reasoning: str | None, effective_from: str | None) -> int:
    """Set a model's price from --effective-from on; earlier calls keep the price they had."""
    now = datetime.now(UTC)
    try:
        price = ModelPrice(
            model=model_name(model), currency=currency, input_per_mtok=to_micros(input_, "--input"),
            output_per_mtok=to_micros(output, "--output"),
            cached_input_per_mtok=None if cached_input is None else to_micros(cached_input, "--cached-input"),
            reasoning_per_mtok=None if reasoning is None else to_micros(reasoning, "--reasoning"),
            effective_from=instant(effective_from) if effective_from else now, updated_at=now,
        )
    except ValidationError as exc:
        raise UsageError(validation_message(exc, FLAGS)) from None
    settings, config = load(ctx)

    async def write() -> int:
        await write_price(config.connection, config.topics, price)
        print(f"set {show_price(price)}")
        return EXIT_OK

    return run(ctx.command_path, config.connection, settings.connect_timeout_s, write)


@prices.command("list")
@click.option("--model", help="only this model's versions")
@click.option("--json", "as_json", is_flag=True, help="one JSON object per line, prices in integer micro-units")
@deployment_options()
@click.pass_context
def list_(ctx: click.Context, model: str | None, as_json: bool) -> int:
    """Every price version, ordered by model then effective_from."""
    settings, config = load(ctx)

    async def show_all() -> int:
        table, skipped = await read_prices(config.connection, config.topics)
        for price in table.versions():
            if model is None or price.model == model:
                print(price_json(price) if as_json else show_price(price))
        if skipped:
            print(f"skipped {sum(skipped.values())} unreadable price records: {dict(skipped)}", file=sys.stderr)
        return EXIT_OK

    return run(ctx.command_path, config.connection, settings.connect_timeout_s, show_all)


@prices.command()
@click.argument("model")
@click.option("--effective-from", required=True, metavar="ISO8601", help="the version to remove")
@deployment_options()
@click.pass_context
def delete(ctx: click.Context, model: str, effective_from: str) -> int:
    """Remove one version of a model's price."""
    name, when = model_name(model), instant(effective_from)
    settings, config = load(ctx)

    async def remove() -> int:
        await delete_price(config.connection, config.topics, name, when)
        print(f"deleted the price of {printable(name)} from {format_instant(when)}")
        return EXIT_OK

    return run(ctx.command_path, config.connection, settings.connect_timeout_s, remove)
