"""Prices: exact integer costs, the version in force at a call's time, the ``*`` default, and
records off the limits topic that are refused with ``DecodeError`` and nothing else."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from pydantic import ValidationError

from schemas.errors import DecodeError
from schemas.prices import (
    DEFAULT_MODEL,
    Cost,
    ModelPrice,
    PriceTable,
    cost_micros,
    format_instant,
    is_price_key,
    price_key,
    read_price_record,
    refuses,
)
from schemas.rules import MAX_LIMIT_KEY_BYTES
from schemas.wire import encode, limit_key
from tests.helpers import make_event

NOV = datetime(2026, 11, 1, tzinfo=UTC)
DEC = datetime(2026, 12, 1, tzinfo=UTC)


def price(model: str = "gpt-4o", *, at: datetime = NOV, currency: str = "USD", **rates: int | None) -> ModelPrice:
    fields: dict[str, Any] = {"input_per_mtok": 2_500_000, "output_per_mtok": 10_000_000, **rates}
    return ModelPrice(model=model, currency=currency, effective_from=at, updated_at=at, **fields)


# --- cost_micros ---------------------------------------------------------------------------------


def test_cost_is_exact_integer_micros() -> None:
    # 1M in at $2.50 + 1M out at $10 = $12.50
    assert cost_micros(price(), input_tokens=1_000_000, output_tokens=1_000_000, total_tokens=2_000_000) == 12_500_000
    # 3 in * 2.5 + 7 out * 10 = 77.5 micros: one rounding, up
    assert cost_micros(price(), input_tokens=3, output_tokens=7, total_tokens=10) == 78
    assert cost_micros(price(), input_tokens=0, output_tokens=0, total_tokens=0) == 0
    # 1 token at 1 micro per 1M tokens is 1e-6 micros: still charged one micro
    assert cost_micros(price(input_per_mtok=1), input_tokens=1, output_tokens=0, total_tokens=1) == 1


def test_cached_and_reasoning_are_parts_of_input_and_output() -> None:
    rated = price(cached_input_per_mtok=1_250_000, reasoning_per_mtok=20_000_000)
    # (1000-400)*2.5 + 400*1.25 + (500-100)*10 + 100*20 = 1500 + 500 + 4000 + 2000 micros
    counts = {"input_tokens": 1000, "output_tokens": 500, "total_tokens": 1500}
    assert cost_micros(rated, **counts, cached_input_tokens=400, reasoning_tokens=100) == 8000
    # without their own prices they cost what input / output cost
    assert cost_micros(price(), **counts, cached_input_tokens=400, reasoning_tokens=100) == cost_micros(price(), **counts)
    # capped at what they are part of; negative counts count as 0
    assert cost_micros(rated, **counts, cached_input_tokens=5000, reasoning_tokens=9000) == 1000 * 1.25 + 500 * 20
    assert cost_micros(rated, input_tokens=-5, output_tokens=10, total_tokens=10, cached_input_tokens=-1) == 100


def test_a_missing_split_is_derived_from_the_total() -> None:
    p = price()
    assert cost_micros(p, input_tokens=None, output_tokens=None, total_tokens=1000) == 10_000  # all output
    assert cost_micros(p, input_tokens=400, output_tokens=None, total_tokens=1000) == 400 * 2.5 + 600 * 10
    assert cost_micros(p, input_tokens=None, output_tokens=600, total_tokens=1000) == 400 * 2.5 + 600 * 10
    assert cost_micros(p, input_tokens=None, output_tokens=2000, total_tokens=1000) == 20_000  # never below 0


def test_cost_is_a_pure_function_of_its_counts() -> None:
    p = price(input_per_mtok=333_333, output_per_mtok=777_777, cached_input_per_mtok=1)
    results = {cost_micros(p, input_tokens=12_345, output_tokens=6_789, total_tokens=19_134, cached_input_tokens=11)
               for _ in range(100)}
    assert results == {-(-(12_334 * 333_333 + 11 * 1 + 6_789 * 777_777) // 1_000_000)}


# --- the model -----------------------------------------------------------------------------------


@pytest.mark.parametrize("change", [
    {"currency": "usd"}, {"currency": "USDX"}, {"input_per_mtok": -1}, {"output_per_mtok": 10**13},
    {"model": ""}, {"model": "x" * 257}, {"model": "a\x1bb"}, {"input_per_mtok": 2.5},
    {"effective_from": datetime(2026, 11, 1)},
])
def test_invalid_prices_fail_validation(change: dict[str, Any]) -> None:
    fields: dict[str, Any] = {"model": "m", "currency": "USD", "input_per_mtok": 1, "output_per_mtok": 1,
                              "effective_from": NOV, "updated_at": NOV, **change}
    with pytest.raises(ValidationError):
        ModelPrice(**fields)


def test_effective_from_is_kept_in_utc_and_spelled_one_way() -> None:
    p = price(at=datetime(2026, 11, 1, 2, tzinfo=timezone(timedelta(hours=2))))
    assert p.effective_from == NOV and p.effective_from.tzinfo is UTC
    assert price_key("gpt-4o", NOV) == b'["price","gpt-4o","2026-11-01T00:00:00Z"]'
    assert format_instant(NOV + timedelta(microseconds=5)) == "2026-11-01T00:00:00.000005Z"


# --- the table -----------------------------------------------------------------------------------


def test_the_version_in_force_at_a_time_applies_from_its_first_instant() -> None:
    table = PriceTable()
    old, new = price(at=NOV), price(at=DEC, input_per_mtok=2_000_000)
    table.set(new)
    table.set(old)
    assert table.price_at("gpt-4o", NOV - timedelta(microseconds=1)) is None
    assert table.price_at("gpt-4o", NOV) == old
    assert table.price_at("gpt-4o", DEC - timedelta(microseconds=1)) == old
    assert table.price_at("gpt-4o", DEC) == new
    assert table.price_at("gpt-4o", DEC + timedelta(days=400)) == new
    assert table.versions() == [old, new] and len(table) == 2
    table.set(price(at=DEC, input_per_mtok=1))  # same version: replaced
    assert len(table) == 2 and table.price_at("gpt-4o", DEC).input_per_mtok == 1  # type: ignore[union-attr]
    table.delete("gpt-4o", DEC)
    table.delete("gpt-4o", DEC)
    table.delete("nobody", DEC)
    assert table.price_at("gpt-4o", DEC) == old


def test_models_without_a_price_fall_back_to_the_default() -> None:
    table = PriceTable()
    table.set(price())
    counts = {"input_tokens": 1_000_000, "output_tokens": 0, "total_tokens": 1_000_000}
    assert table.cost("gpt-4o", NOV, **counts) == Cost(2_500_000, "USD", "exact")
    assert table.cost("other", NOV, **counts) == Cost(0, None, "unpriced")
    assert table.cost(None, NOV, **counts).priced == "unpriced"
    table.set(price(DEFAULT_MODEL, currency="EUR", input_per_mtok=1_000_000))
    assert table.cost("other", NOV, **counts) == Cost(1_000_000, "EUR", "default")
    assert table.cost(None, NOV, **counts) == Cost(1_000_000, "EUR", "default")
    assert table.cost("*", NOV, **counts).priced == "default"
    # before its own first version, a model is priced at the default in force then
    table.set(price("late", at=DEC))
    assert table.cost("late", NOV, **counts).priced == "default"
    assert table.cost("late", DEC, **counts).priced == "exact"


def test_the_unknown_model_policy() -> None:
    assert refuses(Cost(0, None, "unpriced"), "refuse")
    assert not refuses(Cost(0, None, "unpriced"), "default")
    assert not refuses(Cost(5, "USD", "default"), "refuse")


def test_an_event_is_priced_at_its_own_time_with_its_cached_and_reasoning_counts() -> None:
    table = PriceTable()
    table.set(price(cached_input_per_mtok=0, reasoning_per_mtok=0))
    event = make_event("acme", 3_000).model_copy(update={
        "model": "gpt-4o", "event_time": NOV, "cache_read_input_tokens": 1_000, "reasoning_output_tokens": 2_000,
    })
    assert table.cost_of(event) == Cost(0, "USD", "exact")
    assert table.cost_of(event.model_copy(update={"event_time": NOV - timedelta(seconds=1)})).priced == "unpriced"


# --- records off the limits topic ----------------------------------------------------------------


def test_a_record_round_trips_and_a_tombstone_names_its_version() -> None:
    p = price("mödel \"quoted\"")
    key = price_key(p.model, p.effective_from)
    assert is_price_key(key) and not is_price_key(limit_key("x")) and not is_price_key(None)
    assert read_price_record(key, encode(p)) == (p.model, NOV, p)
    assert read_price_record(key, None) == (p.model, NOV, None)


HOSTILE_KEYS = [
    None, b"", b'["price"', b'["price",' + b"[" * 100_000, b'["price",' + b"[" * 2000 + b"]" * 2000 + b"]",
    b'["price","m","2026-11-01T00:00:00Z"' + b" " * MAX_LIMIT_KEY_BYTES + b"]",
    b'["price","m"]', b'["price",1,"2026-11-01T00:00:00Z"]', b'["price","m",20261101]',
    b'["price","m","2026-11-01"]', b'["price","m","2026-11-01T00:00:00+00:00"]',
    b'["price","m","2026-11-01T00:00:00.000000Z"]', b'["price", "m", "2026-11-01T00:00:00Z"]',
    b'["price","m","9999-99-99T00:00:00Z"]', b'["price","","2026-11-01T00:00:00Z"]',
    b'["price","\\u001b","2026-11-01T00:00:00Z"]', b'["price","\\ud800","2026-11-01T00:00:00Z"]',
    b'["price","m","2026-11-01T00:00:00Z",1]', b'["price","m","2026-11-01T00:00:00Z"]x', b"\xff\xfe",
    b'["price","' + b"x" * 257 + b'","2026-11-01T00:00:00Z"]', b'["price","m","' + b"9" * 5000 + b'Z"]',
    b'["default"]',
]


@pytest.mark.parametrize("key", HOSTILE_KEYS, ids=range(len(HOSTILE_KEYS)))
def test_hostile_keys_are_refused_with_decode_error_only(key: bytes | None) -> None:
    with pytest.raises(DecodeError) as caught:
        read_price_record(key, encode(price("m")))
    assert caught.value.reason == "invalid_key" and len(str(caught.value)) < 200


def _value(**change: Any) -> bytes:
    fields = {"model": "m", "currency": "USD", "input_per_mtok": 1, "output_per_mtok": 1,
              "effective_from": "2026-11-01T00:00:00Z", "updated_at": "2026-11-01T00:00:00Z", **change}
    return json.dumps(fields).encode()


HOSTILE_VALUES = [
    (b"", "empty_value"), (b"{", "invalid_json"), (b"[" * 60_000, "invalid_json"), (b"x" * 100_000, "oversized"),
    (b'"text"', "invalid_schema"), (_value(input_per_mtok="1"), "invalid_schema"),
    (_value(input_per_mtok=1.5), "invalid_schema"), (_value(output_per_mtok=10**40), "invalid_schema"),
    (_value(schema_version=2), "unsupported_version"), (_value(effective_from="0001-01-01T00:00:00+05:00"), "invalid_schema"),
    (_value(effective_from="2026-11-01T00:00:00"), "invalid_schema"), (_value(currency=None), "invalid_schema"),
    (_value(model="other"), "key_value_mismatch"), (_value(effective_from="2026-11-01T00:00:01Z"), "key_value_mismatch"),
    (b"\xff\xfe\x00", "invalid_json"),
]


@pytest.mark.parametrize(("value", "reason"), HOSTILE_VALUES, ids=range(len(HOSTILE_VALUES)))
def test_hostile_values_are_refused_with_decode_error_only(value: bytes, reason: str) -> None:
    with pytest.raises(DecodeError) as caught:
        read_price_record(price_key("m", NOV), value)
    assert caught.value.reason == reason


def test_an_equal_instant_in_another_offset_matches_its_key() -> None:
    assert read_price_record(price_key("m", NOV), _value(effective_from="2026-11-01T01:00:00+01:00"))[2] is not None
