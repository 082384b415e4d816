"""What the fleet admits, checked with the usage schema's own bounds, at the edge.

The aggregator validates every usage event against ``UsageEvent`` and dead-letters what does not
fit, so an event the middleware builds outside those bounds is spend that no total ever counts.
The rules here read their numbers from the schema (its fields' annotations and metadata), never
from copies, so the edge and the aggregator cannot drift apart:

- at construction, what the application configures: the instance id, ``quota_tokens``, the
  store's attributes; a mistake there is a ``ValueError`` / ``TypeError`` before any call;
- per call, before the LLM is called: the tenant id and the period key (from user-supplied
  functions); a bad one is an ``InvalidCallError`` (a ``ValueError``);
- per call, after it, what the provider reported: the model name and the token counts are
  corrected into the schema's bounds, never refused (the call has happened; refusing would lose
  its usage), and the event says so (``estimated``) when a count is not the provider's.

Pure functions, no I/O.
"""

from __future__ import annotations

import dataclasses
import hashlib
import types
import typing
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Annotated, Any, NamedTuple

from annotated_types import Le, MaxLen, MinLen
from pydantic import ConfigDict, TypeAdapter, ValidationError
from pydantic.fields import FieldInfo

from producer.errors import InvalidCallError
from producer.store import CallUsage
from schemas.policy import COUNTER_PREFIX
from schemas.usage import UsageEvent
from schemas.wire import MAX_RECORD_BYTES, UsageDraft, encode_usage


def _constraints(annotation: Any) -> list[Any]:
    """The constraint objects inside an annotation, through ``Optional``, ``Annotated`` and ``Field``."""
    found: list[Any] = []
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        base, *extra = typing.get_args(annotation)
        for item in extra:
            found.extend(item.metadata if isinstance(item, FieldInfo) else [item])
        found.extend(_constraints(base))
    elif origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            found.extend(_constraints(arg))
    return found


def _field(name: str) -> tuple[Any, list[Any]]:
    """(annotation, constraints) of one ``UsageEvent`` field."""
    info = UsageEvent.model_fields[name]
    return info.annotation, [*info.metadata, *_constraints(info.annotation)]


def _bound(constraints: list[Any], kind: type, attribute: str) -> int:
    for item in constraints:
        if isinstance(item, kind):
            return int(getattr(item, attribute))
    raise LookupError(f"the usage schema sets no {kind.__name__} here")  # a schema change this module must follow


def _adapter(name: str) -> TypeAdapter[Any]:
    """Validates one field's value exactly as the aggregator will (strict, same constraints)."""
    info = UsageEvent.model_fields[name]
    annotation: Any = Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
    return TypeAdapter(annotation, config=ConfigDict(strict=True))


_KEY_TYPE, _VALUE_TYPE = typing.get_args(UsageEvent.model_fields["attributes"].annotation)

MAX_TOKENS_PER_EVENT = _bound(_field("total_tokens")[1], Le, "le")
MAX_QUOTA_TOKENS = _bound(_field("quota_tokens")[1], Le, "le")
MAX_MODEL_CHARS = _bound(_field("model")[1], MaxLen, "max_length")
MAX_TENANT_CHARS = _bound(_field("tenant_id")[1], MaxLen, "max_length")
MAX_PERIOD_CHARS = _bound(_field("period_key")[1], MaxLen, "max_length")
MIN_PERIOD_CHARS = _bound(_field("period_key")[1], MinLen, "min_length")
MAX_INSTANCE_CHARS = _bound(_field("instance_id")[1], MaxLen, "max_length")
MAX_ATTRIBUTES = _bound(_field("attributes")[1], MaxLen, "max_length")
MAX_ATTRIBUTE_KEY_CHARS = _bound(_constraints(_KEY_TYPE), MaxLen, "max_length")
MAX_ATTRIBUTE_VALUE_CHARS = _bound(_constraints(_VALUE_TYPE), MaxLen, "max_length")

_TENANT = _adapter("tenant_id")
_PERIOD = _adapter("period_key")
_INSTANCE = _adapter("instance_id")
_QUOTA = _adapter("quota_tokens")
_ATTRIBUTES = _adapter("attributes")


def _problem(exc: ValidationError) -> tuple[bool, str]:
    """(is a type error, pydantic's message) of the first error, without the offending input."""
    first = exc.errors(include_url=False, include_input=False)[0]
    location = ".".join(str(part) for part in first["loc"])
    message = f"{location}: {first['msg']}" if location else first["msg"]
    return first["type"].endswith("_type"), message


