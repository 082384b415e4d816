"""Issue 9, producer side, on the real broker: followers that survive any record, control records
bounded, and every event the store publishes readable by the aggregator."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from agent_framework import Agent

from aggregator.config import AggregatorConfig
from aggregator.limits import LimitsFeed, write_limit
from aggregator.state import Limits
from producer import KafkaQuotaStore, ProducerConfig, TokenGuardMiddleware, ensure_topics
from producer.validation import (
    MAX_ATTRIBUTE_VALUE_CHARS,
    MAX_ATTRIBUTES,
    MAX_INSTANCE_CHARS,
    MAX_PERIOD_CHARS,
    MAX_QUOTA_TOKENS,
    MAX_TENANT_CHARS,
)
from schemas.limits import QuotaLimit
from schemas.notices import Heartbeat, QuotaNotice
from schemas.wire import decode_usage_record, encode, heartbeat_key, limit_key, tenant_period_key, usage_key
from tests.helpers import (
    RawRecord,
    eventually,
    make_event,
    notices_feed,
    read_topic,
    run_agent,
    send_raw,
    send_raw_header_record,
    send_records,
)
from tests.hostile_client import HOSTILE_MODELS, HOSTILE_USAGE, Hostile

pytestmark = pytest.mark.integration

NESTED_KEY = b"[" * 100_000 + b"]" * 100_000  # json.loads raises RecursionError on it


def limit(tenant: str | None, tokens: int) -> QuotaLimit:
    return QuotaLimit(tenant_id=tenant, limit_tokens=tokens, updated_at=datetime.now(UTC))


async def write_hostile_limits(config: AggregatorConfig) -> None:
    topic = config.topics.limits
    await send_raw(config.connection, topic, [
        (NESTED_KEY, encode(limit("acme", 1))),
        (limit_key("acme"), b"\x00\xffgarbage"),
        (limit_key("acme"), b'{"tenant_id": "acme", "limit_tokens": -5}'),
        (limit_key("acme"), encode(limit("globex", 1))),  # key names one tenant, value another
        (b"not json at all", None),  # a tombstone for a key that was never ours
        (limit_key("never-set"), None),  # a tombstone for a tenant without a limit
        (b'["tenant", "acme", "extra"]', encode(limit("acme", 3))),
    ])
    await send_raw_header_record(config.connection, topic, limit_key("acme"), encode(limit("acme", 2)))


async def test_the_limits_follower_survives_hostile_records_and_applies_later_limits(
    aggregator_config: AggregatorConfig,
) -> None:
    await ensure_topics(aggregator_config.connection, aggregator_config.topics)
    await write_hostile_limits(aggregator_config)  # read at start (catch-up)
    await write_limit(aggregator_config.connection, aggregator_config.topics, limit("acme", 7_000))
    limits = Limits()
    changed: list[str | None] = []

    async def on_change(tenant: str | None) -> None:
        changed.append(tenant)

    feed = LimitsFeed(aggregator_config, limits, on_change=on_change)
    await feed.start()
    try:
        assert limits.per_tenant["acme"].limit_tokens == 7_000
        assert feed.failed is None
        await write_hostile_limits(aggregator_config)  # and while following
        await write_limit(aggregator_config.connection, aggregator_config.topics, limit("acme", 9_000))
        await write_limit(aggregator_config.connection, aggregator_config.topics, limit(None, 123))
        await eventually(lambda: limits.topic_default is not None, 30, "the limits after the hostile records applied")
        assert limits.per_tenant["acme"].limit_tokens == 9_000 and limits.topic_default.limit_tokens == 123
        assert feed.failed is None
        assert feed.skipped == {
            "invalid_key": 6, "invalid_json": 2, "invalid_schema": 2, "key_value_mismatch": 2, "unreadable": 2,
        }, feed.skipped
        assert changed[-2:] == ["acme", None]
    finally:
        await feed.stop()


async def test_the_notices_feed_survives_garbage_notices(producer_config: ProducerConfig) -> None:
    await ensure_topics(producer_config.connection, producer_config.topics)
    topic = producer_config.topics.notices

    def notice(used: int) -> QuotaNotice:
        return QuotaNotice(
            tenant_id="acme", period_key="2026-04", state="ok", used_tokens=used, limit_tokens=1_000,
            usage_partition=0, usage_offset=-1, aggregator_id="agg", emitted_at=datetime.now(UTC),
        )

    garbage = [
        (NESTED_KEY, b"[" * 50_000),
        (tenant_period_key("acme", "2026-04"), b"\xff\xfe not json"),
        (tenant_period_key("acme", "2026-04"), b'{"type": "notice", "tenant_id": 5}'),
        (b"\x00", b'{"type": "heartbeat", "usage_partition": -1}'),
    ]
    await send_raw(producer_config.connection, topic, garbage)
    await send_raw_header_record(producer_config.connection, topic, b"k", encode(notice(999)))
    await send_raw(producer_config.connection, topic, [(tenant_period_key("acme", "2026-04"), encode(notice(10)))])
    async with notices_feed(producer_config) as (feed, snapshot):
        held = snapshot.notice("acme", "2026-04")
        assert held is not None and held.used_tokens == 10
        await send_raw(producer_config.connection, topic, garbage)
        await send_raw_header_record(producer_config.connection, topic, b"k", encode(notice(999)))
        later = notice(20)
        await send_raw(producer_config.connection, topic, [(tenant_period_key("acme", "2026-04"), encode(later))])
        await feed.wait_until(lambda s: (n := s.notice("acme", "2026-04")) is not None and n.used_tokens == 20, 30)
        assert feed.failed is None
        assert feed.skipped == {"invalid_json": 4, "invalid_schema": 4, "unreadable": 2}, feed.skipped


# --- control records bounded ----------------------------------------------------------------


def acme_notice(state: str, offset: int, *, partition: int, used: int, limit_tokens: int = 500) -> QuotaNotice:
    return QuotaNotice(
        tenant_id="acme", period_key="2026-04", state=state, used_tokens=used, limit_tokens=limit_tokens,  # type: ignore[arg-type]
        usage_partition=partition, usage_offset=offset, aggregator_id="agg", emitted_at=datetime.now(UTC),
    )


async def real_usage_offset(config: ProducerConfig, tenant: str) -> tuple[int, int]:
    """(partition, offset) of a usage record really on the topic, as a genuine notice covers."""
    [at] = await send_records(config.connection, config.topics.usage, [RawRecord(usage_key(tenant), encode(make_event(tenant, 600)))])
    return at


async def test_a_notice_claiming_an_offset_beyond_the_usage_end_never_outranks_genuine_ones(
    producer_config: ProducerConfig,
) -> None:
    await ensure_topics(producer_config.connection, producer_config.topics)
    partition, offset = await real_usage_offset(producer_config, "acme")
    key = tenant_period_key("acme", "2026-04")
    forged = acme_notice("ok", 2**62, partition=partition, used=0, limit_tokens=10**15)
    # Before the feed starts (read at catch-up), then the genuine notice the aggregator would send.
    await send_raw(producer_config.connection, producer_config.topics.notices, [
        (key, encode(forged)), (key, encode(acme_notice("warning", offset - 1 if offset else -1, partition=partition, used=450))),
    ])
    async with notices_feed(producer_config) as (feed, snapshot):
        held = snapshot.notice("acme", "2026-04")
        assert held is not None and held.state == "warning", "the forged 'ok' was not taken at start"
        assert feed.ignored == {"offset_beyond_end": 1}
        # While following: a forged 'ok' again, then the genuine 'exceeded' covering the real record.
        await send_raw(producer_config.connection, producer_config.topics.notices, [
            (key, encode(forged)), (key, encode(acme_notice("exceeded", offset, partition=partition, used=1_050))),
        ])
        await feed.wait_until(lambda s: s.notice("acme", "2026-04").state == "exceeded", 30)  # type: ignore[union-attr]
        assert not snapshot.decide("acme", "2026-04", 10**15).allowed
        await eventually(lambda: feed.ignored["offset_beyond_end"] == 2, 10, "the second forgery ignored")
        assert snapshot.notice("acme", "2026-04").state == "exceeded"  # type: ignore[union-attr]


async def test_a_heartbeat_dated_9999_does_not_keep_a_partition_fresh(producer_config: ProducerConfig) -> None:
    config = replace(producer_config, stale_after_s=5.0, stale_policy="fail_closed")
    await ensure_topics(config.connection, config.topics)
    async with KafkaQuotaStore(config) as store:
        partition = store.publisher.partition_of("acme")
        now = datetime.now(UTC)
        old = Heartbeat(usage_partition=partition, usage_offset=-1, aggregator_id="agg", emitted_at=now - timedelta(seconds=60))
        forged = Heartbeat(usage_partition=partition, usage_offset=-1, aggregator_id="forger", emitted_at=now.replace(year=9999))
        await send_raw(config.connection, config.topics.notices, [
            (heartbeat_key(partition), encode(old)), (heartbeat_key(partition), encode(forged)),
        ])
        await eventually(lambda: store.feed.ignored["dated_in_the_future"] == 1, 30, "the forged heartbeat read")
        age = store.snapshot.heartbeat_age(partition)
        assert age is not None and age >= 60, "the partition's age comes from the genuine (old) heartbeat"
        decision = store.check("acme", "2026-04", 10**6)
        assert not decision.allowed and decision.reason == "quota_state_stale"
        fresh = Heartbeat(usage_partition=partition, usage_offset=-1, aggregator_id="agg", emitted_at=datetime.now(UTC))
        await send_raw(config.connection, config.topics.notices, [(heartbeat_key(partition), encode(fresh))])
        await eventually(lambda: (store.snapshot.heartbeat_age(partition) or 99) < 5, 30, "a genuine heartbeat heard")
        assert store.check("acme", "2026-04", 10**6).allowed


# --- nothing the fleet admits is dead-lettered for its shape ---------------------------------


async def test_every_event_the_store_publishes_for_hostile_calls_is_one_the_aggregator_reads(
    producer_config: ProducerConfig,
) -> None:
    wide = "\U0001d518"
    config = replace(producer_config, instance_id=wide * MAX_INSTANCE_CHARS)
    attributes = {f"k{i:02d}": wide * MAX_ATTRIBUTE_VALUE_CHARS for i in range(MAX_ATTRIBUTES)}
    calls = 0
    async with KafkaQuotaStore(config, attributes=attributes) as store:
        for stream in (False, True):
            for usage in HOSTILE_USAGE:
                for model in HOSTILE_MODELS:
                    guard = TokenGuardMiddleware(
                        quota_store=store, quota_tokens=MAX_QUOTA_TOKENS, user_id_getter=lambda _: wide * MAX_TENANT_CHARS,
                        period_key_fn=lambda: "P" * MAX_PERIOD_CHARS,
                    )
                    agent = Agent(Hostile(usage, model))
                    await run_agent(agent, "Hello!", stream=stream, middleware=[guard])
                    calls += 1
        await store.publisher.flush(30)
    records = await read_topic(config.connection, config.topics.usage)
    assert len(records) == calls
    for record in records:
        event = decode_usage_record(record.key, record.value)  # the aggregator's check; raises on a dead letter
        assert (event.input_tokens or 0) + (event.output_tokens or 0) <= event.total_tokens
