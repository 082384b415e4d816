"""The compiled decoders (``schemas.compiled``) against pydantic's, the rules of record.

What must hold: whatever the compiled decoder accepts, the model accepts with equal values; and
``decode_usage_record`` / ``decode_totals`` give every input the outcome the pydantic path gave
(the same values, or a ``DecodeError`` with the same reason). Hostile inputs one by one, then
random ones. The mirrors must follow the models field for field: the last tests fail when a model
gains, loses or re-constrains a field the mirror does not.
"""

from __future__ import annotations

import json
import os
import random
import typing
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import AfterValidator, BaseModel

from schemas import compiled, wire
from schemas._types import _printable
from schemas.errors import DecodeError
from schemas.totals import TotalsRecord
from schemas.usage import UsageEvent

EXAMPLES = int(os.environ.get("TG_FUZZ_EXAMPLES", "400"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))

NOW = datetime(2026, 4, 14, 11, 46, 9, 123456, tzinfo=UTC)

USAGE: dict[str, Any] = {
    "event_id": "evt-0123456789_ab", "schema_version": 2, "tenant_id": "acme", "period_key": "2026-04",
    "model": "gpt-x", "input_tokens": 11, "output_tokens": 52, "total_tokens": 63,
    "cache_creation_input_tokens": 3, "cache_read_input_tokens": 4, "reasoning_output_tokens": 5,
    "quota_tokens": 1_000, "event_time": "2026-04-14T11:46:09.123456Z", "streaming": True, "estimated": False,
    "instance_id": "host-1", "attributes": {"team": "search", "région": "eu"},
    "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736", "span_id": "00f067aa0ba902b7",
}
TOTALS: dict[str, Any] = {
    "tenant_id": "acme", "period_key": "2026-04", "used_tokens": 63, "event_count": 1, "limit_tokens": 1_000,
    "state": "ok", "usage_partition": 2, "applied_offset": 41, "updated_at": "2026-04-14T11:46:09.5+05:30",
    "event_quota_tokens": 1_000, "first_offset": 7,
}


def dumps(fields: dict[str, Any], **options: Any) -> bytes:
    return json.dumps(fields, separators=(",", ":"), **options).encode()


# --- the two paths --------------------------------------------------------------------------------


def fields_of(value: Any) -> dict[str, Any]:
    return msgspec.structs.asdict(value) if isinstance(value, msgspec.Struct) else dict(value)


def same_values(fast: dict[str, Any], model: dict[str, Any]) -> None:
    """Equal field by field, down to the types and each timestamp's offset."""
    assert list(fast) == list(model)
    for name, value in model.items():
        assert type(fast[name]) is type(value), name
        assert fast[name] == value, name
        if isinstance(value, datetime):
            assert fast[name].utcoffset() == value.utcoffset(), name
            assert fast[name].isoformat() == value.isoformat(), name


def pydantic_usage(key: bytes | None, value: bytes | None) -> tuple[str, Any]:
    """Today's outcome: ("ok", fields) or ("error", reason)."""
    try:
        event = wire.decode_usage(value)
    except DecodeError as exc:
        return "error", exc.reason
    if key != event.tenant_id.encode():
        return "error", "key_mismatch"
    return "ok", dict(event)


def fast_usage(key: bytes | None, value: bytes | None) -> tuple[str, Any]:
    try:
        return "ok", fields_of(wire.decode_usage_record(key, value))
    except DecodeError as exc:
        return "error", exc.reason


def pydantic_totals(value: bytes | None) -> tuple[str, Any]:
    try:
        return "ok", dict(wire.decode_totals_model(value))
    except DecodeError as exc:
        return "error", exc.reason


def fast_totals(value: bytes | None) -> tuple[str, Any]:
    try:
        return "ok", fields_of(wire.decode_totals(value))
    except DecodeError as exc:
        return "error", exc.reason


