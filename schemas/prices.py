"""Prices per model, and what one call cost: the one computation the middleware, the aggregator,
the verifier and billing share, so a replay of the usage topic reproduces every cost total exactly.

Prices ride on the compacted limits topic, one record per model and version: the key is
``["price", <model>, <effective_from>]`` (``price_key``), so a new price is a new key and
compaction keeps every version; a call is priced at the version in force at its ``event_time``,
and setting a price never rewrites the cost of what came before. A tombstone deletes one version.

Money is integers: micro-units of the currency (``1_000_000`` = one dollar for USD) per million
tokens, and ``cost_micros`` rounds once, up, per call. No float is ever involved.

The model ``"*"`` is the default price, for models without their own (``Cost.priced`` says which
applied). What a caller does with a call that has no price at all is ``UnknownModelPolicy``.

Pure: no I/O.
"""

from __future__ import annotations

import json
from bisect import bisect_left, bisect_right
from datetime import UTC, datetime
from typing import Annotated, Literal, NamedTuple, Protocol

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, TypeAdapter

from schemas._types import MAX_POLICY_KEY_BYTES, Identifier, Timestamp
from schemas.errors import DecodeError
from schemas.wire import _decode

DEFAULT_MODEL = "*"
MICROS = 1_000_000
PER_TOKENS = 1_000_000
# A million currency units per million tokens: far above any real price, and it bounds the integers.
MAX_PRICE_PER_MTOK = 10**12

PRICE_KEY_PREFIX = b'["price",'

UnknownModelPolicy = Literal["refuse", "default"]
"""What a caller that must price a call does when the table has no price for it, not even ``"*"``.

``"refuse"``: the call is refused (the middleware's cost rules). ``"default"``: the call goes on,
priced at ``"*"`` (``priced="default"``) when there is one, else at nothing (``priced="unpriced"``,
0 micros), and the caller counts and flags it. A model without its own price is always priced at
``"*"`` when there is one: to refuse every model without its own price, set no ``"*"``.
"""

PricedAs = Literal["exact", "default", "unpriced"]


def _utc(value: datetime) -> datetime:
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise ValueError("out of range in UTC") from None


PerMtok = Annotated[int, Field(ge=0, le=MAX_PRICE_PER_MTOK)]
UtcTimestamp = Annotated[Timestamp, AfterValidator(_utc)]


class ModelPrice(BaseModel):
    """One version of a model's price: integer micro-units of ``currency`` per 1,000,000 tokens.

    ``model`` is the name exactly as usage events carry it (``UsageEvent.model``); ``"*"`` is the
    default. ``cached_input_per_mtok`` / ``reasoning_per_mtok`` None: those tokens cost what input /
    output tokens cost. In force from ``effective_from`` (UTC) until the model's next version.
    """

    model_config = ConfigDict(frozen=True, strict=True, extra="ignore")

    schema_version: Literal[1] = 1
    model: Identifier
    currency: Annotated[str, Field(pattern=r"^[A-Z]{3}$")]
    input_per_mtok: PerMtok
    output_per_mtok: PerMtok
    cached_input_per_mtok: PerMtok | None = None
    reasoning_per_mtok: PerMtok | None = None
    effective_from: UtcTimestamp
    updated_at: Timestamp


_PRICE = TypeAdapter(ModelPrice)


def format_instant(when: datetime) -> str:
    """``when`` in UTC as ISO 8601 with ``Z``, microseconds only when there are some: the one
    spelling of an instant in a price key, so one version has exactly one key."""
    when = when.astimezone(UTC)
    fraction = f".{when.microsecond:06d}" if when.microsecond else ""
    return f"{when:%Y-%m-%dT%H:%M:%S}{fraction}Z"


def _parse_instant(text: str) -> datetime | None:
    if len(text) > 40 or not text.endswith("Z"):
        return None
    try:
        when = datetime.fromisoformat(text[:-1])
    except ValueError:
        return None
    if when.tzinfo is not None:
        return None
    when = when.replace(tzinfo=UTC)
    return when if format_instant(when) == text else None


def price_key(model: str, effective_from: datetime) -> bytes:
    """Key of one price version on the limits topic: ``["price","gpt-4o","2026-11-01T00:00:00Z"]``."""
    return json.dumps(["price", model, format_instant(effective_from)], separators=(",", ":"),
                      ensure_ascii=False).encode()


