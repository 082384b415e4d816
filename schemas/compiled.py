"""Compiled mirrors of ``UsageEvent`` and ``TotalsRecord``: msgspec Structs with the models' field
names, order, defaults and constraints, for the readers that decode every record (the
aggregator's intake, the changelog restore).

Pydantic builds a model per record at 4-6 us; the aggregator is to read 150k records a second. A
Struct decoded in C and checked here costs about a third of that (``bench/decode.py``). The rules stay the models': these decoders only
ever *accept* what the model accepts, with equal values, and give up (``None``) on anything else,
so the caller asks pydantic, whose answer (the value or today's error) stands. What msgspec does
not check the same way is checked here after decoding:

- printable text (the models' ``AfterValidator``): ``str.isprintable`` on the same fields;
- patterns, with ``re.fullmatch`` (msgspec would ``re.search`` with Python's ``$``, which also
  matches before a final newline; pydantic's Rust regex does not), and cheaper here than there;
- timestamps: decoded as text, accepted only in the RFC 3339 spelling every writer of ours uses
  (``T``, ``Z`` or ``+hh:mm``, at most six fraction digits, hours below 24, offset minutes below
  60) and parsed by ``datetime.fromisoformat``: msgspec rounds a seventh digit where pydantic
  truncates it, and ``fromisoformat`` reads ``+05:60`` as ``+06:00``; other spellings go to pydantic;
- unknown fields are refused (``forbid_unknown_fields``), so a record from a newer producer goes to
  pydantic, which ignores them: msgspec skips an unknown value more leniently than pydantic parses
  it (nesting deeper than pydantic's limit of 200, for one).

``tests/unit/test_fast_decode.py`` holds the mirrors to the models (a field added or re-constrained
on one side fails there) and the decoders to pydantic's outcomes on hostile and random inputs.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, Final, Literal

import msgspec
from msgspec import Meta
from msgspec.structs import force_setattr

from schemas._types import MAX_LIMIT_TOKENS, MAX_TOKENS_PER_EVENT

# --- field types: each the msgspec spelling of one in schemas._types / schemas.usage ------------
Identifier = Annotated[str, Meta(min_length=1, max_length=256)]  # + printable
PeriodKey = Annotated[str, Meta(min_length=1, max_length=64)]  # + printable
ShortText = Annotated[str, Meta(min_length=1, max_length=128)]  # + printable
TokenCount = Annotated[int, Meta(ge=0, le=MAX_TOKENS_PER_EVENT)]
LimitTokens = Annotated[int, Meta(ge=0, le=MAX_LIMIT_TOKENS)]
Count = Annotated[int, Meta(ge=0)]
Offset = Annotated[int, Meta(ge=-1)]
Partition = Annotated[int, Meta(ge=0)]
# Decoded as its text; ``_time`` makes it the datetime pydantic would (see the module's docstring).
TimestampText = str
EventId = Annotated[str, Meta(min_length=8, max_length=64)]  # + EVENT_ID_PATTERN
ModelName = Annotated[str, Meta(max_length=256)]
AttributeKey = Annotated[str, Meta(min_length=1, max_length=64)]
AttributeValue = Annotated[str, Meta(max_length=256)]
Attributes = Annotated[dict[AttributeKey, AttributeValue], Meta(max_length=32)]
TraceId = Annotated[str, Meta(min_length=32, max_length=32)]  # + lowercase hex
SpanId = Annotated[str, Meta(min_length=16, max_length=16)]  # + lowercase hex

# The models' patterns, each as one ``re.fullmatch`` (the drift test compares them).
EVENT_ID_PATTERN: Final = r"[A-Za-z0-9_-]+"
TRACE_ID_PATTERN: Final = r"[0-9a-f]{32}"
SPAN_ID_PATTERN: Final = r"[0-9a-f]{16}"

# Timestamps in the spellings taken here, each digit written 0 (``_DIGITS``). The digits themselves,
# and the ranges of day, month, minute and second, are ``fromisoformat``'s to check.
_SHAPES: Final = frozenset(
    f"0000-00-00T00:00:00{fraction}{zone}".encode()
    for fraction in ("", *("." + "0" * n for n in range(1, 7)))
    for zone in ("Z", "+00:00", "-00:00")
)
_DIGITS: Final = bytes.maketrans(b"0123456789", b"0" * 10)


class UsageEventStruct(msgspec.Struct, frozen=True, kw_only=True, gc=False, forbid_unknown_fields=True):
    """``schemas.usage.UsageEvent`` as a Struct: same attribute names, order, defaults and values."""

    event_id: EventId
    schema_version: Literal[1, 2] = 2
    tenant_id: Identifier
    period_key: PeriodKey
    model: ModelName | None = None
    input_tokens: TokenCount | None = None
    output_tokens: TokenCount | None = None
    total_tokens: TokenCount
    cache_creation_input_tokens: TokenCount | None = None
    cache_read_input_tokens: TokenCount | None = None
    reasoning_output_tokens: TokenCount | None = None
    quota_tokens: LimitTokens
    event_time: TimestampText  # a datetime once decoded
    streaming: bool = False
    estimated: bool = False
    instance_id: ShortText
    attributes: Attributes = msgspec.field(default_factory=dict)
    trace_id: TraceId | None = None
    span_id: SpanId | None = None


class TotalsRecordStruct(msgspec.Struct, frozen=True, kw_only=True, gc=False, forbid_unknown_fields=True):
    """``schemas.totals.TotalsRecord`` as a Struct: same attribute names, order, defaults and values."""

    tenant_id: Identifier
    period_key: PeriodKey
    used_tokens: Count
    event_count: Count
    limit_tokens: LimitTokens
    state: Literal["ok", "warning", "exceeded"]
    usage_partition: Partition
    applied_offset: Offset
    updated_at: TimestampText  # a datetime once decoded
    event_quota_tokens: LimitTokens | None = None
    first_offset: Offset | None = None


# Fields whose model type carries the printable check, and the timestamp fields; the drift test
# compares both with the models.
USAGE_PRINTABLE: Final = ("tenant_id", "period_key", "instance_id")
USAGE_TIMES: Final = ("event_time",)
TOTALS_PRINTABLE: Final = ("tenant_id", "period_key")
TOTALS_TIMES: Final = ("updated_at",)

_usage = msgspec.json.Decoder(UsageEventStruct)
_totals = msgspec.json.Decoder(TotalsRecordStruct)
_fromisoformat = datetime.fromisoformat
_match_event_id = re.compile(EVENT_ID_PATTERN).fullmatch
_match_trace_id = re.compile(TRACE_ID_PATTERN).fullmatch
_match_span_id = re.compile(SPAN_ID_PATTERN).fullmatch


def _time(text: str) -> datetime | None:
    if not text.isascii() or text.encode().translate(_DIGITS) not in _SHAPES:
        return None
    if text[-1] != "Z" and text[-2] > "5":
        return None  # an offset's minutes of 60 or more: fromisoformat carries them into the hour
    if text[11] == "2" and text[12] > "3":
        return None  # hour 24, which pydantic refuses: not left to what a Python version's fromisoformat makes of it
    try:
        return _fromisoformat(text)
    except ValueError:
        return None


def decode_usage(data: bytes) -> UsageEventStruct | None:
    """The event if the model would accept ``data`` (equal values), else None: ask pydantic."""
    try:
        event = _usage.decode(data)
    except Exception:  # whatever it is, pydantic decides
        return None
    if not (event.tenant_id.isprintable() and event.period_key.isprintable() and event.instance_id.isprintable()):
        return None
    event_id = event.event_id
    if not (event_id.isalnum() and event_id.isascii()) and _match_event_id(event_id) is None:
        return None  # (ASCII letters and digits: the pattern's common case, without the regex)
    if event.trace_id is not None and _match_trace_id(event.trace_id) is None:
        return None
    if event.span_id is not None and _match_span_id(event.span_id) is None:
        return None
    when = _time(event.event_time)
    if when is None:
        return None
    force_setattr(event, "event_time", when)
    return event


def decode_totals(data: bytes) -> TotalsRecordStruct | None:
    """The record if the model would accept ``data`` (equal values), else None: ask pydantic."""
    try:
        record = _totals.decode(data)
    except Exception:  # whatever it is, pydantic decides
        return None
    if not (record.tenant_id.isprintable() and record.period_key.isprintable()):
        return None
    when = _time(record.updated_at)
    if when is None:
        return None
    force_setattr(record, "updated_at", when)
    return record


def usage_struct(fields: dict[str, Any]) -> UsageEventStruct:
    """The Struct of a ``UsageEvent``'s field values (``dict(event)``), trusted as they are."""
    return UsageEventStruct(**fields)


def totals_struct(fields: dict[str, Any]) -> TotalsRecordStruct:
    """The Struct of a ``TotalsRecord``'s field values (``dict(record)``), trusted as they are."""
    return TotalsRecordStruct(**fields)