def check_usage(value: bytes | None, key: bytes | None = b"acme") -> str:
    """Both properties for one input; returns which way it went, for the tests that need it."""
    if value:
        accepted = compiled.decode_usage(value)
        if accepted is not None:
            outcome = pydantic_usage(accepted.tenant_id.encode(), value)
            assert outcome[0] == "ok", f"compiled accepted what pydantic refuses ({outcome[1]}): {value!r:.300}"
            same_values(fields_of(accepted), outcome[1])
    before, after = pydantic_usage(key, value), fast_usage(key, value)
    assert after[0] == before[0], value
    if before[0] == "ok":
        same_values(after[1], before[1])
    else:
        assert after[1] == before[1], value
    return "compiled" if value and compiled.decode_usage(value) is not None else before[0] if before[0] == "ok" else before[1]


def check_totals(value: bytes | None) -> str:
    if value:
        accepted = compiled.decode_totals(value)
        if accepted is not None:
            outcome = pydantic_totals(value)
            assert outcome[0] == "ok", f"compiled accepted what pydantic refuses ({outcome[1]}): {value!r:.300}"
            same_values(fields_of(accepted), outcome[1])
    before, after = pydantic_totals(value), fast_totals(value)
    assert after[0] == before[0], value
    if before[0] == "ok":
        same_values(after[1], before[1])
    else:
        assert after[1] == before[1], value
    return "compiled" if value and compiled.decode_totals(value) is not None else before[0] if before[0] == "ok" else before[1]


# --- what our writers produce takes the compiled path ---------------------------------------------


def test_events_our_writers_produce_take_the_compiled_path() -> None:
    event = UsageEvent(**{**USAGE, "event_time": NOW})
    for value in (wire.encode(event), wire.encode_usage(event), dumps(USAGE), dumps(USAGE, ensure_ascii=False)):
        assert check_usage(value) == "compiled"
    minimal = {k: USAGE[k] for k in ("event_id", "tenant_id", "period_key", "total_tokens", "quota_tokens", "event_time", "instance_id")}
    assert check_usage(dumps(minimal)) == "compiled"
    assert check_usage(dumps({**USAGE, "schema_version": 1, "trace_id": None, "span_id": None})) == "compiled"


def test_totals_our_writers_produce_take_the_compiled_path() -> None:
    record = TotalsRecord(**{**TOTALS, "updated_at": NOW})
    for value in (wire.encode(record), wire.encode_fields(dict(record)), dumps(TOTALS)):
        assert check_totals(value) == "compiled"
    old = {k: v for k, v in TOTALS.items() if k not in ("event_quota_tokens", "first_offset")}
    assert check_totals(dumps(old)) == "compiled"


def test_the_fast_results_read_like_the_models() -> None:
    event = wire.decode_usage_record(b"acme", dumps(USAGE))
    assert type(event) is compiled.UsageEventStruct
    assert event.event_time == datetime(2026, 4, 14, 11, 46, 9, 123456, tzinfo=UTC)
    assert event.attributes == {"team": "search", "région": "eu"}
    record = wire.decode_totals(dumps(TOTALS))
    assert type(record) is compiled.TotalsRecordStruct
    assert record.updated_at.utcoffset() == timedelta(hours=5, minutes=30)
    # What pydantic alone accepts still comes back as the Struct, with pydantic's values.
    assert type(wire.decode_totals(dumps({**TOTALS, "used_tokens": 10**30}))) is compiled.TotalsRecordStruct
    with pytest.raises(AttributeError):
        event.tenant_id = "globex"


# --- hostile inputs, one by one -------------------------------------------------------------------

