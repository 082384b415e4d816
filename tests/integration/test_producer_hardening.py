"""Issue 9, producer side, on the real broker: followers that survive any record, control records
bounded, and every event the store publishes readable by the aggregator."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from aggregator.config import AggregatorConfig
from aggregator.limits import LimitsFeed, write_limit
from aggregator.state import Limits
from producer import ProducerConfig, ensure_topics
from producer.notices_feed import NoticesFeed
from producer.snapshot import QuotaSnapshot
from schemas.limits import QuotaLimit
from schemas.notices import QuotaNotice
from schemas.wire import encode, limit_key, tenant_period_key
from tests.helpers import eventually, send_raw, send_with_raw_header_name

pytestmark = pytest.mark.integration

NESTED_KEY = b"[" * 100_000 + b"]" * 100_000  # json.loads raises RecursionError on it


def limit(tenant: str | None, tokens: int) -> QuotaLimit:
    return QuotaLimit(tenant_id=tenant, limit_tokens=tokens, updated_at=datetime.now(timezone.utc))


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
    await send_with_raw_header_name(config.connection, topic, limit_key("acme"), encode(limit("acme", 2)))


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
            usage_partition=0, usage_offset=-1, aggregator_id="agg", emitted_at=datetime.now(timezone.utc),
        )

    garbage = [
        (NESTED_KEY, b"[" * 50_000),
        (tenant_period_key("acme", "2026-04"), b"\xff\xfe not json"),
        (tenant_period_key("acme", "2026-04"), b'{"type": "notice", "tenant_id": 5}'),
        (b"\x00", b'{"type": "heartbeat", "usage_partition": -1}'),
    ]
    await send_raw(producer_config.connection, topic, garbage)
    await send_with_raw_header_name(producer_config.connection, topic, b"k", encode(notice(999)))
    await send_raw(producer_config.connection, topic, [(tenant_period_key("acme", "2026-04"), encode(notice(10)))])
    snapshot = QuotaSnapshot()
    feed = NoticesFeed(producer_config, snapshot)
    await feed.start()
    try:
        held = snapshot.notice("acme", "2026-04")
        assert held is not None and held.used_tokens == 10
        await send_raw(producer_config.connection, topic, garbage)
        await send_with_raw_header_name(producer_config.connection, topic, b"k", encode(notice(999)))
        later = notice(20)
        await send_raw(producer_config.connection, topic, [(tenant_period_key("acme", "2026-04"), encode(later))])
        await feed.wait_until(lambda s: (n := s.notice("acme", "2026-04")) is not None and n.used_tokens == 20, 30)
        assert feed.failed is None
        assert feed.skipped == {"invalid_json": 4, "invalid_schema": 4, "unreadable": 2}, feed.skipped
    finally:
        await feed.stop()