def _check(adapter: TypeAdapter[Any], value: Any, what: str, error: type[Exception] = ValueError) -> Any:
    try:
        return adapter.validate_python(value)
    except ValidationError as exc:
        wrong_type, message = _problem(exc)
        if wrong_type and error is ValueError:
            raise TypeError(f"{what} has the wrong type ({type(value).__name__}): {message}") from None
        raise error(f"{what} {value!r:.80} does not fit the usage schema: {message}") from None


# --- at construction -------------------------------------------------------------------------


def check_instance_id(value: Any) -> str:
    """An instance id the usage schema accepts (it is in every event and in ``ce_source``)."""
    return str(_check(_INSTANCE, value, "instance_id"))


def check_quota_tokens(value: Any) -> int:
    """``quota_tokens`` as an int within the schema's limit bound.

    An integral float (``50_000.0``, ``1e6``) is taken as the int it names, as the seed took it;
    a bool, a string or a fraction is a ``TypeError``, a negative or too large number a ``ValueError``.
    """
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"quota_tokens must be an integer, got {type(value).__name__} {value!r:.40}")
    if not 0 <= value <= MAX_QUOTA_TOKENS:
        raise ValueError(f"quota_tokens must be a non-negative integer of at most {MAX_QUOTA_TOKENS}, got {value!r}")
    return int(_check(_QUOTA, value, "quota_tokens"))


def check_attributes(value: Mapping[str, str] | None) -> dict[str, str]:
    """Attributes carried by every event: the schema's count and length bounds, UTF-8 text, and
    small enough that the largest event this store can build still fits a record."""
    attributes = dict(value or {})
    checked: dict[str, str] = _check(_ATTRIBUTES, attributes, "attributes")
    for key, text in checked.items():
        for part in (key, text):
            try:
                part.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(f"attribute {key!r:.80} is not encodable as UTF-8 (a lone surrogate)") from None
    size = len(encode_usage(_largest_event(checked)))
    if size > MAX_RECORD_BYTES:
        raise ValueError(
            f"attributes too large: an event carrying them could take {size} bytes, over the "
            f"{MAX_RECORD_BYTES} a usage record may have"
        )
    return checked


def _largest_event(attributes: dict[str, str]) -> UsageDraft:
    """The largest encoding an event with these attributes can have: every other string at its
    longest, in the characters that cost the most bytes (4-byte UTF-8 where only printable text is
    allowed, 6-byte JSON escapes where any text is)."""
    wide, escaped = "\U0001d518", "\x01"
    return UsageDraft(
        event_id="x" * 64, tenant_id=wide * MAX_TENANT_CHARS, period_key=wide * MAX_PERIOD_CHARS,
        model=escaped * MAX_MODEL_CHARS, input_tokens=MAX_TOKENS_PER_EVENT, output_tokens=MAX_TOKENS_PER_EVENT,
        total_tokens=MAX_TOKENS_PER_EVENT, cache_creation_input_tokens=MAX_TOKENS_PER_EVENT,
        cache_read_input_tokens=MAX_TOKENS_PER_EVENT, reasoning_output_tokens=MAX_TOKENS_PER_EVENT,
        quota_tokens=MAX_QUOTA_TOKENS, event_time=datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        streaming=True, estimated=True, instance_id=wide * MAX_INSTANCE_CHARS, attributes=attributes,
        trace_id="f" * 32, span_id="f" * 16,
    )


# --- per call, before the LLM ----------------------------------------------------------------


def check_call_keys(tenant_id: Any, period_key: Any) -> None:
    """The tenant id (from ``user_id_getter``) and the period key (from ``period_key_fn``): both
    user-supplied, both keys of every record downstream; ``InvalidCallError`` before the LLM call."""
    _check(_TENANT, tenant_id, "tenant id", InvalidCallError)
    _check(_PERIOD, period_key, "period key", InvalidCallError)
    # Printable whatever a schema version says: both become record keys, metric labels and text on
    # an operator's terminal, where a control character is an escape sequence.
    for what, value in (("tenant id", tenant_id), ("period key", period_key)):
        if not value.isprintable():
            raise InvalidCallError(f"{what} {value!r:.80} contains control characters")
    if period_key.startswith(COUNTER_PREFIX):
        raise InvalidCallError(f"period key {period_key!r:.80}: keys starting {COUNTER_PREFIX!r} are rule counters'")


# --- per call, after the LLM -----------------------------------------------------------------