BAD_STRINGS = [
    "", " ", "a", "a" * 7, "a" * 8, "a" * 64, "a" * 65, "a" * 128, "a" * 129, "a" * 256, "a" * 257,
    "evil\nline", "trailing-newline-ok\n", "tab\there", "nul\x00", "del\x7f", "c1\x85", "nbsp\xa0", "zwsp\u200b",
    "line\u2028sep", "bidi\u202e", "bom\ufeff", "private\ue000", "astral-😀", "é" * 64, "é" * 65, "😀" * 64,
    "😀" * 65, "ǅ", "١٢٣٤٥٦٧٨", "ＡＢＣＤＥＦＧＨ", "abcdefgh\n", "\nabcdefgh", "abc defgh", "abcdefgh-_",
    "ABCDEF0123456789abcdef0123456789", "4bf92f3577b34da6a3ce929d0e0e4736\n", "4BF92F3577B34DA6A3CE929D0E0E4736",
    "4bf92f3577b34da6a3ce929d0e0e473g", "00f067aa0ba902b7", "00f067aa0ba902b", "00f067aa0ba902b7a",
    "rule:daily:2026-04-14", "2026-04", "ok", "warning", "exceeded", "OK", "1",
]
BAD_INTS = [0, -1, 1, 63, 10**8, 10**8 + 1, 10**15, 10**15 + 1, 2**63 - 1, 2**63, 2**64, -(2**63), -(2**63) - 1, 10**30, -(10**30)]
BAD_VALUES: list[Any] = [
    None, True, False, 1.0, 0.0, -0.0, 1.5, 1e3, float("inf"), "63", "", [], {}, [1], {"a": "b"}, *BAD_INTS, *BAD_STRINGS,
]
TIMES = [
    "2026-04-14T11:46:09Z", "2026-04-14T11:46:09.123456Z", "2026-04-14T11:46:09.1234567Z", "2026-04-14T11:46:09.9999999Z",
    "2026-04-14T11:46:09.999999999+05:30", "2026-04-14T11:46:09.5Z", "2026-04-14T11:46:09.Z", "2026-04-14T11:46:09",
    "2026-04-14T11:46:09.123456", "2026-04-14t11:46:09z", "2026-04-14 11:46:09Z", "2026-04-14T11:46:09+00:00",
    "2026-04-14T11:46:09-00:00", "2026-04-14T11:46:09+0530", "2026-04-14T11:46:09+05", "2026-04-14T11:46:09+23:59",
    "2026-04-14T11:46:09-23:59", "2026-04-14T11:46:09+24:00", "2026-04-14T11:46:09+05:60", "2026-04-14T11:46:09+99:99",
    "2026-04-14T11:46:60Z", "2026-04-14T24:00:00Z", "2026-04-14T23:59:59Z", "2026-02-29T00:00:00Z", "2024-02-29T00:00:00Z",
    "2026-13-01T00:00:00Z", "2026-00-01T00:00:00Z", "2026-04-31T00:00:00Z", "0000-01-01T00:00:00Z", "0001-01-01T00:00:00Z",
    "0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59.999999Z", "9999-12-31T23:59:59-01:00", "2026-04-14T11:46Z",
    "2026-04-14T11:46:09,5Z", "20260414T114609Z", "2026-W16-2T11:46:09Z", "2026-04-14T11:46:09 Z", "2026-04-14T11:46:09UTC",
    "2026-04-14T11:46:09+00:00:00", "2026-04-14", "+2026-04-14T11:46:09Z", "２０２６-04-14T11:46:09Z", "2026-04-14T11:46:09.١Z",
    "1", "", "2026-04-14T11:46:09Z\n", " 2026-04-14T11:46:09Z", "2026-04-14T24:00:00+01:00", "2026-04-14T24:00:00.000000Z",
    "2026-04-14T11:46:09.123+05:60", "2026-04-14T11:46:09-00:60", "2026-04-14T11:46:09-00:59", "2026-04-14T11:46:09+19:99",
    "2026-04-14T11:46:09.0000000Z", "2026-04-14T11:46:09.000001Z", "2026-04-14T11:46:09.1+00:00", "2026-04-14T11:46:09Z ",
]


@pytest.mark.parametrize("field", list(USAGE))
def test_every_usage_field_with_every_hostile_value(field: str) -> None:
    for value in BAD_VALUES + TIMES:
        check_usage(dumps({**USAGE, field: value}))
    removed = {k: v for k, v in USAGE.items() if k != field}
    check_usage(dumps(removed))


