"""The producer writes usage events with msgspec (``producer.encoding``); the wire format is
``schemas.wire.encode_usage``'s. Byte for byte the same, for every shape a draft can take, or an
event in the journal, the spool or the topic would differ from what the contract says."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta, timezone

import pytest

from producer.encoding import encode_event
from schemas.usage import UsageEvent
from schemas.wire import UsageDraft, decode_usage, encode, encode_usage

# Every code point up to U+0800 (all controls, quotes, backslash, DEL, Latin and beyond), the
# separators JavaScript treats as line ends, a BOM and an astral character.
TEXTS = [chr(code) for code in range(0x800)] + ["\u2028", "\u2029", "\ufeff", "\U0001f600", "a/b", "</script>"]


def draft(text: str = "x", **changes: object) -> UsageDraft:
    fields: dict[str, object] = dict(
        event_id="event-0001", tenant_id=f"t{text}", period_key="2026-11", model=f"m{text}", input_tokens=1,
        output_tokens=2, total_tokens=3, cache_creation_input_tokens=None, cache_read_input_tokens=None,
        reasoning_output_tokens=None, quota_tokens=10**15, event_time=datetime(2026, 11, 29, 1, 2, 3, 456789, tzinfo=UTC),
        streaming=False, estimated=False, instance_id=f"i{text}", attributes={f"k{text}": f"v{text}"},
        trace_id=None, span_id=None,
    )
    fields.update(changes)
    return UsageDraft(**fields)


@pytest.mark.parametrize("text", TEXTS, ids=lambda text: f"U+{ord(text[0]):04X}")
def test_strings_are_escaped_as_the_wire_format_escapes_them(text: str) -> None:
    event = draft(text)
    assert encode_event(event) == encode_usage(event)


TIMES = [
    datetime(2026, 1, 1, tzinfo=UTC),
    datetime(2026, 1, 1, 0, 0, 0, 1, tzinfo=UTC),
    datetime(2026, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
    datetime(2026, 6, 1, 1, 2, 3, 400, tzinfo=timezone(timedelta(hours=2))),
    datetime(2026, 6, 1, 1, 2, 3, tzinfo=timezone(timedelta(hours=-9, minutes=-30))),
]
COUNTS = [0, 1, 2**31, 2**53 + 1, 2**63 - 1]


@pytest.mark.parametrize(("when", "count"), list(itertools.product(TIMES, COUNTS)))
def test_times_and_counts_are_written_as_the_wire_format_writes_them(when: datetime, count: int) -> None:
    event = draft(
        event_time=when, input_tokens=count, output_tokens=None, total_tokens=count, cache_read_input_tokens=count,
        quota_tokens=count, streaming=True, estimated=True, trace_id="4bf92f3577b34da6a3ce929d0e0e4736",
        span_id="00f067aa0ba902b7", attributes={},
    )
    assert encode_event(event) == encode_usage(event)


def test_a_valid_draft_encodes_as_its_model_does_and_decodes_back() -> None:
    event = draft("é", attributes={"region": "eu", "tier": "gold"}, cache_creation_input_tokens=4)
    model = UsageEvent(**{name: getattr(event, name) for name in UsageEvent.model_fields})
    assert encode_event(event) == encode(model)
    assert decode_usage(encode_event(event)) == model


def test_an_event_that_is_not_a_draft_goes_through_the_wire_format_itself() -> None:
    event = draft()
    model = UsageEvent(**{name: getattr(event, name) for name in UsageEvent.model_fields})
    assert encode_event(model) == encode_usage(model) == encode_event(event)
