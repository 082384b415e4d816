"""Telemetry without a broker: the usage event's trace ids (schema version 2)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from producer.tracing import trace_fields
from schemas.errors import DecodeError
from schemas.usage import USAGE_SCHEMA_VERSION, UsageEvent
from schemas.wire import decode_usage, encode

TRACE_ID = 0x4BF92F3577B34DA6A3CE929D0E0E4736
SPAN_ID = 0x00F067AA0BA902B7


def span() -> NonRecordingSpan:
    return NonRecordingSpan(SpanContext(TRACE_ID, SPAN_ID, is_remote=False, trace_flags=TraceFlags(TraceFlags.SAMPLED)))


def event(**overrides: object) -> UsageEvent:
    fields: dict[str, object] = {
        "event_id": "0123456789abcdef", "tenant_id": "acme", "period_key": "2026-04", "total_tokens": 5,
        "quota_tokens": 50, "event_time": datetime(2026, 4, 14, tzinfo=UTC), "instance_id": "host-1",
    }
    return UsageEvent(**(fields | overrides))  # type: ignore[arg-type]


def test_no_active_span_means_no_ids() -> None:
    assert trace_fields() == {}


def test_the_active_span_ids_as_w3c_hex() -> None:
    with trace.use_span(span()):
        fields = trace_fields()
    assert fields == {"trace_id": "4bf92f3577b34da6a3ce929d0e0e4736", "span_id": "00f067aa0ba902b7"}
    assert event(**fields).trace_id == fields["trace_id"]


def test_an_invalid_span_context_gives_no_ids() -> None:
    with trace.use_span(trace.INVALID_SPAN):
        assert trace_fields() == {}


def test_new_events_are_version_2_and_carry_the_ids_on_the_wire() -> None:
    assert USAGE_SCHEMA_VERSION == 2
    with trace.use_span(span()):
        original = event(**trace_fields())
    decoded = decode_usage(encode(original))
    assert decoded == original and decoded.schema_version == 2 and decoded.span_id == "00f067aa0ba902b7"


def test_a_version_1_event_without_the_fields_still_decodes() -> None:
    data = encode(event()).replace(b'"schema_version":2', b'"schema_version":1')
    old = decode_usage(data.replace(b',"trace_id":null,"span_id":null', b""))
    assert old.schema_version == 1 and old.trace_id is None and old.span_id is None


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("trace_id", "4BF92F3577B34DA6A3CE929D0E0E4736"),  # upper case is not the W3C form
        ("trace_id", "4bf92f3577b34da6a3ce929d0e0e473"),  # 31 characters
        ("trace_id", "4bf92f3577b34da6a3ce929d0e0e4736ab"),
        ("span_id", "00f067aa0ba902b"),
        ("span_id", "00f067aa0ba902bz"),
        ("span_id", ""),
    ],
)
def test_malformed_ids_are_refused(field: str, value: str) -> None:
    data = encode(event()).replace(f'"{field}":null'.encode(), f'"{field}":"{value}"'.encode())
    with pytest.raises(DecodeError) as info:
        decode_usage(data)
    assert info.value.reason == "invalid_schema"