@pytest.mark.parametrize("field", list(TOTALS))
def test_every_totals_field_with_every_hostile_value(field: str) -> None:
    for value in BAD_VALUES + TIMES:
        check_totals(dumps({**TOTALS, field: value}))
    check_totals(dumps({k: v for k, v in TOTALS.items() if k != field}))


def test_timestamps_keep_pydantic_value_offset_and_precision() -> None:
    compiled_path = 0
    for text in TIMES:
        compiled_path += check_usage(dumps({**USAGE, "event_time": text})) == "compiled"
        check_totals(dumps({**TOTALS, "updated_at": text}))
    assert compiled_path >= 10  # the spellings our writers use are not all sent to pydantic


def test_attributes_bounds() -> None:
    cases: list[Any] = [
        {}, {f"k{i}": "v" for i in range(32)}, {f"k{i}": "v" for i in range(33)}, {"": "v"}, {"k" * 64: "v"},
        {"k" * 65: "v"}, {"k": "v" * 256}, {"k": "v" * 257}, {"k": ""}, {"k": None}, {"k": 1}, {"k": ["v"]},
        {"é" * 64: "é" * 256}, {"é" * 65: "v"}, {"k": "é" * 257}, {"k": "\x00\n"}, {"k\n": "v"}, [["k", "v"]], "k=v", None,
    ]
    for attributes in cases:
        check_usage(dumps({**USAGE, "attributes": attributes}))
    good = dumps({**USAGE, "attributes": {"a": "b"}})
    for pairs in (33, 64):  # repeated keys: what counts is the distinct keys, on both paths
        check_usage(good.replace(b'"attributes":{"a":"b"}', b'"attributes":{' + b",".join([b'"k":"v"'] * pairs) + b"}"))
        many = b",".join(b'"k%d":"v"' % (i % 32) for i in range(pairs))
        check_usage(good.replace(b'"attributes":{"a":"b"}', b'"attributes":{' + many + b"}"))
    check_usage(good.replace(b'"attributes":{"a":"b"}', b'"attributes":{"a":1,"a":"b"}'))
    check_usage(good.replace(b'"attributes":{"a":"b"}', b'"attributes":{"a":"b","a":1}'))
    check_usage(good.replace(b'"attributes":{"a":"b"}', b'"attributes":{"a":"' + b"v" * 300 + b'","a":"b"}'))


def test_record_framing_and_keys() -> None:
    good = dumps(USAGE)
    for value in (None, b"", b" ", b"{}", b"[]", b"null", b"0", b'""', good + b" ", b" \n\t\r" + good, good + b"x",
                  good + good, good[:-1], good + b"\x00", b"\xef\xbb\xbf" + good, good.replace(b"{", b"{ ", 1)):
        check_usage(value)
    padded = dumps({**USAGE, "model": None, "pad": "x" * (wire.MAX_RECORD_BYTES - len(good) - 8)})
    for size in (wire.MAX_RECORD_BYTES - 1, wire.MAX_RECORD_BYTES, wire.MAX_RECORD_BYTES + 1):
        value = dumps({**USAGE, "model": "m" * 10}).replace(b'"model":"mmmmmmmmmm"', b'"model":null')
        value = value[:-1] + b"," + b'"pad":"' + b"x" * max(0, size - len(value) - 9) + b'"}'
        check_usage(value)
    assert check_usage(padded + b" " * (wire.MAX_RECORD_BYTES + 1 - len(padded))) == "oversized"
    for key in (b"acme", b"ACME", b"acme ", b"", None, "acme".encode("utf-16")):
        check_usage(good, key)
    check_usage(dumps({**USAGE, "tenant_id": "région"}), "région".encode())


