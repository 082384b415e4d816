"""Issue 9, producer side: one validation at the edge, control-record bounds, followers that survive
any record. Pure rules and real ``Agent`` objects over the scripted client; no broker."""

from __future__ import annotations

import logging
import string
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from agent_framework import Agent
from aiokafka.structs import ConsumerRecord
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest
from pydantic import ValidationError

from aggregator.limits import tenant_of_limit_key
from producer import InMemoryQuotaStore, KafkaConnection, KafkaQuotaStore, ProducerConfig, TokenGuardMiddleware
from producer.errors import InvalidCallError, TokenGuardError
from producer.metrics import register_metrics
from producer.scripted import ScriptedChatClient
from producer.store import CallUsage, Decision
from producer.validation import (
    MAX_ATTRIBUTE_KEY_CHARS,
    MAX_ATTRIBUTE_VALUE_CHARS,
    MAX_ATTRIBUTES,
    MAX_INSTANCE_CHARS,
    MAX_MODEL_CHARS,
    MAX_PERIOD_CHARS,
    MAX_QUOTA_TOKENS,
    MAX_TENANT_CHARS,
    MAX_TOKENS_PER_EVENT,
    bound_model,
    check_attributes,
    fit_usage,
    settle_counts,
)
from schemas import _types
from schemas.usage import UsageEvent
from schemas.wire import MAX_RECORD_BYTES, decode_usage, encode_usage
from tests.helpers import call_usage, run_agent
from tests.hostile_client import HOSTILE_MODELS, HOSTILE_USAGE, Hostile, details
from transport.follower import TopicFollower

NOW = datetime(2026, 4, 14, tzinfo=UTC)


def event(**changes: Any) -> UsageEvent:
    fields: dict[str, Any] = dict(
        event_id="e" * 8, tenant_id="acme", period_key="2026-04", total_tokens=1, quota_tokens=1,
        event_time=NOW, instance_id="i",
    )
    fields.update(changes)
    return UsageEvent(**fields)


# --- the bounds are the schema's ------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "longest"),
    [("model", MAX_MODEL_CHARS), ("tenant_id", MAX_TENANT_CHARS), ("period_key", MAX_PERIOD_CHARS),
     ("instance_id", MAX_INSTANCE_CHARS)],
)
def test_string_bounds_are_exactly_where_the_schema_puts_them(field: str, longest: int) -> None:
    event(**{field: "m" * longest})
    with pytest.raises(ValidationError):
        event(**{field: "m" * (longest + 1)})


def test_count_quota_and_attribute_bounds_are_exactly_the_schemas() -> None:
    assert MAX_TOKENS_PER_EVENT == _types.MAX_TOKENS_PER_EVENT and MAX_QUOTA_TOKENS == _types.MAX_LIMIT_TOKENS
    event(total_tokens=MAX_TOKENS_PER_EVENT, quota_tokens=MAX_QUOTA_TOKENS)
    for bad in ({"total_tokens": MAX_TOKENS_PER_EVENT + 1}, {"quota_tokens": MAX_QUOTA_TOKENS + 1}):
        with pytest.raises(ValidationError):
            event(**bad)
    widest = {f"{i:0{MAX_ATTRIBUTE_KEY_CHARS}d}": "v" * MAX_ATTRIBUTE_VALUE_CHARS for i in range(MAX_ATTRIBUTES)}
    event(attributes=widest)
    for bad_attributes in (
        {**widest, "one-more": "v"},
        {"k" * (MAX_ATTRIBUTE_KEY_CHARS + 1): "v"},
        {"k": "v" * (MAX_ATTRIBUTE_VALUE_CHARS + 1)},
        {"": "v"},
    ):
        with pytest.raises(ValidationError):
            event(attributes=bad_attributes)


# --- at construction ------------------------------------------------------------------------


def test_quota_tokens_outside_the_schema_is_refused_at_construction() -> None:
    make = lambda quota: TokenGuardMiddleware(quota_store=InMemoryQuotaStore(), quota_tokens=quota)  # noqa: E731
    assert make(MAX_QUOTA_TOKENS).quota_tokens == MAX_QUOTA_TOKENS
    assert make(1e6).quota_tokens == 1_000_000, "an integral float names an int, as the seed took it"
    for too_big in (MAX_QUOTA_TOKENS + 1, -1):
        with pytest.raises(ValueError, match="quota_tokens"):
            make(too_big)
    for wrong in ("50000", True, 10.5, None):
        with pytest.raises(TypeError, match="quota_tokens"):
            make(wrong)


