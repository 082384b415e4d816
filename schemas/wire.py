"""Bytes <-> models, and the record keys; the one place that knows the wire format.

Values are compact JSON produced and parsed by pydantic's Rust core. Keys that join two fields are
JSON arrays, so a tenant id containing any separator cannot collide with another tenant's key.
"""

from __future__ import annotations

import json
import operator
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import msgspec
import orjson
from pydantic import BaseModel, TypeAdapter, ValidationError

from schemas import compiled
from schemas.errors import DecodeError
from schemas.limits import QuotaLimit
from schemas.notices import NOTICE_MESSAGE, Heartbeat, QuotaNotice
from schemas.policy import QuotaRule
from schemas.totals import TotalsRecord
from schemas.usage import USAGE_FIELDS, UsageEvent, plain_class

M = TypeVar("M", bound=BaseModel)

# A record larger than this is not a usage event; refuse it before parsing.
MAX_RECORD_BYTES = 64 * 1024


def encode(model: BaseModel) -> bytes:
    return model.__pydantic_serializer__.to_json(model)


def _decode(adapter: Any, data: bytes | None, what: str) -> Any:
    if data is None:
        raise DecodeError("empty_value", f"{what} record has no value")
    if not data:
        raise DecodeError("empty_value", f"{what} record has an empty value")
    if len(data) > MAX_RECORD_BYTES:
        raise DecodeError("oversized", f"{what} record of {len(data)} bytes exceeds {MAX_RECORD_BYTES}")
    try:
        return adapter.validate_json(data)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
        kind, loc, message = (errors[0]["type"], errors[0]["loc"], errors[0]["msg"]) if errors else ("invalid", (), str(exc))
        if kind == "json_invalid":
            raise DecodeError("invalid_json", message) from None
        location = ".".join(str(part) for part in loc) or what
        reason = "unsupported_version" if location == "schema_version" else "invalid_schema"
        raise DecodeError(reason, f"{location}: {message}") from None


_USAGE = TypeAdapter(UsageEvent)
_TOTALS = TypeAdapter(TotalsRecord)
_LIMIT = TypeAdapter(QuotaLimit)
_RULE = TypeAdapter(QuotaRule)


_usage_values = operator.attrgetter(*USAGE_FIELDS)


class UsageLike(Protocol):
    """What the publisher needs of an event: a ``UsageEvent``, or an unvalidated draft with the
    same attribute names built on the middleware's hot path."""

    @property
    def event_id(self) -> str: ...
    @property
    def tenant_id(self) -> str: ...
    @property
    def period_key(self) -> str: ...
    @property
    def total_tokens(self) -> int: ...
    @property
    def instance_id(self) -> str: ...
    @property
    def event_time(self) -> datetime: ...


_DRAFT_DOC = """A usage event as the middleware's hot path builds it: ``UsageEvent``'s fields, unvalidated.

Generated from the model's fields (``schemas.usage.plain_class``): positional in the model's
order, the schema version filled in. Building the pydantic model costs more than the rest of the
middleware's per-call work; the values come from our own code, and the aggregator validates every
event again, so a bug there would become a dead letter, not a wrong total.
"""

if TYPE_CHECKING:
    UsageDraft = UsageEvent  # what a type checker sees: the same fields, the same types
else:
    UsageDraft = plain_class("UsageDraft", USAGE_FIELDS, module=__name__, doc=_DRAFT_DOC, positional=True)


def encode_usage(event: UsageLike) -> bytes:
    """The usage event's JSON, from a ``UsageDraft`` or a ``UsageEvent``.

    The publisher's fast path: orjson serialises the draft dataclass directly, no model built.
    It writes the same bytes as ``encode(UsageEvent(...))`` (tests/unit/test_usage_type.py holds
    the two together), so every consumer decodes it with ``decode_usage``.
    """
    if type(event) is UsageDraft:
        return orjson.dumps(event, option=orjson.OPT_UTC_Z)
    return orjson.dumps(dict(zip(USAGE_FIELDS, _usage_values(event), strict=True)), option=orjson.OPT_UTC_Z)


def encode_fields(fields: dict[str, Any]) -> bytes:
    """JSON of a record given as its model's field names and values, without building the model:
    for records our own code writes in bulk (the changelog). Tests hold each such call to decode
    to the same model as ``encode(model)``."""
    return orjson.dumps(fields, option=orjson.OPT_UTC_Z)


def decode_usage(data: bytes | None) -> UsageEvent:
    return _decode(_USAGE, data, "usage")


# What the hot readers get: the model's fields as a msgspec Struct (``schemas.compiled``), with the
# same attribute names and values, decoded in C at a fraction of the model's cost; typed as the
# model for a type checker. Not a pydantic model: no ``model_*`` methods, and it never equals a
# model (compare ``msgspec.structs.asdict(struct)`` with ``dict(model)``).

if TYPE_CHECKING:
    FastUsageEvent = UsageEvent
    FastTotalsRecord = TotalsRecord
else:
    FastUsageEvent = compiled.UsageEventStruct
    FastTotalsRecord = compiled.TotalsRecordStruct


_compiled_usage = compiled.decode_usage
_compiled_totals = compiled.decode_totals


