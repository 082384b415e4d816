from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas import DecodeError, QuotaLimit, UsageEvent, export, wire
from schemas.notices import Heartbeat, QuotaNotice

NOW = datetime(2026, 4, 14, 11, 46, 9, tzinfo=UTC)


def event(**overrides: object) -> UsageEvent:
    fields: dict[str, object] = {
        "event_id": "0123456789abcdef",
        "tenant_id": "acme",
        "period_key": "2026-04",
        "model": "gpt-x",
        "input_tokens": 11,
        "output_tokens": 52,
        "total_tokens": 63,
        "quota_tokens": 50,
        "event_time": NOW,
        "instance_id": "host-1",
    }
    fields.update(overrides)
    return UsageEvent(**fields)  # type: ignore[arg-type]


def test_usage_event_round_trips() -> None:
    original = event(attributes={"team": "search"}, reasoning_output_tokens=7, streaming=True)
    assert wire.decode_usage(wire.encode(original)) == original


def test_model_construct_events_encode_like_validated_ones() -> None:
    built = UsageEvent.model_construct(**event().model_dump())
    assert wire.encode(built) == wire.encode(event())


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (None, "empty_value"),
        (b"\x00\xff garbage", "invalid_json"),
        (b"[1, 2]", "invalid_schema"),
        (b"x" * (wire.MAX_RECORD_BYTES + 1), "oversized"),
    ],
)
def test_undecodable_bytes_give_a_reason(raw: bytes | None, reason: str) -> None:
    with pytest.raises(DecodeError) as info:
        wire.decode_usage(raw)
    assert info.value.reason == reason


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"total_tokens": -1}, "total_tokens"),
        ({"total_tokens": 10**12}, "total_tokens"),
        ({"total_tokens": "63"}, "total_tokens"),
        ({"tenant_id": ""}, "tenant_id"),
        ({"tenant_id": "a" * 300}, "tenant_id"),
        ({"tenant_id": "evil\nline"}, "tenant_id"),
        ({"event_time": "2026-04-14T11:46:09"}, "event_time"),
        ({"event_id": "short"}, "event_id"),
        ({"attributes": {f"k{i}": "v" for i in range(40)}}, "attributes"),
    ],
)
def test_invalid_events_are_refused_naming_the_field(change: dict[str, object], field: str) -> None:
    data = json.loads(wire.encode(event()))
    data.update(change)
    with pytest.raises(DecodeError) as info:
        wire.decode_usage(json.dumps(data).encode())
    assert info.value.reason == "invalid_schema"
    assert info.value.detail.startswith(field)


def test_unknown_schema_version_has_its_own_reason() -> None:
    data = json.loads(wire.encode(event()))
    data["schema_version"] = 99
    with pytest.raises(DecodeError) as info:
        wire.decode_usage(json.dumps(data).encode())
    assert info.value.reason == "unsupported_version"


def test_record_key_must_be_the_tenant() -> None:
    value = wire.encode(event())
    assert wire.usage_model(wire.decode_usage_record(b"acme", value)) == event()
    for key in (b"globex", None):
        with pytest.raises(DecodeError) as info:
            wire.decode_usage_record(key, value)
        assert info.value.reason == "key_mismatch"


def test_unknown_fields_from_newer_producers_are_ignored() -> None:
    data = json.loads(wire.encode(event()))
    data["added_in_a_later_version"] = {"x": 1}
    assert wire.decode_usage(json.dumps(data).encode()) == event()


def test_notices_topic_carries_notices_and_heartbeats() -> None:
    notice = QuotaNotice(
        tenant_id="acme", period_key="2026-04", state="exceeded", used_tokens=70, limit_tokens=50,
        usage_partition=2, usage_offset=41, aggregator_id="agg", emitted_at=NOW,
    )
    heartbeat = Heartbeat(usage_partition=2, usage_offset=41, aggregator_id="agg", emitted_at=NOW)
    assert wire.decode_notice(wire.encode(notice)) == notice
    assert wire.decode_notice(wire.encode(heartbeat)) == heartbeat


