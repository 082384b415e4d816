"""Periods that close (issue 12), on the real broker: sealed totals, adjustments, memory bounded by
open periods, and the independent verifier agreeing on both."""

from __future__ import annotations

import asyncio
import sys
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from aggregator.changelog import read_changelog, read_sealed
from aggregator.config import AggregatorConfig
from schemas.sealed import ANY_ZONE_S
from schemas.usage import UsageEvent
from schemas.wire import encode
from tests.helpers import REPO, RawRecord, eventually, running_aggregator, send_records, verified
from transport.admin import ensure_topics

sys.path.insert(0, str(REPO / "examples"))
from billing import closed_periods

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

_ids = iter(range(10**7))


def event(tenant: str, period: str, tokens: int = 100, when: datetime | None = None) -> UsageEvent:
    return UsageEvent(event_id=f"seal{next(_ids):010d}", tenant_id=tenant, period_key=period, total_tokens=tokens,
                      quota_tokens=10**9, event_time=when or datetime.now(UTC), instance_id="test")


async def publish(config: AggregatorConfig, events: list[UsageEvent]) -> None:
    await send_records(config.connection, config.topics.usage, [RawRecord(e.tenant_id.encode(), encode(e)) for e in events])


async def test_a_period_seals_while_late_events_still_arrive(aggregator_config: AggregatorConfig) -> None:
    """A day period whose seal time comes a few seconds into the test: its events before it make
    the sealed total, the ones after are adjustments (never added), nothing is lost, the key leaves
    the aggregator's memory and changelog, an open period is untouched, and the verifier agrees."""
    day = (datetime.now(UTC).date() - timedelta(days=2)).isoformat()
    day_end = datetime.fromisoformat(day).replace(tzinfo=UTC).timestamp() + 86400
    grace = datetime.now(UTC).timestamp() + 8 - (day_end + ANY_ZONE_S)  # seal time: 8 s from now
    config = replace(aggregator_config, seal_periods=True, seal_grace_s=grace, allow_short_retention=True)
    await ensure_topics(config.connection, config.topics)
    month = datetime.now(UTC).strftime("%Y-%m")
    async with running_aggregator(config) as aggregator:
        await publish(config, [event("closing", day) for _ in range(10)] + [event("open", month) for _ in range(5)])
        await eventually(lambda: aggregator.stats.sealed == 1, timeout=30, what="the day sealed")
        assert ("closing", day) not in aggregator.state.totals and ("open", month) in aggregator.state.totals
        await publish(config, [event("closing", day, tokens=7) for _ in range(3)])  # late
        await eventually(lambda: aggregator.stats.adjustments == 3, timeout=30, what="three adjustments")
        report = await verified(config)
        assert (report.sealed, report.adjustments) == (1, 3)
    sealed, adjustments = await read_sealed(config.connection, config.topics.sealed)
    closed = sealed[("closing", day)]
    assert (closed.used_tokens, closed.event_count) == (1_000, 10)
    assert sorted(adjustments[("closing", day)].values()) == [7, 7, 7]
    assert await closed_periods(config.connection, config.topics) == [
        f"closed closing {day}: sealed 1000 tokens in 10 events; 3 adjustments, 21 tokens"]  # the billing example's bill
    changelog = await read_changelog(config.connection, config.topics.totals)
    assert ("closing", day) not in changelog and changelog[("open", month)].used_tokens == 500
    # A restart restores only the open period, and does not seal or adjust anything twice.
    async with running_aggregator(config) as again:
        assert ("closing", day) not in again.state.totals and again.stats.restored_keys == 1
        await verified(config)


async def _usage_topic_stamped_by_producers(config: AggregatorConfig) -> None:
    """The test writes months of history now: its records carry the times they simulate, so the
    usage topic takes the producer's timestamps (CreateTime) instead of the broker's."""
    admin = AIOKafkaAdminClient(**config.connection.client_kwargs())
    await admin.start()
    try:
        await admin.create_topics([NewTopic(config.topics.usage, config.topics.partitions, 1, topic_configs={
            "cleanup.policy": "delete", "retention.ms": "-1", "message.timestamp.type": "CreateTime"})])
    finally:
        await admin.close()
    await ensure_topics(config.connection, config.topics)


async def _publish_month(config: AggregatorConfig, month: date, tenants: int) -> None:
    producer = AIOKafkaProducer(**config.connection.client_kwargs(), acks="all")
    await producer.start()
    try:
        futures = []
        for day in (3, 17):
            when = datetime(month.year, month.month, day, 12, tzinfo=UTC)
            for index in range(tenants):
                one = event(f"t{index}", f"{month:%Y-%m}", when=when)
                futures.append(await producer.send(config.topics.usage, encode(one), key=one.tenant_id.encode(),
                                                   timestamp_ms=int(when.timestamp() * 1000)))
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


@pytest.mark.parametrize("seal", [True, False], ids=["sealing", "never-sealing"])
async def test_keys_and_restore_stay_flat_as_months_pass(aggregator_config: AggregatorConfig, seal: bool) -> None:
    """Twelve months of history, 40 tenants, read by an aggregator in small batches: sealing, as
    the records' timestamps pass each month's seal time the month leaves memory (held keys stay
    within about two months' worth) and a restart restores none of the closed ones; never
    sealing, the keys held grow with every month and all are restored."""
    config = replace(aggregator_config, seal_periods=seal, batch_max=40, heartbeat_interval_s=0.001)
    await _usage_topic_stamped_by_producers(config)
    tenants = 40
    for index in range(12):
        await _publish_month(config, date(2025, index + 1, 1), tenants)
    held: list[int] = []
    async with running_aggregator(config) as aggregator:

        async def sample() -> None:
            while True:
                held.append(len(aggregator.state.totals))
                await asyncio.sleep(0)

        sampler = asyncio.create_task(sample())
        try:
            await eventually(lambda: aggregator.stats.events == 12 * 2 * tenants, timeout=60, what="history applied")
        finally:
            sampler.cancel()
        if seal:
            await eventually(lambda: aggregator.stats.sealed == 12 * tenants, timeout=30, what="every month sealed")
        await verified(config)
        final = len(aggregator.state.totals)
    async with running_aggregator(config) as again:
        restored = again.stats.restored_keys
        last_restore_s = again.stats.last_restore_s
    print(f"{'sealing' if seal else 'never sealing'}: most keys held {max(held)}, at the end {final}; "
          f"a restart restored {restored} keys in {last_restore_s * 1000:.1f} ms")
    if seal:
        assert max(held) <= 3 * tenants and final == 0 and restored == 0
        sealed, adjustments = await read_sealed(config.connection, config.topics.sealed)
        assert len(sealed) == 12 * tenants and all(s.used_tokens == 200 for s in sealed.values()) and not adjustments
    else:
        assert max(held) == final == restored == 12 * tenants