def test_instance_id_outside_the_schema_is_refused_by_the_config(tmp_path: Path) -> None:
    assert ProducerConfig(instance_id="i" * MAX_INSTANCE_CHARS, spool_dir=None).instance_id == "i" * MAX_INSTANCE_CHARS
    assert len(ProducerConfig(spool_dir=None).instance_id) <= MAX_INSTANCE_CHARS, "the default fits too"
    for bad in ("i" * (MAX_INSTANCE_CHARS + 1), "", "host\x1b[2J"):
        with pytest.raises(ValueError, match="instance_id"):
            ProducerConfig(instance_id=bad, spool_dir=None)
    with pytest.raises(TypeError, match="instance_id"):
        ProducerConfig(instance_id=42, spool_dir=None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="instance_id"):
        ProducerConfig.from_env({"TOKENGUARD_INSTANCE_ID": "x" * 500})


def test_attributes_outside_the_schema_are_refused_by_the_store() -> None:
    config = ProducerConfig(spool_dir=None)
    accepted = {"region": "eu-west", "team": "ä" * MAX_ATTRIBUTE_VALUE_CHARS}
    store = KafkaQuotaStore(config, attributes=accepted)
    assert store.draft(call_usage("acme", 1)).attributes == accepted, "accepted attributes ride on every event"
    for bad in (
        {f"k{i}": "v" for i in range(MAX_ATTRIBUTES + 1)},
        {"k" * (MAX_ATTRIBUTE_KEY_CHARS + 1): "v"},
        {"k": "v" * (MAX_ATTRIBUTE_VALUE_CHARS + 1)},
        {"": "v"},
        {"k": "\ud800"},  # not UTF-8: the publisher could never encode it
    ):
        with pytest.raises(ValueError, match="attribute"):
            KafkaQuotaStore(config, attributes=bad)
    with pytest.raises(TypeError, match="attributes"):
        KafkaQuotaStore(config, attributes={"k": 5})  # type: ignore[dict-item]


def test_attributes_at_every_bound_at_once_still_make_records_the_aggregator_reads() -> None:
    escaped = "\x01"  # 6 bytes in JSON: the costliest character an attribute may hold
    heavy = {f"{i:0{MAX_ATTRIBUTE_KEY_CHARS}d}": escaped * MAX_ATTRIBUTE_VALUE_CHARS for i in range(MAX_ATTRIBUTES)}
    try:
        checked = check_attributes(heavy)
    except ValueError as exc:
        assert "too large" in str(exc)  # refused at construction: a clear error, not a dead letter
        return
    # Accepted: then the largest event a store with them can build is a record the aggregator reads.
    wide, most = "\U0001d518", MAX_TOKENS_PER_EVENT
    store = KafkaQuotaStore(ProducerConfig(instance_id=wide * MAX_INSTANCE_CHARS, spool_dir=None), attributes=checked)
    largest = CallUsage(
        tenant_id=wide * MAX_TENANT_CHARS, period_key=wide * MAX_PERIOD_CHARS, model=escaped * MAX_MODEL_CHARS,
        input_tokens=most, output_tokens=most, total_tokens=most, cache_creation_input_tokens=most,
        cache_read_input_tokens=most, reasoning_output_tokens=most, quota_tokens=MAX_QUOTA_TOKENS, streaming=True,
        event_time=datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
    )
    value = encode_usage(store.draft(fit_usage(largest)))
    assert len(value) <= MAX_RECORD_BYTES
    assert decode_usage(value).attributes == heavy  # what the aggregator does; raises on a dead letter


# --- per call, before the LLM ---------------------------------------------------------------


class Counting(ScriptedChatClient):
    pass


@pytest.mark.parametrize(
    ("tenant", "period"),
    [
        ("acme", "2026-04\x1b[31m"),  # an escape sequence for the operator's terminal
        ("acme", "p" * (MAX_PERIOD_CHARS + 1)),
        ("acme", ""),
        ("", "2026-04"),
        ("t" * (MAX_TENANT_CHARS + 1), "2026-04"),
        ("line\nbreak", "2026-04"),
    ],
)
async def test_a_bad_tenant_id_or_period_key_is_refused_before_the_llm_is_called(tenant: str, period: str) -> None:
    client = Counting()
    guard = TokenGuardMiddleware(
        quota_store=InMemoryQuotaStore(), quota_tokens=10**6, user_id_getter=lambda _: tenant, period_key_fn=lambda: period
    )
    with pytest.raises(InvalidCallError) as caught:
        await Agent(client).run("Hello!", middleware=[guard])
    assert isinstance(caught.value, ValueError) and isinstance(caught.value, TokenGuardError)
    assert client.calls == 0, "the LLM was not called"