def test_json_spellings() -> None:
    good = dumps(USAGE)
    variants = [
        good.replace(b'"tenant_id":"acme"', b'"tenant_id":"acme","tenant_id":"globex"'),  # duplicate key: last wins
        good.replace(b'"tenant_id":"acme"', b'"tenant_id":"globex","tenant_id":"acme"'),
        good.replace(b'"total_tokens":63', b'"total_tokens":63,"total\\u005ftokens":64'),  # an escaped duplicate
        good.replace(b'"streaming":true', b'"streaming":true,"str\\u0065aming":false'),
        good.replace(b'"estimated":false', b'"estim\\u0061ted":true'),  # an escaped name of a defaulted field
        good.replace(b'"attributes":{', b'"attributes":{"team":"a",'),  # duplicate attribute key
        good.replace(b'"acme"', b'"\\u0061cme"'), good.replace(b'"acme"', b'"\\ud800"'), good.replace(b'"acme"', b'"\\udc00x"'),
        good.replace(b'"gpt-x"', b'"\\ud800"'), good.replace(b'"gpt-x"', b'"\\ud83d\\ude00"'), good.replace(b'"gpt-x"', b'"\xed\xa0\x80"'),
        good.replace(b'"gpt-x"', b'"\xff"'), good.replace(b'"gpt-x"', b'"\xc0\xaf"'), good.replace(b'"gpt-x"', b'"a\x01b"'),
        good.replace(b'"gpt-x"', b'"\\u0000"'), good.replace(b'"gpt-x"', b'"\\x41"'), good.replace(b'"gpt-x"', b"'gpt-x'"),
        good.replace(b'"gpt-x"', b'"\xf4\x90\x80\x80"'), good.replace(b'"gpt-x"', b'"\xef\xbf\xbf"'),
        good.replace(b'"total_tokens":63', b'"total_tokens":063'), good.replace(b'"total_tokens":63', b'"total_tokens":+63'),
        good.replace(b'"total_tokens":63', b'"total_tokens":63.0'), good.replace(b'"total_tokens":63', b'"total_tokens":6.3e1'),
        good.replace(b'"total_tokens":63', b'"total_tokens":-0'), good.replace(b'"total_tokens":63', b'"total_tokens":0x3f'),
        good.replace(b'"total_tokens":63', b'"total_tokens":NaN'), good.replace(b'"total_tokens":63', b'"total_tokens":Infinity'),
        good.replace(b'"total_tokens":63', b'"total_tokens":true'), good.replace(b'"streaming":true', b'"streaming":1'),
        good.replace(b'"streaming":true', b'"streaming":"true"'), good.replace(b'"schema_version":2', b'"schema_version":true'),
        good.replace(b'"schema_version":2', b'"schema_version":2.0'), good.replace(b'"schema_version":2', b'"schema_version":"2"'),
        good.replace(b'"schema_version":2', b'"schema_version":3'), good.replace(b'"schema_version":2', b'"schema_version":null'),
        good.replace(b',"span_id"', b',"extra":' + b"[" * 250 + b"]" * 250 + b',"span_id"'),  # deeper than pydantic parses
        good.replace(b',"span_id"', b',"extra":' + b"[" * 150 + b"]" * 150 + b',"span_id"'),
        good.replace(b',"span_id"', b',"extra":{"x":NaN},"span_id"'), good.replace(b',"span_id"', b',"extra":"\xff","span_id"'),
        good.replace(b',"span_id"', b',"extra":"\\ud800","span_id"'), good.replace(b',"span_id"', b',"extra":1e999,"span_id"'),
        good.replace(b',"span_id"', b',"\xff":1,"span_id"'), good.replace(b",", b" , "), good.replace(b",", b"\x0c,"),
        good.replace(b",", b",,", 1), good.replace(b"}}", b"},}", 1), good.replace(b":", b" : "), good.replace(b":", b"\t:\n"),
        good.replace(b'"trace_id":"4bf', b'"trace_id":"4BF'), good.replace(b'"span_id":"00f067aa0ba902b7"', b'"span_id":"00f067aa0ba902b7\\n"'),
        good.replace(b'"event_id":"evt-0123456789_ab"', b'"event_id":"evt-0123456789_ab\\n"'),
        good.replace(b'"event_id":"evt-0123456789_ab"', b'"event_id":"evt-0123456789_a\\u0062"'),
        good.replace(b'"acme"', b'"\\u0041CME"'), good.replace(b'"acme"', b'"\\u00E9"'), good.replace(b'"acme"', b'"\\U00e9"'),
        good.replace(b'"total_tokens":63', b'"total_tokens":-01'), good.replace(b'"total_tokens":63', b'"total_tokens":6E1'),
        good.replace(b'"total_tokens":63', b'"total_tokens":63 '), good.replace(b'"total_tokens":63', b'"total_tokens":"63"'),
        good.replace(b'"total_tokens":63', b'"total_tokens":"x","total_tokens":63'),
        good.replace(b'"total_tokens":63', b'"total_tokens":63,"total_tokens":"x"'),
        good.replace(b'"total_tokens":63', b'"total_tokens":1000000000,"total_tokens":63'),
        good.replace(b'"total_tokens":63', b'"total_tokens":63,"total_tokens":1000000000'),
        good.replace(b'"event_time":"', b'"event_time":"x","event_time":"'),
        good.replace(b'"event_time":"2026-04-14T11:46:09.123456Z"', b'"event_time":"2026-04-14T11:46:09.123456\\u005a"'),
        good.replace(b'"event_time":"2026-04-14T11:46:09.123456Z"', b'"event_time":"2026-04-14T11:46:09.12345\\u0036Z"'),
        good.replace(b'"event_time":"2026-04-14T11:46:09.123456Z"', b'"event_time":"2026-04-14T11:46:09.123456\\u0037Z"'),
        good.replace(b'"trace_id":', b'"trace_id":null,"trace_id":'), good.replace(b'"model":"gpt-x"', b'"model":null'),
        good.replace(b'"attributes":{', b'"attributes":null,"attributes":{'),
    ]
    for value in variants:
        check_usage(value)


