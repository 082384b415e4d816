"""Reading state back from Kafka: the totals changelog, and the ids of recently processed events.

Both read fixed offset ranges with a group-less consumer, so they never disturb the group.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Iterable

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.structs import ConsumerRecord

from aggregator.errors import RestoreError
from producer.config import KafkaConnection
from producer.kafka_admin import close_consumer, start_consumer, topic_partitions
from schemas.errors import DecodeError
from schemas.totals import TotalsRecord
from schemas.wire import decode_totals, event_id_of

log = logging.getLogger(__name__)

# (first offset, end offset) per partition; end is exclusive. None as the first offset: the
# partition's beginning; None as the end: where the partition ends when reading starts.
Ranges = dict[int, tuple[int | None, int | None]]


async def read_ranges(
    connection: KafkaConnection, topic: str, ranges: Ranges, *, timeout_s: float = 120.0
) -> AsyncIterator[list[ConsumerRecord]]:
    """Yield batches of the records of ``topic`` within ``ranges``."""
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
            batches = await consumer.getmany(*stop_at, timeout_ms=200, max_records=50_000)
            for tp, records in batches.items():
                wanted = [r for r in records if r.offset < stop_at[tp]]
                if wanted:
                    yield wanted
            for tp in list(stop_at):
                if await consumer.position(tp) >= stop_at[tp]:
                    del stop_at[tp]
    finally:
        await close_consumer(consumer)


async def read_changelog(
    connection: KafkaConnection, topic: str, partitions: Iterable[int] | None = None
) -> dict[tuple[str, str], TotalsRecord]:
    """The latest totals record per (tenant, period) in ``partitions`` (all when None)."""
    if partitions is None:
        partitions = await topic_partitions(connection, topic)
    latest: dict[tuple[str, str], TotalsRecord] = {}
    async for records in read_ranges(connection, topic, {p: (None, None) for p in partitions}):
        for record in records:
            try:
                totals = decode_totals(record.value)
            except DecodeError as exc:
                log.error("undecodable totals record at %s:%d: %s", topic, record.offset, exc)
                continue
            latest[(totals.tenant_id, totals.period_key)] = totals
    return latest


async def recent_event_ids(
    connection: KafkaConnection, topic: str, committed: dict[int, int], window: int
) -> dict[int, list[str]]:
    """Per partition, the ids of the last ``window`` usage records before its committed offset."""
    ranges: Ranges = {p: (max(0, offset - window), offset) for p, offset in committed.items() if offset > 0}
    ids: dict[int, list[str]] = {p: [] for p in ranges}
    async for records in read_ranges(connection, topic, ranges):
        for record in records:
            event_id = event_id_of(record.headers, record.value)
            if event_id is not None:
                ids[record.partition].append(event_id)
    return ids
