"""Reading fixed offset ranges of a topic with a group-less consumer: restore, verify, replay and
billing all read this way, so they never disturb a consumer group."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Mapping

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.structs import ConsumerRecord

from transport.admin import close_consumer, start_consumer, topic_partitions
from transport.connection import KafkaConnection
from transport.errors import ReadTimeoutError
from transport.fetch import Unreadable, getmany_safe

# (first offset, end offset) per partition; end is exclusive. None as the first offset: the
# partition's beginning; None as the end: where the partition ends when reading starts.
Ranges = Mapping[int, tuple[int | None, int | None]]

# What one fetch may bring and one batch may hold. Small enough that the records in flight stay a
# few MB (a restore's memory is the state's), large enough to keep the broker busy: reading a
# 6-partition changelog of a million ~270-byte records, 512 KB a partition and 4 MB a fetch took
# 2.23 s and raised the peak RSS by 9 MB; 1 MB and 8 MB: 2.25 s, +20 MB; the former 8 MB a
# partition, the client's 50 MB a fetch and 50,000 records a batch: 2.88 s, +158 MB.
PARTITION_FETCH_BYTES = 512 * 1024
FETCH_BYTES = 4 * 1024 * 1024
BATCH_RECORDS = 5_000


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
        max_partition_fetch_bytes=PARTITION_FETCH_BYTES,
        fetch_max_bytes=FETCH_BYTES,
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
                raise ReadTimeoutError(f"reading {topic} did not reach the end of its range within {timeout_s}s")
            batches, unreadable = await getmany_safe(consumer, *stop_at, timeout_ms=200, max_records=BATCH_RECORDS)
            for skipped in unreadable:
                if on_unreadable is not None:
                    on_unreadable(skipped)
            for tp, records in batches.items():
                if records and records[-1].offset < stop_at[tp]:
                    yield records  # (offsets rise within a batch: all of it is in range)
                    continue
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
    return (await offset_bounds(connection, topic))[1]


async def offset_bounds(connection: KafkaConnection, topic: str) -> tuple[dict[int, int], dict[int, int]]:
    """(log starts, ends) per partition: the first offset still stored (it moves past records that
    retention or a DeleteRecords request removed) and the offset the next record will get."""
    partitions = await topic_partitions(connection, topic)
    consumer = AIOKafkaConsumer(**connection.client_kwargs(), group_id=None, enable_auto_commit=False)
    await start_consumer(consumer)
    try:
        tps = [TopicPartition(topic, p) for p in partitions]
        starts = await consumer.beginning_offsets(tps)
        ends = await consumer.end_offsets(tps)
    finally:
        await close_consumer(consumer)
    return {tp.partition: offset for tp, offset in starts.items()}, {tp.partition: offset for tp, offset in ends.items()}