def bound_model(model: Any) -> str | None:
    """The provider's model name, as the schema allows it.

    A name over the schema's length is cut deterministically and ends in ``~`` and 8 hex digits
    of a hash of the whole name, so two long names stay apart and one name always maps to the
    same text. Lone surrogates (not UTF-8) become U+FFFD. Never refused: by the time the name is
    known the call has been made, and refusing would lose its usage.
    """
    if model is None:
        return None
    name = model if type(model) is str else str(model)
    if len(name) > MAX_MODEL_CHARS:
        digest = hashlib.blake2b(name.encode("utf-8", "surrogatepass"), digest_size=4).hexdigest()
        name = f"{name[: MAX_MODEL_CHARS - 9]}~{digest}"
    if not name.isascii():
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            name = "".join("\ufffd" if "\ud800" <= c <= "\udfff" else c for c in name)
    return name


class Counts(NamedTuple):
    """Token counts of one call, within the schema's bounds; ``estimated`` when any is not the
    provider's own figure."""

    input_tokens: int | None
    output_tokens: int | None
    total_tokens: int
    cache_creation_input_tokens: int | None
    cache_read_input_tokens: int | None
    reasoning_output_tokens: int | None
    estimated: bool


_MISSING: Any = object()


def read_count(value: Any) -> tuple[int | None, bool]:
    """(count or None, reported wrong): a non-negative integer is a count; None or absent is no
    count; anything else (negative, not a number) is no count *and* a wrong report."""
    if type(value) is int:
        return (value, False) if value >= 0 else (None, True)
    if value is None or value is _MISSING:
        return None, False
    if isinstance(value, bool):
        return None, True
    try:
        count = int(value)
    except (TypeError, ValueError, OverflowError):
        return None, True
    return (count, False) if count >= 0 else (None, True)


Estimate = Callable[[], int]


def _positive(estimate: Estimate | None) -> bool:
    return estimate is not None and estimate() > 0


def settle_counts(
    details: Mapping[str, Any], *, input_estimate: Estimate | None = None, output_estimate: Estimate | None = None
) -> Counts:
    """Agent Framework usage details -> counts the schema accepts and billing can trust.

    Rules, in order (each correction flags the event ``estimated``):

    1. A count that is negative or not a number is treated as not reported; so is a 0 input or
       output where the call visibly had some (a non-zero estimate).
    2. No usable total: input and output are the provider's where reported, else estimated
       (``input_estimate`` / ``output_estimate``, 0 when not given), and the total is their sum
       (not flagged when both are the provider's: the sum is exact).
    3. A usable total with one part missing: the part is the total minus the other (exact, not
       flagged), or an estimate when that leaves it 0 or less while the call visibly had some
       (then rule 4 applies); both parts missing: split by the input estimate, the total kept (flagged).
    4. A total below input + output becomes the sum: billing never gets less than the parts.
    5. Counts above the schema's ``MAX_TOKENS_PER_EVENT`` are clamped to it, and input + output to
       it as well (output first lowered), so the total never exceeds the bound either: one call
       of a hundred million tokens is a provider bug, and clamping keeps the event countable
       where refusing it would lose the call's usage altogether.

    Estimates are callables so the common case (good provider counts) pays nothing for them.
    """
    get = details.get
    inp, out, total = get("input_token_count"), get("output_token_count"), get("total_token_count")
    limit = MAX_TOKENS_PER_EVENT
    # The common case, decided in a few comparisons: three provider counts that need no rule
    # (positive parts, a total at least their sum, within the bound) and no cache or reasoning
    # count but valid ones. Exactly what the rules below give it (tests/unit/test_settle_counts.py).
    if (
        type(inp) is int and type(out) is int and type(total) is int
        and inp > 0 and out > 0 and inp + out <= total <= limit
    ):
        cache_creation = get("cache_creation_input_token_count")
        cache_read = get("cache_read_input_token_count")
        reasoning = get("reasoning_output_token_count")
        if (
            (cache_creation is None or (type(cache_creation) is int and 0 <= cache_creation <= limit))
            and (cache_read is None or (type(cache_read) is int and 0 <= cache_read <= limit))
            and (reasoning is None or (type(reasoning) is int and 0 <= reasoning <= limit))
        ):
            return Counts(inp, out, total, cache_creation, cache_read, reasoning, False)
    return _settle_by_rules(details, input_estimate, output_estimate)