def test_version_one_events_and_unknown_versions() -> None:
    assert check_usage(dumps({**USAGE, "schema_version": 1})) == "compiled"
    assert check_usage(dumps({**USAGE, "schema_version": 99})) == "unsupported_version"
    assert check_usage(dumps({k: v for k, v in USAGE.items() if k != "schema_version"})) == "compiled"
    assert check_usage(dumps({**USAGE, "added_later": {"x": [1, 2]}})) == "ok"  # pydantic's path: still accepted


# --- random inputs --------------------------------------------------------------------------------

_text = st.one_of(st.sampled_from(BAD_STRINGS), st.text(max_size=80), st.text(alphabet="abcdef0123456789", min_size=14, max_size=34))
_json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False), _text),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_text, inner, max_size=3),
    max_leaves=6,
)
_times = st.one_of(
    st.sampled_from(TIMES),
    st.datetimes(timezones=st.sampled_from([UTC, timezone(timedelta(hours=5, minutes=30)), timezone(-timedelta(hours=23, minutes=59))]))
    .map(lambda d: d.isoformat()),
    st.from_regex(r"\A[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{0,9})?([Zz]|[+-][0-9]{2}:?[0-9]{2})?\Z"),
)


def _mutated(base: dict[str, Any], rng: random.Random, values: list[Any]) -> dict[str, Any]:
    fields = dict(base)
    for _ in range(rng.randint(1, 3)):
        name = rng.choice([*base, "unknown_field"])
        action = rng.random()
        if action < 0.2:
            fields.pop(name, None)
        else:
            fields[name] = rng.choice(values)
    return fields


@FUZZ
@given(st.data())
def test_random_usage_fields(data: st.DataObject) -> None:
    fields = dict(USAGE)
    for name in data.draw(st.lists(st.sampled_from([*USAGE, "unknown"]), max_size=4)):
        fields[name] = data.draw(st.one_of(_json_values, _times, st.sampled_from(BAD_VALUES)))
    for name in data.draw(st.lists(st.sampled_from(list(USAGE)), max_size=2)):
        fields.pop(name, None)
    check_usage(dumps(fields, ensure_ascii=data.draw(st.booleans())), data.draw(st.sampled_from([b"acme", fields.get("tenant_id", "x").encode() if isinstance(fields.get("tenant_id"), str) else b"x"])))