def is_price_key(key: bytes | None) -> bool:
    """Whether a limits-topic key claims to be a price (cheap: a prefix test, nothing parsed)."""
    return key is not None and key.startswith(PRICE_KEY_PREFIX)


def _parse_price_key(key: bytes | None) -> tuple[str, datetime] | None:
    """(model, effective_from) of a canonical price key; None for anything else. Never raises:
    hostile keys are bounded by size and first bytes before ``json.loads`` (deep nesting would
    raise ``RecursionError``), and must re-encode to the same bytes."""
    if key is None or len(key) > MAX_POLICY_KEY_BYTES or not key.startswith(PRICE_KEY_PREFIX):
        return None
    try:
        parts = json.loads(key)
    except (ValueError, RecursionError):
        return None
    if not (isinstance(parts, list) and len(parts) == 3 and isinstance(parts[1], str) and isinstance(parts[2], str)):
        return None
    model, when = parts[1], _parse_instant(parts[2])
    if when is None or not (0 < len(model) <= 256 and model.isprintable()):
        return None
    try:
        canonical = price_key(model, when)
    except UnicodeEncodeError:
        return None
    return (model, when) if canonical == key else None


def decode_price(data: bytes | None) -> ModelPrice:
    price: ModelPrice = _decode(_PRICE, data, "price")
    return price


def read_price_record(key: bytes | None, value: bytes | None) -> tuple[str, datetime, ModelPrice | None]:
    """(model, effective_from, the price or None for a tombstone) of one price record.

    ``DecodeError`` and nothing else, for any bytes: ``invalid_key`` for a key that is not a
    canonical price key, the value's decode reasons, ``key_value_mismatch`` for a value whose
    model or effective_from is not its key's."""
    parsed = _parse_price_key(key)
    if parsed is None:
        shown = repr(key[:60]) if key is not None else "None"
        raise DecodeError("invalid_key", f"key {shown} ({len(key or b'')} bytes)")
    model, effective_from = parsed
    if value is None:
        return model, effective_from, None
    try:
        price = decode_price(value)
    except DecodeError as exc:
        raise DecodeError(exc.reason, f"for {model!r:.80}: {exc.detail}") from None
    if price.model != model or price.effective_from != effective_from:
        raise DecodeError("key_value_mismatch", f"key names {model!r:.80} from {format_instant(effective_from)}, "
                                                f"value {price.model!r:.80} from {format_instant(price.effective_from)}")
    return model, effective_from, price


def _known(count: int | None) -> int:
    return count if count is not None and count > 0 else 0


