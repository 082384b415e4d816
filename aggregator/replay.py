"""Rebuild the aggregator's state from the usage topic: the recovery path when the changelog is
lost or known wrong.

With the aggregator group stopped: recompute every tenant-period from the usage topic (the
verifier's code path), write the totals as the new changelog records, each carrying its partition's
end offset, then commit the group's offsets at those ends. The aggregator restarts from there with
the rebuilt state.

What the topic cannot rebuild is left as it is: a key whose first event lies before its usage
partition's log start (retention deleted some of its events: ``verify.truncated``) keeps its
changelog record, since recomputing it from what is left would silently lower a billing total.
With ``since``, only keys all of whose events are at or after that time are rebuilt; a key with
any event before it is kept too. A key whose changelog record is lost and whose events were partly
deleted cannot be recovered by anything: it is rebuilt from what is left, and counted. A sealed
tenant-period is left alone (its final totals are on the sealed topic), and an event that came
after its period sealed is an adjustment, never added back to a changelog total.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from aggregator.changelog import read_changelog, read_sealed
from aggregator.config import AggregatorConfig
from aggregator.errors import AggregatorError
from aggregator.limits import LimitsFeed
from aggregator.state import Limits, Totals, TotalsState, classify, lowest_quota
from aggregator.verify import Recompute, truncated
from schemas.wire import encode_fields, tenant_period_key
from transport.admin import close_consumer, start_consumer, topic_partitions
from transport.reading import offset_bounds, read_ranges


async def group_is_empty(config: AggregatorConfig) -> bool:
    admin = AIOKafkaAdminClient(**config.connection.client_kwargs(), client_id="tokenguard-admin")
    await admin.start()
    try:
        described = await admin.describe_consumer_groups([config.group_id])
    finally:
        await admin.close()
    return all(not group[5] for response in described for group in response.groups)


@dataclass
class ReplayResult:
    written: int = 0  # keys rebuilt from the usage topic
    kept_truncated: int = 0  # keys kept: some of their events are before the log start
    kept_before_since: int = 0  # keys kept: they have events before ``since``
    kept_sealed: int = 0  # keys left alone: sealed (their events after the seal are adjustments)
    lost_and_truncated: int = 0  # written from what is left: no changelog record, partition truncated


async def replay(config: AggregatorConfig, *, since: datetime | None = None) -> ReplayResult:
    """Rebuild what the usage topic can rebuild (see the module docstring). Refuses while the
    group has members."""
    if not await group_is_empty(config):
        raise AggregatorError(f"aggregator group {config.group_id!r} has running members; stop them first")
    layout = config.topics
    limits = Limits(config.default_limit, warning_ratio=config.warning_ratio)
    # The limits and rules the aggregator would judge by: the rebuilt states must be the ones it
    # would hold, and its rule counters the ones it would count.
    feed = LimitsFeed(config, limits, on_change=_ignore_change)
    await feed.start()
    await feed.stop()
    log_starts, ends = await offset_bounds(config.connection, layout.usage)
    held = await read_changelog(config.connection, layout.totals, usage_ends=ends, partition_count=len(ends))
    grace = config.seal_grace_s if config.seal_periods else None
    sealed = (await read_sealed(config.connection, layout.sealed))[0] if grace is not None else {}
    recompute = Recompute(len(ends), limits.rules, grace)
    quota_of: dict[tuple[str, str], int] = {}
    early_keys: set[tuple[str, str]] = set()
    ranges = {p: (None, end) for p, end in ends.items()}
    async for records in read_ranges(config.connection, layout.usage, ranges, on_unreadable=recompute.unreadable):
        for record in records:
            event = recompute.add(record)
            if event is None:
                continue
            if since is not None and event.event_time < since:
                early_keys.update(recompute.keys_of(event))
                recompute.forget(event)
                continue
            key = (event.tenant_id, event.period_key)
            quota_of[key] = lowest_quota(quota_of.get(key), event.quota_tokens)  # as the aggregator keeps it
    now = datetime.now(UTC)
    producer = AIOKafkaProducer(**config.connection.client_kwargs(), acks="all")
    await producer.start()
    result = ReplayResult()
    try:
        futures = []
        for key, figures in recompute.totals().items():
            if key in sealed:  # closed: its final totals are on the sealed topic, not the changelog's
                result.kept_sealed += 1
                continue
            record = held.get(key)
            if record is not None and truncated(record, log_starts):
                result.kept_truncated += 1
                continue
            if key in early_keys:
                result.kept_before_since += 1
                continue
            partition = recompute.partition_of[key]
            if record is None and log_starts.get(partition, 0) > 0:
                result.lost_and_truncated += 1
            quota = quota_of.get(key)
            limit, ratio = limits.rule(key[0], key[1], quota) or (0, 1.0)  # None: a rule since removed
            totals = Totals(partition=partition, used=figures.used, events=figures.events,
                            applied_offset=ends[partition] - 1, limit=limit,
                            state=classify(figures.used, limit, ratio), event_quota=quota)
            value = encode_fields(TotalsState.record_fields(key, totals, now))
            futures.append(await producer.send(layout.totals, value, key=tenant_period_key(*key), partition=partition))
            result.written += 1
        for future in futures:
            await future
    finally:
        await producer.stop()
    await _commit(config, {p: end for p, end in ends.items()})
    return result


async def _ignore_change(tenant_id: str | None) -> None:
    return None


async def _commit(config: AggregatorConfig, offsets: dict[int, int]) -> None:
    partitions = await topic_partitions(config.connection, config.topics.usage)
    consumer = AIOKafkaConsumer(**config.connection.client_kwargs(), group_id=config.group_id, enable_auto_commit=False)
    await start_consumer(consumer)
    try:
        tps = [TopicPartition(config.topics.usage, p) for p in partitions]
        consumer.assign(tps)
        await consumer.commit({tp: offsets.get(tp.partition, 0) for tp in tps})
    finally:
        await close_consumer(consumer)