@FUZZ
@given(st.data())
def test_random_totals_fields(data: st.DataObject) -> None:
    fields = dict(TOTALS)
    for name in data.draw(st.lists(st.sampled_from([*TOTALS, "unknown"]), max_size=4)):
        fields[name] = data.draw(st.one_of(_json_values, _times, st.sampled_from(BAD_VALUES)))
    for name in data.draw(st.lists(st.sampled_from(list(TOTALS)), max_size=2)):
        fields.pop(name, None)
    check_totals(dumps(fields, ensure_ascii=data.draw(st.booleans())))


@FUZZ
@given(st.binary(max_size=8), st.integers(min_value=0), st.integers(min_value=0, max_value=8), st.booleans())
def test_random_byte_splices(insert: bytes, at: int, cut: int, totals: bool) -> None:
    good = dumps(TOTALS if totals else USAGE)
    at %= len(good)
    value = good[:at] + insert + good[at + cut :]
    if totals:
        check_totals(value)
    else:
        check_usage(value)


_fractions = st.builds(
    lambda moment, digits, offset: moment.strftime("%Y-%m-%dT%H:%M:%S") + (f".{digits}" if digits else "") + offset,
    st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30)),
    st.text(alphabet="0123456789", max_size=9),
    st.one_of(st.just("Z"), st.from_regex(r"\A[+-][0-9]{2}:[0-9]{2}\Z")),
)


@FUZZ
@given(st.one_of(_times, _fractions))
def test_random_timestamps(text: str) -> None:
    check_usage(dumps({**USAGE, "event_time": text}))
    check_totals(dumps({**TOTALS, "updated_at": text}))


def _respelled(value: Any, rng: random.Random) -> str:
    """JSON of ``value`` with some characters of its strings (names included) written as escapes."""
    if isinstance(value, str):
        out = []
        for char in value:
            if rng.random() < 0.3 or char in '"\\' or ord(char) < 0x20:
                code = ord(char)
                if code > 0xFFFF:
                    code -= 0x10000
                    out.append(f"\\u{0xD800 + (code >> 10):04{rng.choice('xX')}}\\u{0xDC00 + (code & 0x3FF):04{rng.choice('xX')}}")
                else:
                    out.append(f"\\u{code:04{rng.choice('xX')}}")
            else:
                out.append(char)
        return '"' + "".join(out) + '"'
    if isinstance(value, dict):
        space = rng.choice(["", " ", "\n", "\t", "\r\n  "])
        items = [f"{_respelled(k, rng)}{space}:{space}{_respelled(v, rng)}" for k, v in value.items()]
        return "{" + space + f",{space}".join(items) + space + "}"
    return json.dumps(value)


def test_escaped_spellings_decode_to_the_same_values() -> None:
    rng = random.Random(7)
    rich = {**USAGE, "tenant_id": "acmé-😀", "model": "gpt\u00ff😀\x00", "attributes": {"ключ": "значение😀", "k": "\x7f"}}
    compiled_path = 0
    for _ in range(500):
        value = _respelled(rich, rng).encode()
        compiled_path += check_usage(value, "acmé-😀".encode()) == "compiled"
        check_totals(_respelled({**TOTALS, "tenant_id": "acmé-😀"}, rng).encode())
    assert compiled_path == 500


def test_seeded_mutations_of_valid_records() -> None:
    rng = random.Random(14)
    values = [*BAD_VALUES, *TIMES, *[USAGE[k] for k in USAGE], *[TOTALS[k] for k in TOTALS]]
    outcomes: set[str] = set()
    for _ in range(3_000):
        outcomes.add(check_usage(dumps(_mutated(USAGE, rng, values), ensure_ascii=rng.random() < 0.5)))
        check_totals(dumps(_mutated(TOTALS, rng, values)))
    assert {"compiled", "invalid_schema", "unsupported_version"} <= outcomes


# --- the mirrors follow the models ----------------------------------------------------------------


def _resolve(schema: dict[str, Any], root: dict[str, Any]) -> dict[str, Any]:
    if "$ref" in schema:
        return _resolve(root["$defs"][schema["$ref"].rsplit("/", 1)[1]], root)
    return schema