def test_keys_that_join_fields_cannot_collide() -> None:
    assert wire.tenant_period_key("a,b", "c") != wire.tenant_period_key("a", "b,c")
    assert wire.tenant_period_key('a"', "b") != wire.tenant_period_key("a", '"b')
    assert wire.tenant_period_key("heartbeat", "1") != wire.heartbeat_key(1)
    assert wire.limit_key(None) != wire.limit_key("default")


def test_limit_default_and_tenant_records() -> None:
    default = QuotaLimit(tenant_id=None, limit_tokens=1000, updated_at=NOW)
    assert wire.decode_limit(wire.encode(default)) == default
    with pytest.raises(DecodeError):
        wire.decode_limit(b'{"tenant_id": "x", "limit_tokens": -5, "updated_at": "2026-04-14T00:00:00Z"}')


def test_checked_in_json_schemas_are_current() -> None:
    for file_name, text in export.rendered().items():
        path = export.JSON_DIR / file_name
        assert path.exists(), f"{file_name} missing: run python -m schemas.export"
        assert path.read_text() == text, f"{file_name} is stale: run python -m schemas.export"


def test_the_publisher_fast_encoding_decodes_to_the_same_event() -> None:
    from dataclasses import fields

    from schemas.wire import UsageDraft

    assert {f.name for f in fields(UsageDraft)} == set(UsageEvent.model_fields)
    original = event(attributes={"team": "search"}, cache_read_input_tokens=5, estimated=True)
    draft = UsageDraft(**{name: getattr(original, name) for name in UsageEvent.model_fields})
    assert wire.decode_usage(wire.encode_usage(draft)) == original
    assert wire.decode_usage(wire.encode_usage(original)) == original


@settings(max_examples=200, deadline=None)
@given(
    tenant=st.text(min_size=1, max_size=40).filter(str.isprintable),
    tokens=st.integers(0, 100_000_000),
    model=st.none() | st.text(max_size=50),
    when=st.datetimes(timezones=st.just(UTC)),
    attributes=st.dictionaries(st.text(min_size=1, max_size=10), st.text(max_size=20), max_size=5),
)
def test_fast_encoding_round_trips_any_valid_event(
    tenant: str, tokens: int, model: str | None, when: datetime, attributes: dict[str, str]
) -> None:
    original = event(tenant_id=tenant, total_tokens=tokens, model=model, event_time=when, attributes=attributes)
    assert wire.decode_usage(wire.encode_usage(original)) == original


def test_events_of_every_released_schema_version_still_decode() -> None:
    """One event per released version, as that version wrote it; changes must stay additive."""
    import typing
    from pathlib import Path

    lines = (Path(__file__).parent.parent / "fixtures" / "usage_events_by_version.jsonl").read_bytes().splitlines()
    versions = {wire.decode_usage(line).schema_version for line in lines if line.strip()}
    assert versions == {1, 2}, "add a line for each new schema version"
    assert versions == set(typing.get_args(UsageEvent.model_fields["schema_version"].annotation))


def test_record_keys_are_the_bytes_json_dumps_gives() -> None:
    """Keys written before and after ``_pack`` moved to orjson must be the same bytes: the
    changelog, notices and sealed topics are compacted by key."""
    import random

    rng = random.Random(14)
    alphabet = [chr(c) for c in range(0x20, 0x800)] + ["\u2028", "\u2029", "\ufeff", "\U0001f600", '"', "\\", "/"]
    samples = ["tenant-00001", "2026-11", "rule:tpm~tokens:60s@1764400000", "a\"b", "back\\slash", ""]
    samples += ["".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 40))) for _ in range(2_000)]
    for tenant in samples:
        period = rng.choice(samples)
        expected = json.dumps([tenant, period], separators=(",", ":"), ensure_ascii=False).encode()
        assert wire.tenant_period_key(tenant, period) == expected
    assert wire.heartbeat_key(5) == b'["heartbeat",5]'
    assert wire.limit_key(None) == b'["default"]'
    assert wire.limit_key("acme") == b'["tenant","acme"]'
