"""Reading state back from Kafka: the totals changelog, and the recently processed events.

Both read fixed offset ranges with a group-less consumer, so they never disturb the group. Both
survive any record: what cannot be read is skipped, logged and counted, and reading goes on (a
restore that stopped at a bad record would stop the partition for good, on every restart).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.structs import ConsumerRecord

from aggregator.errors import RestoreError
from aggregator.intake import accept, expected_partition
from producer.config import KafkaConnection
from producer.kafka_admin import close_consumer, start_consumer, topic_partitions
from schemas.errors import DecodeError
from schemas.totals import TotalsRecord
from schemas.usage import UsageEvent
from schemas.wire import decode_totals, tenant_period_key
from transport.fetch import Unreadable, getmany_safe

log = logging.getLogger(__name__)

# (first offset, end offset) per partition; end is exclusive. None as the first offset: the
# partition's beginning; None as the end: where the partition ends when reading starts.
Ranges = dict[int, tuple[int | None, int | None]]


async def read_ranges(
    connection: KafkaConnection,
    topic: str,
    ranges: Ranges,
    *,
    timeout_s: float = 120.0,
    on_unreadable: Callable[[Unreadable], None] | None = None,
) -> AsyncIterator[list[ConsumerRecord]]:
    """Yield batches of the records of ``topic`` within ``ranges``.

    A record the Kafka client cannot parse is skipped by offset and handed to ``on_unreadable``
    (it is logged either way)."""
    if not ranges:
        return  # (an aiokafka consumer stopped before any assignment hangs in stop())
    consumer = AIOKafkaConsumer(
        **connection.client_kwargs(),
        client_id="tokenguard-reader",
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=50,
        max_partition_fetch_bytes=8 * 1024 * 1024,
    )
    await start_consumer(consumer)
    try:
        tps = {p: TopicPartition(topic, p) for p in ranges}
        consumer.assign(list(tps.values()))
        beginnings = await consumer.beginning_offsets(list(tps.values()))
        ends = await consumer.end_offsets(list(tps.values()))
        stop_at: dict[TopicPartition, int] = {}
        for partition, (first, end) in ranges.items():
            tp = tps[partition]
            start = max(beginnings[tp], first if first is not None else 0)
            stop = min(ends[tp], end if end is not None else ends[tp])
            if start < stop:
                consumer.seek(tp, start)
                stop_at[tp] = stop
        deadline = time.monotonic() + timeout_s
        while stop_at:
            if time.monotonic() > deadline:
                raise RestoreError(f"reading {topic} did not reach the end of its range within {timeout_s}s")
            batches, unreadable = await getmany_safe(consumer, *stop_at, timeout_ms=200, max_records=50_000)
            for skipped in unreadable:
                if on_unreadable is not None:
                    on_unreadable(skipped)
            for tp, records in batches.items():
                wanted = [r for r in records if r.offset < stop_at[tp]]
                if wanted:
                    yield wanted
            for tp in list(stop_at):
                if await consumer.position(tp) >= stop_at[tp]:
                    del stop_at[tp]
    finally:
        await close_consumer(consumer)


async def end_offsets(connection: KafkaConnection, topic: str) -> dict[int, int]:
    """Per partition, the offset the next record will get."""
    partitions = await topic_partitions(connection, topic)
    consumer = AIOKafkaConsumer(**connection.client_kwargs(), group_id=None, enable_auto_commit=False)
    await start_consumer(consumer)
    try:
        ends = await consumer.end_offsets([TopicPartition(topic, p) for p in partitions])
    finally:
        await close_consumer(consumer)
    return {tp.partition: offset for tp, offset in ends.items()}


def admissible(
    record: ConsumerRecord, totals: TotalsRecord, usage_ends: dict[int, int] | None, partition_count: int | None
) -> str | None:
    """Why a decoded changelog record cannot be state, or None. A record that claims to have
    applied usage beyond its partition's end (forged, or from another cluster) would make every
    later event of its key look like a replay: the tenant frozen for good. So would one on a
    partition other than its tenant's, which the aggregator of that partition would restore."""
    if record.key != tenant_period_key(totals.tenant_id, totals.period_key):
        return "key_mismatch"
    if totals.usage_partition != record.partition:
        return "wrong_partition"
    if partition_count and expected_partition(totals.tenant_id.encode(), partition_count) != record.partition:
        return "wrong_partition"
    if usage_ends is not None and totals.applied_offset >= usage_ends.get(totals.usage_partition, 0):
        return "offset_beyond_end"
    return None


async def read_changelog(
    connection: KafkaConnection,
    topic: str,
    partitions: Iterable[int] | None = None,
    *,
    usage_ends: dict[int, int] | None = None,
    partition_count: int | None = None,
    rejected: Counter[str] | None = None,
) -> dict[tuple[str, str], TotalsRecord]:
    """The state per (tenant, period) in ``partitions`` (all when None).

    Of several records of one key, the one that has applied the furthest wins (the latest on a
    tie: a limit change or a replay rewrites a key at the same offset). Each record is the exact
    sum of its key's events up to its offset, so the furthest one is the most complete, even when a
    member that lost its partitions (a zombie) wrote after the new owner did. Records that cannot be
    state (see ``admissible``; pass ``usage_ends`` to bound offsets and ``partition_count`` to check
    each tenant's partition) are counted in ``rejected``.
    """
    if partitions is None:
        partitions = await topic_partitions(connection, topic)
    rejected = rejected if rejected is not None else Counter()
    latest: dict[tuple[str, str], TotalsRecord] = {}

    def unreadable(skipped: Unreadable) -> None:
        rejected["unreadable"] += 1

    async for records in read_ranges(
        connection, topic, {p: (None, None) for p in partitions}, on_unreadable=unreadable
    ):
        for record in records:
            try:
                totals = decode_totals(record.value)
            except DecodeError as exc:
                if rejected[exc.reason] == 0:
                    log.error("undecodable totals record at %s:%d:%d: %s", topic, record.partition, record.offset, exc)
                rejected[exc.reason] += 1
                continue
            why = admissible(record, totals, usage_ends, partition_count)
            if why is not None:
                if rejected[why] == 0:
                    log.error("ignoring totals record at %s:%d:%d: %s", topic, record.partition, record.offset, why)
                rejected[why] += 1
                continue
            key = (totals.tenant_id, totals.period_key)
            held = latest.get(key)
            if held is None or totals.applied_offset >= held.applied_offset:
                latest[key] = totals
    return latest


async def recent_events(
    connection: KafkaConnection, topic: str, committed: dict[int, int], window: int, partitions: int
) -> dict[int, list[UsageEvent]]:
    """Per partition, the events among the last ``window`` usage records before its committed
    offset that the consume loop accepted (``aggregator.intake.accept``), in order: what its
    dedup window held. Records it dead-lettered are skipped here too, so nothing they claim
    (an id, a tenant) can drop a later event."""
    ranges: Ranges = {p: (max(0, offset - window), offset) for p, offset in committed.items() if offset > 0}
    events: dict[int, list[UsageEvent]] = {p: [] for p in ranges}
    async for records in read_ranges(connection, topic, ranges):
        for record in records:
            try:
                events[record.partition].append(accept(record, partitions))
            except DecodeError:
                continue
    return events