def _normal(schema: Any) -> Any:
    """A field's JSON schema without what only says how it is named or shown."""
    if isinstance(schema, list):
        return sorted((_normal(s) for s in schema), key=lambda s: json.dumps(s, sort_keys=True))
    if not isinstance(schema, dict):
        return schema
    out = {k: _normal(v) for k, v in schema.items() if k not in ("title", "description", "default")}
    if "enum" in out:
        out.pop("type", None)
    return out


def _mirror_schema(struct: type[msgspec.Struct], patterns: dict[str, str], times: tuple[str, ...]) -> dict[str, Any]:
    """The Struct's JSON schema plus what ``schemas.compiled`` checks in Python."""
    root = msgspec.json.schema(struct)
    properties = _normal(_resolve(root, root)["properties"])
    for name, pattern in patterns.items():
        target = properties[name]
        for branch in target.get("anyOf", [target]):
            if branch.get("type") == "string":
                branch["pattern"] = f"^{pattern}$"
    for name in times:
        properties[name] = {"type": "string", "format": "date-time"}
    return _normal(properties)


def _printable_fields(model: type[BaseModel]) -> set[str]:
    found = set()
    for name, info in model.model_fields.items():
        if any(isinstance(m, AfterValidator) and m.func is _printable for m in info.metadata):
            found.add(name)
        assert "_printable" not in repr(typing.get_args(info.annotation)), f"{name}: a nested printable check"
    return found


@pytest.mark.parametrize(
    ("model", "struct", "patterns", "printable", "times"),
    [
        (UsageEvent, compiled.UsageEventStruct,
         {"event_id": compiled.EVENT_ID_PATTERN, "trace_id": compiled.TRACE_ID_PATTERN, "span_id": compiled.SPAN_ID_PATTERN},
         compiled.USAGE_PRINTABLE, compiled.USAGE_TIMES),
        (TotalsRecord, compiled.TotalsRecordStruct, {}, compiled.TOTALS_PRINTABLE, compiled.TOTALS_TIMES),
    ],
)
def test_the_mirror_is_the_model_field_for_field(
    model: type[BaseModel], struct: type[msgspec.Struct], patterns: dict[str, str], printable: tuple[str, ...],
    times: tuple[str, ...],
) -> None:
    assert struct.__struct_fields__ == tuple(model.model_fields), "same fields, same order"
    model_schema = model.model_json_schema()
    assert set(model_schema["required"]) == set(_resolve(msgspec.json.schema(struct), msgspec.json.schema(struct))["required"])
    assert _mirror_schema(struct, patterns, times) == _normal(model_schema["properties"]), "same constraints"
    assert _printable_fields(model) == set(printable)
    defaults = {f.name: f.default_factory() if f.default_factory is not msgspec.NODEFAULT else f.default
                for f in msgspec.structs.fields(struct) if not f.required}
    assert defaults == {n: i.get_default(call_default_factory=True) for n, i in model.model_fields.items() if not i.is_required()}
    assert model.model_config.get("extra") == "ignore"  # unknown fields: pydantic's path ignores them
    assert struct.__struct_config__.forbid_unknown_fields and struct.__struct_config__.frozen


def test_the_models_of_fast_results_equal_pydantic_decoding() -> None:
    for value in (dumps(USAGE), dumps({k: v for k, v in USAGE.items() if k not in ("model", "attributes")})):
        model = wire.usage_model(wire.decode_usage_record(b"acme", value))
        assert type(model) is UsageEvent
        assert model == wire.decode_usage(value)
        assert wire.encode(model) == wire.encode(wire.decode_usage(value))
    record = wire.totals_model(wire.decode_totals(dumps(TOTALS)))
    assert type(record) is TotalsRecord
    assert record == wire.decode_totals_model(dumps(TOTALS))
    assert record.model_copy(update={"used_tokens": 1}).used_tokens == 1
    assert record.model_dump(mode="json") == wire.decode_totals_model(dumps(TOTALS)).model_dump(mode="json")