def cost_micros(
    price: ModelPrice,
    *,
    input_tokens: int | None,
    output_tokens: int | None,
    total_tokens: int,
    cached_input_tokens: int | None = None,
    reasoning_tokens: int | None = None,
) -> int:
    """What one call cost, in micro-units of ``price.currency``: integers only, rounded up once.

    The accounting of OpenAI and Azure OpenAI: cached input tokens are part of ``input_tokens``,
    reasoning tokens part of ``output_tokens``; each is billed at its own price (or, when that is
    None, at the input / output price) and the rest of input / output at theirs:

        ceil(((input - cached) * input_price + cached * cached_price
              + (output - reasoning) * output_price + reasoning * reasoning_price) / 1,000,000)

    A split the provider did not report is derived from ``total_tokens``: input or output None,
    it is ``total`` less the other (never below 0); both None, all of ``total`` is output, the
    dearer kind, so an unknown split never bills less than the call can have cost. Cached and
    reasoning counts are capped at the count they are part of; a negative count counts as 0.
    Same counts and price, same integer, on every machine.
    """
    total = _known(total_tokens)
    if input_tokens is None and output_tokens is None:
        inp, out = 0, total
    elif input_tokens is None:
        out = _known(output_tokens)
        inp = max(total - out, 0)
    elif output_tokens is None:
        inp = _known(input_tokens)
        out = max(total - inp, 0)
    else:
        inp, out = _known(input_tokens), _known(output_tokens)
    cached = min(_known(cached_input_tokens), inp)
    reasoning = min(_known(reasoning_tokens), out)
    cached_price = price.input_per_mtok if price.cached_input_per_mtok is None else price.cached_input_per_mtok
    reasoning_price = price.output_per_mtok if price.reasoning_per_mtok is None else price.reasoning_per_mtok
    scaled = ((inp - cached) * price.input_per_mtok + cached * cached_price
              + (out - reasoning) * price.output_per_mtok + reasoning * reasoning_price)
    return -(-scaled // PER_TOKENS)


class Cost(NamedTuple):
    """What one call cost: ``micros`` of ``currency`` (None when unpriced), and by which price."""

    micros: int
    currency: str | None
    priced: PricedAs


UNPRICED = Cost(0, None, "unpriced")


class PricedUsage(Protocol):
    """What pricing reads of a usage event: a ``UsageEvent`` or the middleware's ``UsageDraft``."""

    @property
    def model(self) -> str | None: ...
    @property
    def event_time(self) -> datetime: ...
    @property
    def input_tokens(self) -> int | None: ...
    @property
    def output_tokens(self) -> int | None: ...
    @property
    def total_tokens(self) -> int: ...
    @property
    def cache_read_input_tokens(self) -> int | None: ...
    @property
    def reasoning_output_tokens(self) -> int | None: ...


def refuses(cost: Cost, policy: UnknownModelPolicy) -> bool:
    """Whether a caller under ``policy`` refuses a call that ``cost`` priced."""
    return policy == "refuse" and cost.priced == "unpriced"


class PriceTable:
    """Every version of every model's price, as a reader of the limits topic keeps them.

    Per model two parallel sorted lists (instants, prices): a lookup is one bisection.
    """

    __slots__ = ("_versions",)

    def __init__(self) -> None:
        self._versions: dict[str, tuple[list[datetime], list[ModelPrice]]] = {}

    def __len__(self) -> int:
        return sum(len(times) for times, _ in self._versions.values())

    def versions(self) -> list[ModelPrice]:
        """Every version, ordered by model then effective_from."""
        return [price for model in sorted(self._versions) for price in self._versions[model][1]]

    def set(self, price: ModelPrice) -> None:
        """Add a version, or replace the one of the same model and effective_from."""
        times, prices = self._versions.setdefault(price.model, ([], []))
        at = bisect_left(times, price.effective_from)
        if at < len(times) and times[at] == price.effective_from:
            prices[at] = price
        else:
            times.insert(at, price.effective_from)
            prices.insert(at, price)

    def delete(self, model: str, effective_from: datetime) -> None:
        """Remove one version (a tombstone); absent, nothing happens."""
        found = self._versions.get(model)
        if found is None:
            return
        times, prices = found
        at = bisect_left(times, effective_from)
        if at < len(times) and times[at] == effective_from:
            del times[at], prices[at]
            if not times:
                del self._versions[model]

    def _own(self, model: str, when: datetime) -> ModelPrice | None:
        found = self._versions.get(model)
        if found is None:
            return None
        at = bisect_right(found[0], when) - 1
        return found[1][at] if at >= 0 else None

    def price_at(self, model: str | None, when: datetime) -> ModelPrice | None:
        """The price of ``model`` in force at ``when`` (the version with the greatest
        effective_from <= ``when``); else the ``"*"`` default's at ``when``; else None. A model
        of None (not reported) has only the default."""
        return (self._own(model, when) if model else None) or self._own(DEFAULT_MODEL, when)

    def cost(
        self,
        model: str | None,
        when: datetime,
        *,
        input_tokens: int | None,
        output_tokens: int | None,
        total_tokens: int,
        cached_input_tokens: int | None = None,
        reasoning_tokens: int | None = None,
    ) -> Cost:
        """What a call of ``model`` at ``when`` cost (``cost_micros``), and by which price."""
        own = self._own(model, when) if model and model != DEFAULT_MODEL else None
        price = own or self._own(DEFAULT_MODEL, when)
        if price is None:
            return UNPRICED
        micros = cost_micros(price, input_tokens=input_tokens, output_tokens=output_tokens, total_tokens=total_tokens,
                             cached_input_tokens=cached_input_tokens, reasoning_tokens=reasoning_tokens)
        return Cost(micros, price.currency, "exact" if own is not None else "default")

    def cost_of(self, event: PricedUsage) -> Cost:
        """What a usage event cost, priced at its ``event_time``: cached input is the event's
        ``cache_read_input_tokens``, reasoning its ``reasoning_output_tokens`` (cache writes are
        input at the input price). Every consumer prices events through this one mapping."""
        return self.cost(event.model, event.event_time, input_tokens=event.input_tokens,
                         output_tokens=event.output_tokens, total_tokens=event.total_tokens,
                         cached_input_tokens=event.cache_read_input_tokens,
                         reasoning_tokens=event.reasoning_output_tokens)