async def test_a_period_key_fn_returning_a_non_string_is_refused_before_the_llm() -> None:
    client = Counting()
    guard = TokenGuardMiddleware(quota_store=InMemoryQuotaStore(), quota_tokens=10**6, period_key_fn=lambda: 202604)  # type: ignore[arg-type, return-value]
    with pytest.raises(InvalidCallError, match="period key"):
        await Agent(client).run("Hello!", middleware=[guard])
    unhashable = TokenGuardMiddleware(quota_store=InMemoryQuotaStore(), quota_tokens=10**6, user_id_getter=lambda _: ["acme"])  # type: ignore[arg-type, return-value]
    with pytest.raises(InvalidCallError, match="tenant id"):
        await Agent(client).run("Hello!", middleware=[unhashable])
    assert client.calls == 0


# --- per call, after the LLM: counts and model ----------------------------------------------


def settle(details: Mapping[str, Any], inp: int = 7, out: int = 11) -> tuple[int | None, int | None, int, bool]:
    counts = settle_counts(details, input_estimate=lambda: inp, output_estimate=lambda: out)
    return counts.input_tokens, counts.output_tokens, counts.total_tokens, counts.estimated


@pytest.mark.parametrize(
    ("reported", "expected"),
    [
        (details(10, 20, 30), (10, 20, 30, False)),
        (details(10, 20, None), (10, 20, 30, False)),  # the sum of two provider counts is exact
        (details(None, None, None), (7, 11, 18, True)),  # recorded as 0, unflagged, before issue 9
        (details(-5, 20, None), (7, 20, 27, True)),
        (details(10, -1, -1), (10, 11, 21, True)),
        (details("ten", 20, None), (7, 20, 27, True)),
        (details(10, 20, 5), (10, 20, 30, True)),  # a total below input + output becomes the sum
        (details(None, 20, 30), (10, 20, 30, False)),  # one part from the total: exact
        (details(None, None, 30), (7, 23, 30, True)),  # the split is estimated, the total kept
        (details(None, 40, 30), (7, 40, 47, True)),
        (details(True, 20, 30), (10, 20, 30, True)),  # a bool is not a count
        (details(float("inf"), 20, None), (7, 20, 27, True)),
        (details(10**12, 5, None), (MAX_TOKENS_PER_EVENT, 0, MAX_TOKENS_PER_EVENT, True)),
        (details(10, 20, 10**30), (10, 20, MAX_TOKENS_PER_EVENT, True)),
        ({}, (7, 11, 18, True)),
        (details(0, 0, 0), (7, 11, 18, True)),  # how the framework hands a chat middleware None counts
        (details(12, 0, 12), (12, 11, 23, True)),  # text came back: 0 output tokens is wrong
        ({**details(0, 9, 9), "cache_read_input_token_count": 50}, (0, 9, 9, False)),  # a full cache hit
    ],
)
def test_provider_counts_are_settled_within_the_schema(reported: dict[str, Any], expected: tuple[Any, ...]) -> None:
    assert settle(reported) == expected


def test_estimates_are_not_computed_when_the_provider_counted() -> None:
    def boom() -> int:
        raise AssertionError("estimated although the provider counted")

    assert settle_counts(details(1, 2, 3), input_estimate=boom, output_estimate=boom).total_tokens == 3


def test_a_long_model_name_is_cut_deterministically_and_stays_distinct() -> None:
    a, b = "m" * 300 + "-a", "m" * 300 + "-b"
    assert bound_model(a) == bound_model(a) and len(bound_model(a) or "") == MAX_MODEL_CHARS
    assert bound_model(a) != bound_model(b)
    assert bound_model("gpt-4o") == "gpt-4o" and bound_model(None) is None
    assert bound_model("x\ud800y") == "x\ufffdy", "a lone surrogate could not be encoded"
    assert bound_model(12) == "12"
    event(model=bound_model("é" * 10_000))


