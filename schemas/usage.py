"""The usage event: one per LLM call, the durable record billing reads and replays."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from schemas._types import Identifier, LimitTokens, PeriodKey, ShortText, Timestamp, TokenCount

# Additive changes only: a new optional field bumps the version; old versions must still decode.
# Version 2 added ``trace_id`` and ``span_id``.
UsageSchemaVersion = Literal[1, 2]
USAGE_SCHEMA_VERSION: Literal[2] = 2

AttributeKey = Annotated[str, Field(min_length=1, max_length=64)]
AttributeValue = Annotated[str, Field(max_length=256)]
# W3C trace context ids as OpenTelemetry formats them: lowercase hex.
TraceId = Annotated[str, Field(min_length=32, max_length=32, pattern=r"^[0-9a-f]{32}$")]
SpanId = Annotated[str, Field(min_length=16, max_length=16, pattern=r"^[0-9a-f]{16}$")]


class UsageEvent(BaseModel):
    """What one LLM call spent, for one tenant in one period.

    Keyed on the wire by ``tenant_id`` so a tenant's events stay in order in one partition.
    ``event_id`` lets every consumer drop the duplicates that at-least-once delivery creates.
    ``trace_id`` / ``span_id`` (version 2): the OpenTelemetry span active when the call was
    recorded, if any, to join a usage event to its trace.
    """

    model_config = ConfigDict(frozen=True, strict=True, extra="ignore")

    event_id: Annotated[str, Field(min_length=8, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
    schema_version: UsageSchemaVersion = USAGE_SCHEMA_VERSION
    tenant_id: Identifier
    period_key: PeriodKey
    model: Annotated[str, Field(max_length=256)] | None = None
    input_tokens: TokenCount | None = None
    output_tokens: TokenCount | None = None
    total_tokens: TokenCount
    cache_creation_input_tokens: TokenCount | None = None
    cache_read_input_tokens: TokenCount | None = None
    reasoning_output_tokens: TokenCount | None = None
    quota_tokens: LimitTokens
    event_time: Timestamp
    streaming: bool = False
    estimated: bool = False
    instance_id: ShortText
    attributes: Annotated[dict[AttributeKey, AttributeValue], Field(max_length=32)] = Field(default_factory=dict)
    trace_id: TraceId | None = None
    span_id: SpanId | None = None


# --- the forms derived from it -------------------------------------------------------------------
# The fields above are the only declaration. The hot path cannot afford a pydantic model per call,
# so it carries plain slots dataclasses generated from them, once, at import:
# ``schemas.wire.UsageDraft`` (every field: what the publisher encodes) and
# ``producer.store.CallUsage`` (the fields the middleware reads from the provider).

USAGE_FIELDS: tuple[str, ...] = tuple(UsageEvent.model_fields)

# A field the writer never chooses (the version it writes) is never passed: a generated class fills it in.
FIXED_FIELDS: frozenset[str] = frozenset({"schema_version"})


def plain_class(
    name: str, fields: Sequence[str], *, module: str, doc: str, positional: bool, model: type[BaseModel] = UsageEvent
) -> type:
    """A slots dataclass with ``fields`` of ``model``: same names, order and annotations, nothing
    validated (whoever builds one is trusted, and the aggregator validates every event).

    ``positional``: every field required and positional in the model's order, so a hot path can
    build one from a tuple; the fixed fields keyword-only with their value. Otherwise every field
    keyword-only with the model's default, as a caller that leaves a field out would get from the
    model itself.
    """
    unknown = [field for field in fields if field not in model.model_fields]
    if unknown:
        raise ValueError(f"not fields of {model.__name__}: {unknown}")
    types = typing.get_type_hints(model)  # without the constraints: they are not checked here
    spec: list[tuple[str, Any, Any]] = []
    for field_name in fields:
        info = model.model_fields[field_name]
        if positional and field_name not in FIXED_FIELDS:
            default: Any = dataclasses.field()
        elif info.is_required():
            default = dataclasses.field(kw_only=True)
        elif info.default_factory is not None:
            default = dataclasses.field(default_factory=info.default_factory, kw_only=True)  # type: ignore[arg-type]
        else:
            default = dataclasses.field(default=info.default, kw_only=True)
        spec.append((field_name, types[field_name], default))
    cls = dataclasses.make_dataclass(name, spec, slots=True)
    cls.__module__, cls.__qualname__, cls.__doc__ = module, name, doc
    return cls