def decode_usage_record(key: bytes | None, value: bytes | None) -> FastUsageEvent:
    """A usage record as the aggregator and the verifier accept it: valid value, and a key that is
    the event's tenant (else the tenant's events are not in one partition, in order).

    A ``FastUsageEvent``: the aggregator decodes every record, and a pydantic model per record
    would cap it near 160k events/s on its own. The compiled decoder accepts only what the model
    accepts, with the same values (tests/unit/test_fast_decode.py); whatever it does not accept is
    pydantic's to decide, as before: its error, or its event as the Struct."""
    event = _compiled_usage(value) if value and len(value) <= MAX_RECORD_BYTES else None
    if event is None:
        return compiled.usage_struct(dict(decode_usage_record_model(key, value)))  # type: ignore[return-value]
    if key != event.tenant_id.encode():
        shown = key[:80].decode(errors="replace") if key is not None else None
        raise DecodeError("key_mismatch", f"record key {shown!r} is not the event's tenant id")
    return event  # type: ignore[return-value]


def decode_usage_record_model(key: bytes | None, value: bytes | None) -> UsageEvent:
    """``decode_usage_record`` decided by the pydantic model alone: what the independent verifier
    uses, so the compiled decoder it judges is not also the judge."""
    event = decode_usage(value)
    if key != event.tenant_id.encode():
        shown = key[:80].decode(errors="replace") if key is not None else None
        raise DecodeError("key_mismatch", f"record key {shown!r} is not the event's tenant id")
    return event


def decode_totals(data: bytes | None) -> FastTotalsRecord:
    """A changelog record as a ``FastTotalsRecord``: a restore decodes one per key, a million at a
    time (``decode_totals_model`` gives the pydantic model). Decided as ``decode_usage_record``."""
    record = _compiled_totals(data) if data and len(data) <= MAX_RECORD_BYTES else None
    if record is None:
        record = compiled.totals_struct(dict(decode_totals_model(data)))
    return record  # type: ignore[return-value]


def decode_totals_model(data: bytes | None) -> TotalsRecord:
    return _decode(_TOTALS, data, "totals")


def usage_model(event: FastUsageEvent) -> UsageEvent:
    """The pydantic model of a decoded event, for the readers that show, compare or re-encode it.
    Not validated again: the values are the model's own (``decode_usage_record`` proved them)."""
    if isinstance(event, UsageEvent):
        return event
    return UsageEvent.model_construct(**msgspec.structs.asdict(event))


def totals_model(record: FastTotalsRecord) -> TotalsRecord:
    """The pydantic model of a decoded changelog record (see ``usage_model``)."""
    if isinstance(record, TotalsRecord):
        return record
    return TotalsRecord.model_construct(**msgspec.structs.asdict(record))


def decode_limit(data: bytes | None) -> QuotaLimit:
    return _decode(_LIMIT, data, "limit")


def decode_rule(data: bytes | None) -> QuotaRule:
    return _decode(_RULE, data, "rule")


def decode_notice(data: bytes | None) -> QuotaNotice | Heartbeat:
    return _decode(NOTICE_MESSAGE, data, "notice")


USAGE_EVENT_TYPE = "io.tokenguard.usage.v1"


_SPECVERSION = ("ce_specversion", b"1.0")
_TYPE = ("ce_type", USAGE_EVENT_TYPE.encode())
_CONTENT_TYPE = ("content-type", b"application/json")


_sources: dict[str, tuple[str, bytes]] = {}


def usage_headers(event: UsageLike) -> list[tuple[str, bytes]]:
    """CloudEvents 1.0 Kafka binding, binary mode: the value stays our JSON, the envelope goes in
    ``ce_*`` headers, so CloudEvents consumers ingest the topic as it is and ours read ``ce_id``
    without parsing the value. The required attributes plus ``subject`` (the tenant); the
    optional ``time`` is left out, the value's ``event_time`` carries it."""
    source = _sources.get(event.instance_id)
    if source is None:
        if len(_sources) > 10_000:
            _sources.clear()
        source = _sources[event.instance_id] = ("ce_source", f"/tokenguard/{event.instance_id}".encode())
    return [
        _SPECVERSION,
        ("ce_id", event.event_id.encode()),
        source,
        _TYPE,
        ("ce_subject", event.tenant_id.encode()),
        _CONTENT_TYPE,
    ]


def _pack(*parts: str | int) -> bytes:
    """A JSON array key, compact, UTF-8, nothing escaped but what JSON requires: the bytes
    ``json.dumps(parts, separators=(",", ":"), ensure_ascii=False)`` gives (tests hold the two
    equal), from orjson at a twentieth of the cost; the aggregator writes one per changed key."""
    return orjson.dumps(parts)


def usage_key(tenant_id: str) -> bytes:
    return tenant_id.encode()


def tenant_period_key(tenant_id: str, period_key: str) -> bytes:
    """Key of the totals and notices records of one tenant-period."""
    return _pack(tenant_id, period_key)


def parse_tenant_period_key(key: bytes | None) -> tuple[str, str] | None:
    """(tenant, period) from a totals or notices key; None for any other key (a heartbeat's, or
    bytes no writer of ours produces: a hostile key must not cost more than its size to refuse)."""
    if key is None or len(key) > 4096 or not key.startswith(b'["'):
        return None
    try:
        parts = json.loads(key)
    except (ValueError, RecursionError):
        return None
    # Printable only, as the models require: no lone surrogates (they cannot be encoded again).
    if isinstance(parts, list) and len(parts) == 2 and all(isinstance(p, str) and p.isprintable() for p in parts):
        return parts[0], parts[1]
    return None


def heartbeat_key(usage_partition: int) -> bytes:
    # A tenant-period key is two strings; an int second element can never collide with one.
    return _pack("heartbeat", usage_partition)


def limit_key(tenant_id: str | None) -> bytes:
    return _pack("default") if tenant_id is None else _pack("tenant", tenant_id)