def _settle_by_rules(details: Mapping[str, Any], input_estimate: Estimate | None, output_estimate: Estimate | None) -> Counts:
    """``settle_counts``' rules, one by one, for any usage details."""
    get = details.get
    inp, bad_in = read_count(get("input_token_count", _MISSING))
    out, bad_out = read_count(get("output_token_count", _MISSING))
    total, bad_total = read_count(get("total_token_count", _MISSING))
    cache_creation, bad_cc = read_count(get("cache_creation_input_token_count", _MISSING))
    cache_read, bad_cr = read_count(get("cache_read_input_token_count", _MISSING))
    reasoning, bad_r = read_count(get("reasoning_output_token_count", _MISSING))
    estimated = bad_in or bad_out or bad_total or bad_cc or bad_cr or bad_r
    # Agent Framework sums usage with None as 0 before a chat middleware sees it, so a provider
    # that did not count arrives as 0. No call reads nothing, and text has tokens: such a 0 is
    # "not reported". (Input after a full prompt-cache hit may be 0: cache counts keep it.)
    if inp == 0 and not cache_read and not cache_creation and input_estimate is not None and input_estimate() > 0:
        inp, estimated = None, True
    if out == 0 and output_estimate is not None and output_estimate() > 0:
        out, estimated = None, True
    if total == 0 and (inp is None or out is None or inp + out > 0):
        total = None

    if total is None:
        if inp is None:
            inp, estimated = (input_estimate() if input_estimate else 0), True
        if out is None:
            out, estimated = (output_estimate() if output_estimate else 0), True
        total = inp + out
    elif inp is None and out is None:
        inp = min(input_estimate() if input_estimate else 0, total)
        out, estimated = total - inp, True
    elif inp is None:
        assert out is not None
        if out < total or (out == total and not _positive(input_estimate)):
            inp = total - out
        else:
            inp, estimated = (input_estimate() if input_estimate else 0), True
    elif out is None:
        if inp < total or (inp == total and not _positive(output_estimate)):
            out = total - inp
        else:
            out, estimated = (output_estimate() if output_estimate else 0), True
    assert inp is not None and out is not None
    if total < inp + out:
        total, estimated = inp + out, True

    limit = MAX_TOKENS_PER_EVENT
    if total > limit or inp > limit or out > limit:
        inp = min(inp, limit)
        out = min(out, limit - inp)
        total, estimated = min(total, limit), True
    extras = []
    for value in (cache_creation, cache_read, reasoning):
        if value is not None and value > limit:
            value, estimated = limit, True
        extras.append(value)
    return Counts(inp, out, total, extras[0], extras[1], extras[2], estimated)


def fit_usage(usage: CallUsage) -> CallUsage:
    """A ``CallUsage`` from any caller of a store's ``record()``, within the schema's bounds.

    The middleware's are already (``settle_counts``, ``bound_model``): for them this is a handful
    of comparisons. Another caller's counts get the same corrections where they apply (wrong ->
    not reported, total at least input + output, clamped), flagged ``estimated``; counts it left
    out stay out, since nothing here could estimate them.
    """
    limit = MAX_TOKENS_PER_EVENT
    inp, out, total, model = usage.input_tokens, usage.output_tokens, usage.total_tokens, usage.model
    extras = (usage.cache_creation_input_tokens, usage.cache_read_input_tokens, usage.reasoning_output_tokens)
    if (
        type(total) is int
        and (inp is None or (type(inp) is int and inp >= 0))
        and (out is None or (type(out) is int and out >= 0))
        and (inp or 0) + (out or 0) <= total <= limit
        and all(value is None or (type(value) is int and 0 <= value <= limit) for value in extras)
        and (model is None or (type(model) is str and model.isascii() and len(model) <= MAX_MODEL_CHARS))
        and type(usage.quota_tokens) is int
        and 0 <= usage.quota_tokens <= MAX_QUOTA_TOKENS
        and usage.event_time.tzinfo is not None
    ):
        return usage
    fixed = [read_count(value) for value in (inp, out, total, *extras)]
    estimated = usage.estimated or any(wrong for _, wrong in fixed)
    (inp, _), (out, _), (reported, _) = fixed[:3]
    parts = (inp or 0) + (out or 0)
    total = reported if reported is not None else parts
    if reported is None or total < parts:
        total, estimated = parts, estimated or reported is not None or inp is None or out is None
    if total > limit or (inp or 0) > limit or (out or 0) > limit:
        inp = None if inp is None else min(inp, limit)
        out = None if out is None else min(out, limit - (inp or 0))
        total, estimated = min(total, limit), True
    bounded = []
    for value, _ in fixed[3:]:
        if value is not None and value > limit:
            value, estimated = limit, True
        bounded.append(value)
    quota = read_count(usage.quota_tokens)[0] or 0
    when = usage.event_time if usage.event_time.tzinfo is not None else usage.event_time.replace(tzinfo=UTC)
    return dataclasses.replace(
        usage, model=bound_model(model), quota_tokens=min(quota, MAX_QUOTA_TOKENS), event_time=when, input_tokens=inp, output_tokens=out, total_tokens=total,
        cache_creation_input_tokens=bounded[0], cache_read_input_tokens=bounded[1],
        reasoning_output_tokens=bounded[2], estimated=estimated,
    )