_ANY = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(10**20), max_value=10**20), st.floats(allow_nan=True),
    st.text(max_size=5), st.just(float("inf")),
)
_KEYS = ["input_token_count", "output_token_count", "total_token_count", "cache_creation_input_token_count",
         "cache_read_input_token_count", "reasoning_output_token_count"]


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(_KEYS), _ANY), st.integers(0, 10**9), st.integers(0, 10**9), _ANY)
def test_whatever_a_provider_reports_the_event_fits_the_schema(
    reported: dict[str, Any], inp: int, out: int, model: Any
) -> None:
    counts = settle_counts(reported, input_estimate=lambda: inp, output_estimate=lambda: out)
    assert (counts.input_tokens or 0) + (counts.output_tokens or 0) <= counts.total_tokens
    event(
        model=bound_model(model), input_tokens=counts.input_tokens, output_tokens=counts.output_tokens,
        total_tokens=counts.total_tokens, cache_creation_input_tokens=counts.cache_creation_input_tokens,
        cache_read_input_tokens=counts.cache_read_input_tokens, reasoning_output_tokens=counts.reasoning_output_tokens,
    )


@settings(max_examples=200, deadline=None)
@given(_ANY, _ANY, _ANY, _ANY, st.one_of(st.none(), st.text(max_size=400)))
def test_whatever_a_direct_caller_records_the_store_fits_it(inp: Any, out: Any, total: Any, extra: Any, model: Any) -> None:
    usage = CallUsage(
        tenant_id="acme", period_key="p", model=model, input_tokens=inp, output_tokens=out, total_tokens=total,
        cache_creation_input_tokens=extra, cache_read_input_tokens=None, reasoning_output_tokens=extra,
        quota_tokens=10**20, streaming=False, event_time=datetime(2026, 4, 14),
    )
    fitted = fit_usage(usage)
    event(**{name: getattr(fitted, name) for name in (
        "model", "input_tokens", "output_tokens", "total_tokens", "cache_creation_input_tokens",
        "reasoning_output_tokens", "quota_tokens", "event_time", "estimated")})


def test_a_well_formed_call_usage_is_left_as_it_is() -> None:
    usage = CallUsage(
        tenant_id="acme", period_key="p", model="m", input_tokens=None, output_tokens=None, total_tokens=40,
        cache_creation_input_tokens=None, cache_read_input_tokens=None, reasoning_output_tokens=None,
        quota_tokens=500, streaming=False, event_time=NOW,
    )
    assert fit_usage(usage) is usage


# --- nothing admitted is later dead-lettered for its shape ----------------------------------


class Capturing:
    """A ``QuotaBackend`` that builds each event exactly as ``KafkaQuotaStore.record`` does and
    keeps it, instead of handing it to a publisher (no broker in unit tests)."""

    def __init__(self, store: KafkaQuotaStore) -> None:
        self.store = store
        self.events: list[Any] = []

    def check(self, tenant_id: str, period_key: str, quota_tokens: int) -> Decision:
        self.store._validate_key(tenant_id, period_key)
        return Decision(True, 0, quota_tokens)

    def record(self, usage: CallUsage) -> int:
        self.events.append(self.store.draft(fit_usage(usage)))
        return 0


@pytest.mark.parametrize("stream", [False, True])
async def test_hostile_but_accepted_calls_publish_only_events_the_aggregator_decodes(stream: bool) -> None:
    wide = "\U0001d518"
    config = ProducerConfig(instance_id=wide * MAX_INSTANCE_CHARS, spool_dir=None)
    attributes = {f"{i:0{MAX_ATTRIBUTE_KEY_CHARS}d}"[-MAX_ATTRIBUTE_KEY_CHARS:]: wide * MAX_ATTRIBUTE_VALUE_CHARS
                  for i in range(MAX_ATTRIBUTES)}
    backend = Capturing(KafkaQuotaStore(config, attributes=attributes))
    tenants = [wide * MAX_TENANT_CHARS, "ten ant \"quoted\" \\ back", string.printable.strip()[:90]]
    for index, usage in enumerate(HOSTILE_USAGE):
        for model in HOSTILE_MODELS:
            tenant = tenants[(index + len(str(model))) % len(tenants)]
            guard = TokenGuardMiddleware(
                quota_store=backend, quota_tokens=MAX_QUOTA_TOKENS, user_id_getter=lambda _, t=tenant: t,
                period_key_fn=lambda: wide * MAX_PERIOD_CHARS,
            )
            agent = Agent(Hostile(usage, model))
            await run_agent(agent, "Hello there!", stream=stream, middleware=[guard])
    assert len(backend.events) == len(HOSTILE_USAGE) * len(HOSTILE_MODELS), "one event per admitted call"
    for draft in backend.events:
        decoded = decode_usage(encode_usage(draft))  # what the aggregator does; raises on a dead letter
        assert (decoded.input_tokens or 0) + (decoded.output_tokens or 0) <= decoded.total_tokens
    flagged = [draft.estimated for draft in backend.events]
    per_usage = [flagged[i * len(HOSTILE_MODELS)] for i in range(len(HOSTILE_USAGE))]
    assert per_usage == [True] * len(HOSTILE_USAGE), "every hostile report above is corrected, so flagged"


