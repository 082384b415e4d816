"""Quota rules (``schemas.policy``): validation, what the basis names, counter keys and rule record
keys, and reading a rule off the limits topic (``schemas.rules.read_policy_record``)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from schemas._types import MAX_LIMIT_TOKENS
from schemas.errors import DecodeError
from schemas.policy import (
    COUNTER_PREFIX,
    MAX_RATE_WINDOW_S,
    QuotaRule,
    counter_key,
    effective,
    is_rule_key,
    parse_counter_key,
    parse_rule_key,
    rule_key,
)
from schemas.rules import LimitRecord, RuleRecord, read_policy_record
from schemas.windows import WindowSpec

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def rule(**fields: Any) -> QuotaRule:
    base: dict[str, Any] = {"name": "daily", "limit": 1000, "effective_from": T0, "updated_at": T0}
    return QuotaRule(**{**base, **fields})


def from_json(**fields: Any) -> QuotaRule:
    base: dict[str, Any] = {"name": "daily", "limit": 1000, "effective_from": "2026-01-01T00:00:00Z",
                            "updated_at": "2026-01-01T00:00:00Z"}
    return QuotaRule.model_validate_json(json.dumps({**base, **fields}))


# --- validation --------------------------------------------------------------------------------


def test_defaults() -> None:
    r = rule()
    assert (r.measure, r.window, r.timezone, r.action, r.thresholds, r.tenant_id) == (
        "total_tokens", "month", "UTC", "block", (), None)


def test_rate_needs_window_seconds_and_only_rate_takes_them() -> None:
    with pytest.raises(ValidationError, match="window_seconds"):
        rule(window="rate")
    with pytest.raises(ValidationError, match="window_seconds"):
        rule(window="day", window_seconds=60)
    assert rule(window="rate", window_seconds=60).window_seconds == 60


@pytest.mark.parametrize("seconds", [0, -1, MAX_RATE_WINDOW_S + 1])
def test_rate_window_seconds_bounds(seconds: int) -> None:
    with pytest.raises(ValidationError):
        rule(window="rate", window_seconds=seconds)


def test_cost_needs_currency_and_only_cost_takes_one() -> None:
    with pytest.raises(ValidationError, match="currency"):
        rule(measure="cost")
    with pytest.raises(ValidationError, match="currency"):
        rule(measure="total_tokens", currency="EUR")
    with pytest.raises(ValidationError):
        rule(measure="cost", currency="eur")
    assert rule(measure="cost", currency="EUR").currency == "EUR"


@pytest.mark.parametrize("weight", [0.0, 1, 0.001, 0.3, 1.5, 2.125, 999.999, 1000])
def test_weights_with_at_most_three_decimals(weight: float) -> None:
    assert rule(measure="weighted_tokens", input_weight=weight, output_weight=weight).input_weight == weight


@pytest.mark.parametrize("weight", [0.0001, 0.1235, 1.0005, 2.0000001, 1000.001, -0.5])
def test_weights_with_more_decimals_or_out_of_range_refused(weight: float) -> None:
    with pytest.raises(ValidationError):
        rule(measure="weighted_tokens", input_weight=weight)
    with pytest.raises(ValidationError):
        rule(measure="weighted_tokens", output_weight=weight)


@pytest.mark.parametrize("zone", ["Mars/Olympus", "Europe/", "America", "../etc/passwd", "/etc/localtime", "UTC ",
                                  "Europe/Paris\x00", "x" * 64])
def test_unknown_zone_refused_with_a_validation_error(zone: str) -> None:
    with pytest.raises(ValidationError, match="time zone"):
        rule(timezone=zone)


@pytest.mark.parametrize("zone", ["Europe/Paris", "America/New_York", "Australia/Lord_Howe", "UTC"])
def test_known_zones(zone: str) -> None:
    assert rule(timezone=zone).timezone == zone


def test_thresholds_sorted_and_deduplicated() -> None:
    assert rule(thresholds=(0.9, 0.5, 0.9, 0.75)).thresholds == (0.5, 0.75, 0.9)
    assert from_json(thresholds=[0.8, 0.2, 0.8]).thresholds == (0.2, 0.8)


@pytest.mark.parametrize("thresholds", [(0.0,), (1.0,), (1.5,), (-0.1,), tuple(0.1 * i for i in range(1, 10))])
def test_thresholds_bounds(thresholds: tuple[float, ...]) -> None:
    with pytest.raises(ValidationError):
        rule(thresholds=thresholds)


@pytest.mark.parametrize("limit", [0, 1, MAX_LIMIT_TOKENS])
def test_limit_bounds_accepted(limit: int) -> None:
    assert rule(limit=limit).limit == limit


@pytest.mark.parametrize("limit", [-1, MAX_LIMIT_TOKENS + 1])
def test_limit_bounds_refused(limit: int) -> None:
    with pytest.raises(ValidationError):
        rule(limit=limit)


def test_strict_types() -> None:
    with pytest.raises(ValidationError):
        from_json(limit="1000")
    with pytest.raises(ValidationError):
        from_json(limit=1000.5)
    with pytest.raises(ValidationError):
        from_json(effective_from="2026-01-01T00:00:00")  # naive


@pytest.mark.parametrize("name", ["", "a" * 25, "has space", "with:colon", "with~tilde", "ünï"])
def test_bad_names_refused(name: str) -> None:
    with pytest.raises(ValidationError):
        rule(name=name)


def test_unknown_fields_ignored_and_bad_enums_refused() -> None:
    assert from_json(future_field=1).name == "daily"
    for field, value in [("measure", "bytes"), ("window", "fortnight"), ("action", "shout"), ("unknown_model", "x")]:
        with pytest.raises(ValidationError):
            from_json(**{field: value})


def test_effective() -> None:
    r = rule(effective_from=T0)
    assert effective(r, T0)
    assert not effective(r, T0 - timedelta(microseconds=1))


# --- basis ------------------------------------------------------------------------------------


def test_basis_is_six_hex_digits() -> None:
    basis = rule().basis
    assert len(basis) == 6
    int(basis, 16)


@pytest.mark.parametrize(
    "change",
    [{"limit": 5}, {"thresholds": (0.5, 0.9)}, {"action": "warn"}, {"updated_at": T0 + timedelta(days=3)},
     {"tenant_id": "acme"}, {"input_weight": 1}, {"effective_from": T0.astimezone(timezone(timedelta(hours=5)))}],
)
def test_basis_stable_across_what_does_not_change_counting(change: dict[str, Any]) -> None:
    assert rule(**change).basis == rule().basis


@pytest.mark.parametrize(
    "change",
    [{"window": "day"}, {"window": "rate", "window_seconds": 60}, {"timezone": "Europe/Paris"},
     {"measure": "input_tokens"}, {"measure": "requests"}, {"measure": "weighted_tokens", "input_weight": 2.0},
     {"measure": "cost", "currency": "EUR"}, {"model": "gpt-4o"}, {"attributes": {"team": "a"}},
     {"effective_from": T0 + timedelta(seconds=1)}, {"unknown_model": "refuse"}],
)
def test_basis_changes_with_what_is_counted(change: dict[str, Any]) -> None:
    assert rule(**change).basis != rule().basis


def test_basis_distinguishes_rate_lengths_selectors_and_currencies() -> None:
    assert rule(window="rate", window_seconds=60).basis != rule(window="rate", window_seconds=61).basis
    assert rule(attributes={"team": "a"}).basis != rule(attributes={"team": "b"}).basis
    assert rule(attributes={"a": "1", "b": "2"}).basis == rule(attributes={"b": "2", "a": "1"}).basis
    assert rule(measure="cost", currency="EUR").basis != rule(measure="cost", currency="USD").basis


def test_basis_same_from_json_and_python() -> None:
    assert from_json(input_weight=1, measure="weighted_tokens").basis == rule(measure="weighted_tokens").basis


# --- counter keys -----------------------------------------------------------------------------


def longest_window_values() -> list[str]:
    far = datetime(9998, 6, 1, tzinfo=UTC).timestamp()
    return [WindowSpec(kind, seconds, "Australia/Lord_Howe")._compute(ts)[0]
            for kind, seconds in [("hour", None), ("day", None), ("week", None), ("month", None), ("year", None),
                                  ("rate", 1), ("rate", MAX_RATE_WINDOW_S)]
            for ts in (0.0, 1_800_000_000.0, far)]


@pytest.mark.parametrize("value", longest_window_values())
def test_counter_key_fits_a_period_key_for_the_longest_name(value: str) -> None:
    basis = rule(name="n" * 24).basis
    key = counter_key("n" * 24, basis, value)
    assert key.startswith(COUNTER_PREFIX)
    assert len(key) <= 64
    assert parse_counter_key(key) == ("n" * 24, basis, value)


@settings(max_examples=200)
@given(name=st.from_regex(r"^[A-Za-z0-9_.-]{1,24}$", fullmatch=True),
       basis=st.from_regex(r"^[0-9a-f]{6}$", fullmatch=True),
       value=st.sampled_from(longest_window_values()))
def test_counter_key_round_trip(name: str, basis: str, value: str) -> None:
    assert parse_counter_key(counter_key(name, basis, value)) == (name, basis, value)


@pytest.mark.parametrize(
    "period_key",
    ["2026-01", "", "rule:", "rule:daily", "rule:daily~abcdef", "rule:~abcdef:2026-01", "rule:daily~abc:2026-01",
     "rule:daily~abcdefg:2026-01", "rule:daily:2026-01", "RULE:daily~abcdef:2026-01", "xrule:daily~abcdef:2026"],
)
def test_parse_counter_key_of_other_keys(period_key: str) -> None:
    assert parse_counter_key(period_key) is None


# --- rule record keys -------------------------------------------------------------------------


@pytest.mark.parametrize(("tenant", "name"), [(None, "daily"), ("acme", "daily"), ('we"ird\\,[]', "x.y-z"),
                                              ("ünïcode", "n" * 24), ("rule", "rule-default")])
def test_rule_key_round_trip(tenant: str | None, name: str) -> None:
    key = rule_key(tenant, name)
    assert is_rule_key(key)
    assert parse_rule_key(key) == (tenant, name)


@pytest.mark.parametrize(
    "key",
    [None, b"", b"[", b'["rule"', b'["rule"]', b'["rule-default"]', b'["rule","acme"]', b'["rule-default","a","b"]',
     b'["rule","a","b","c"]', b'["rule",1,"x"]', b'["rule","a",null]', b'["rule-default",["x"]]',
     b'["rule",{"a":1},"x"]', b'["rules","a","b"]', b'["tenant","acme"]', b'["default"]',
     b'["rule' + b"[" * 4000, b'["rule",' + b"[" * 3000 + b"]" * 3000 + b"]",
     b'["rule","' + b"a" * 10_000 + b'","x"]', b'["rule","\xff\xfe","x"]', b'["rule","a","b"] trailing',
     b'["rule","a","\\ud800"]'],
)
def test_hostile_rule_keys_never_raise(key: bytes | None) -> None:
    assert parse_rule_key(key) is None or isinstance(parse_rule_key(key), tuple)
    parsed = parse_rule_key(key)
    if parsed is not None:
        tenant, name = parsed
        assert (tenant is None or isinstance(tenant, str)) and isinstance(name, str)


def test_hostile_rule_keys_parse_to_none() -> None:
    for key in [b'["rule",1,"x"]', b'["rule","acme"]', b'["rule-default"]', b'["rule","a","b","c"]',
                b'["rule' + b"[" * 4000, b'["rule","' + b"a" * 10_000 + b'","x"]']:
        assert parse_rule_key(key) is None


# --- reading the limits topic -----------------------------------------------------------------


def test_read_policy_record_rule_and_tombstone() -> None:
    r = rule(tenant_id="acme", thresholds=(0.5,))
    record = read_policy_record(rule_key("acme", "daily"), r.model_dump_json().encode())
    assert record == RuleRecord("acme", "daily", r)
    assert read_policy_record(rule_key("acme", "daily"), None) == RuleRecord("acme", "daily", None)
    default = rule()
    assert read_policy_record(rule_key(None, "daily"), default.model_dump_json().encode()) == RuleRecord(None, "daily", default)


def test_read_policy_record_refuses_a_rule_naming_another_key() -> None:
    value = rule(tenant_id="acme").model_dump_json().encode()
    for key in [rule_key("globex", "daily"), rule_key("acme", "monthly"), rule_key(None, "daily")]:
        with pytest.raises(DecodeError) as caught:
            read_policy_record(key, value)
        assert caught.value.reason == "key_value_mismatch"


@pytest.mark.parametrize("value", [b"", b"{", b"[]", b"null", b'{"name":"daily"}', b"\xff" * 10,
                                   json.dumps({"name": "daily", "limit": 1, "window": "rate",
                                               "effective_from": "2026-01-01T00:00:00Z",
                                               "updated_at": "2026-01-01T00:00:00Z"}).encode(),
                                   json.dumps({"name": "daily", "limit": 1, "timezone": "America",
                                               "effective_from": "2026-01-01T00:00:00Z",
                                               "updated_at": "2026-01-01T00:00:00Z"}).encode()])
def test_read_policy_record_bad_values_are_decode_errors(value: bytes) -> None:
    with pytest.raises(DecodeError):
        read_policy_record(rule_key(None, "daily"), value)


@pytest.mark.parametrize("key", [b'["rule",1,"x"]', b'["rulebook"]', b'["rule' + b"[" * 5000, b'["rule","a"]'])
def test_read_policy_record_hostile_rule_keys_are_invalid_key(key: bytes) -> None:
    with pytest.raises(DecodeError) as caught:
        read_policy_record(key, b"{}")
    assert caught.value.reason == "invalid_key"


def test_read_policy_record_limit_keys_still_limits() -> None:
    assert isinstance(read_policy_record(b'["default"]', None), LimitRecord)
