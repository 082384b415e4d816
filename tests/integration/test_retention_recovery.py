"""Retention-aware verify and replay (issue 12), on the real broker.

The broker removes the oldest records of a usage partition when retention expires; here a
DeleteRecords request moves the partition's log start exactly as retention would, at a chosen
offset. A tenant-period some of whose events are gone can no longer be recomputed from the topic:
verify reports it as not verifiable (never as a difference) and replay keeps what the aggregator
counted, instead of lowering a billing total to what is left.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, RecordsToDelete

from aggregator.changelog import read_changelog
from aggregator.config import AggregatorConfig
from aggregator.replay import replay
from aggregator.verify import verify
from schemas.usage import UsageEvent
from schemas.wire import encode, tenant_period_key
from tests.helpers import RawRecord, running_aggregator, send_records, tenant_on, verified
from tests.integration.test_cli import tokenguard
from transport.admin import ensure_topics

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

OCTOBER = datetime(2026, 10, 15, tzinfo=UTC)
NOVEMBER = datetime(2026, 11, 15, tzinfo=UTC)
_ids = iter(range(10**6))


def event(tenant: str, period: str, when: datetime) -> UsageEvent:
    return UsageEvent(event_id=f"ret{next(_ids):010d}", tenant_id=tenant, period_key=period, total_tokens=100,
                      quota_tokens=10**9, event_time=when, instance_id="test")


async def publish(config: AggregatorConfig, events: list[UsageEvent]) -> list[tuple[int, int]]:
    return await send_records(config.connection, config.topics.usage,
                              [RawRecord(e.tenant_id.encode(), encode(e)) for e in events])


async def delete_before(config: AggregatorConfig, partition: int, offset: int) -> None:
    """What retention does to the oldest records of a partition: its log start moves to ``offset``."""
    admin = AIOKafkaAdminClient(**config.connection.client_kwargs())
    await admin.start()
    try:
        await admin.delete_records({TopicPartition(config.topics.usage, partition): RecordsToDelete(offset)})
    finally:
        await admin.close()


async def corrupt(config: AggregatorConfig, key: tuple[str, str], used: int) -> None:
    record = (await read_changelog(config.connection, config.topics.totals))[key]
    producer = AIOKafkaProducer(**config.connection.client_kwargs())
    await producer.start()
    try:
        await producer.send_and_wait(config.topics.totals, encode(record.model_copy(update={"used_tokens": used})),
                                     key=tenant_period_key(*key), partition=record.usage_partition)
    finally:
        await producer.stop()


async def used(config: AggregatorConfig) -> dict[tuple[str, str], int]:
    return {k: r.used_tokens for k, r in (await read_changelog(config.connection, config.topics.totals)).items()}


async def test_verify_and_replay_keep_a_month_whose_oldest_events_retention_removed(
    aggregator_config: AggregatorConfig,
) -> None:
    """The issue's operator: 50 events in one month, 30 in the next, counted exactly; the broker
    then removes the first 25. verify: 'not verifiable', exit 0, no difference; replay: October
    keeps 5,000 (not 2,500), November is rebuilt; the aggregator resumes on top of both."""
    config = aggregator_config
    await ensure_topics(config.connection, config.topics)
    tenant = tenant_on(0, config.topics.partitions, "acme")
    placed = await publish(config, [
        event(tenant, "2026-10", OCTOBER + timedelta(minutes=i)) for i in range(50)] + [
        event(tenant, "2026-11", NOVEMBER + timedelta(minutes=i)) for i in range(30)])
    partition, first = placed[0]
    async with running_aggregator(config):
        await verified(config)
    assert await used(config) == {(tenant, "2026-10"): 5_000, (tenant, "2026-11"): 3_000}
    await delete_before(config, partition, first + 25)

    report = await verify(config.connection, config.topics, config.group_id, wait_s=5)
    assert report.differences == []
    [gone] = report.unverifiable
    assert gone.key == (tenant, "2026-10") and (gone.changelog.used, gone.changelog.events) == (5_000, 50)
    assert gone.retained is not None and (gone.retained.used, gone.retained.events) == (2_500, 25)
    assert gone.log_start == first + 25
    code, out = await tokenguard(config, "verify", "--wait-s", "5")
    assert code == 0 and "NOT VERIFIABLE" in out and "events before the log start" in out and "differences: 0" in out, out

    await corrupt(config, (tenant, "2026-11"), 1)  # something for replay to put right
    code, out = await tokenguard(config, "replay")
    assert code == 0 and "rebuilt 1 tenant-periods" in out and "kept 1 tenant-periods as counted" in out, out
    assert await used(config) == {(tenant, "2026-10"): 5_000, (tenant, "2026-11"): 3_000}

    await publish(config, [event(tenant, "2026-10", OCTOBER), event(tenant, "2026-11", NOVEMBER)])
    async with running_aggregator(config) as aggregator:
        report = await verify(config.connection, config.topics, config.group_id, wait_s=30)
        assert report.lag == 0 and report.differences == [] and len(report.unverifiable) == 1
        assert aggregator.stats.events == 2
    assert await used(config) == {(tenant, "2026-10"): 5_100, (tenant, "2026-11"): 3_100}


async def test_replay_since_rebuilds_only_keys_whose_events_all_follow_it(aggregator_config: AggregatorConfig) -> None:
    """``--since T`` never cuts a tenant-period in two: a key with any event before T keeps its
    totals (even wrong ones: replay without --since is the way to rebuild it), a key whose events
    all follow T is rebuilt from all of them."""
    config = aggregator_config
    await ensure_topics(config.connection, config.topics)
    await publish(config, [event("b", "2026-10", OCTOBER + timedelta(days=d)) for d in range(20)]
                  + [event("b", "2026-11", NOVEMBER + timedelta(days=d)) for d in range(10)])
    async with running_aggregator(config):
        await verified(config)
    await corrupt(config, ("b", "2026-10"), 7)
    await corrupt(config, ("b", "2026-11"), 7)
    result = await replay(config, since=OCTOBER + timedelta(days=10))  # in the middle of October
    assert (result.written, result.kept_before_since, result.kept_truncated) == (1, 1, 0)
    assert await used(config) == {("b", "2026-10"): 7, ("b", "2026-11"): 1_000}
    code, out = await tokenguard(config, "replay", "--since", "2026-10-01")
    assert code == 0 and "rebuilt 2 tenant-periods" in out, out
    assert await used(config) == {("b", "2026-10"): 2_000, ("b", "2026-11"): 1_000}