# --- followers survive any record -----------------------------------------------------------


def record(offset: int, value: bytes | None, key: bytes | None = b"k") -> ConsumerRecord:
    return ConsumerRecord("t", 0, offset, 0, 0, key, value, None, len(key or b""), len(value or b""), [])


def follower(handler: Callable[[list[ConsumerRecord]], Awaitable[None]]) -> TopicFollower:
    return TopicFollower(KafkaConnection(), "t", handler, client_id="test")


async def test_a_record_the_handler_raises_on_costs_only_itself(caplog: pytest.LogCaptureFixture) -> None:
    taken: list[int] = []

    async def handler(records: list[ConsumerRecord]) -> None:
        for r in records:
            if r.value == b"poison":
                raise ValueError("cannot read this one")
            taken.append(r.offset)

    reader = follower(handler)
    batch = [record(0, b"a"), record(1, b"poison"), record(2, b"b"), record(3, b"poison"), record(4, b"c")]
    with caplog.at_level(logging.DEBUG, logger="transport.follower"):
        await reader._deliver(batch)
    assert taken[-3:] == [0, 2, 4], "every good record is applied (the ones before the failure again)"
    assert reader.skipped == {"handler raised ValueError": 2}
    loud = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(loud) == 1 and "t:0:1" in loud[0].getMessage(), "logged once per reason, with partition and offset"


async def test_a_follower_that_stops_by_itself_says_so() -> None:
    class Broken:
        async def getmany(self, *partitions: object, timeout_ms: int = 0, max_records: int | None = None) -> dict:
            raise RuntimeError("client bug")

    async def handler(records: list[ConsumerRecord]) -> None:
        return None

    reader = follower(handler)
    await reader._follow(Broken())  # type: ignore[arg-type]
    assert isinstance(reader.failed, RuntimeError)


def test_a_limits_key_of_deeply_nested_json_is_refused_without_parsing_it() -> None:
    assert tenant_of_limit_key(b"[" * 100_000 + b"]" * 100_000) == (False, None)
    assert tenant_of_limit_key(b'["tenant", ' + b"[" * 5_000 + b"]" * 5_000 + b"]") == (False, None)
    assert tenant_of_limit_key(b'["tenant", "' + b"[" * 1_000 + b'"]') == (True, "[" * 1_000)
    assert tenant_of_limit_key(b'["default"]') == (True, None)
    assert tenant_of_limit_key(None) == (False, None)


# --- control-record bounds: configuration and metrics ---------------------------------------


def test_max_clock_skew_is_configurable_from_the_environment() -> None:
    assert ProducerConfig(spool_dir=None).max_clock_skew_s == 60.0
    assert ProducerConfig.from_env({"TOKENGUARD_MAX_CLOCK_SKEW_S": "5.5"}).max_clock_skew_s == 5.5
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="max_clock_skew_s"):
            ProducerConfig(max_clock_skew_s=bad, spool_dir=None)


def test_ignored_and_skipped_control_records_and_callback_timeouts_are_metrics() -> None:
    store = KafkaQuotaStore(ProducerConfig(spool_dir=None))
    guard = TokenGuardMiddleware(quota_store=store, quota_tokens=1)
    store.feed.ignored["offset_beyond_end"] += 2
    store.feed._follower.skipped["invalid_json"] += 3
    guard.stats.callback_timeouts += 1
    registry = CollectorRegistry()
    register_metrics(store, guard, registry=registry)
    text = generate_latest(registry).decode()
    assert 'tokenguard_notices_ignored_total{reason="offset_beyond_end"} 2.0' in text
    assert 'tokenguard_notices_skipped_total{reason="invalid_json"} 3.0' in text
    assert "tokenguard_notices_feed_failed 0.0" in text
    assert "tokenguard_callback_timeouts_total 1.0" in text
