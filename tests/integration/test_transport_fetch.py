"""getmany_safe on the real broker: a record aiokafka cannot parse is skipped by offset and
reported; every other record is returned once, in order."""

from __future__ import annotations

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from tests.helpers import RawRecord, create_topic, partition_of, send_raw, send_raw_header_record, send_records
from transport.admin import close_consumer, start_consumer
from transport.connection import KafkaConnection
from transport.fetch import getmany_safe

pytestmark = pytest.mark.integration


async def test_unparseable_header_name_is_skipped_and_reported(connection: KafkaConnection, layout) -> None:
    topic = f"{layout.prefix}raw"
    await create_topic(connection, topic)
    await send_raw(connection, topic, [(b"k", f"before-{i}".encode()) for i in range(5)])
    await send_raw_header_record(connection, topic, b"k", b"poison")
    await send_raw(connection, topic, [(b"k", f"after-{i}".encode()) for i in range(5)])
    await send_raw_header_record(connection, topic, b"k", b"poison-last")

    plain = AIOKafkaConsumer(**connection.client_kwargs(), group_id=None, auto_offset_reset="earliest")
    await start_consumer(plain)
    try:
        tp = TopicPartition(topic, 0)
        plain.assign([tp])
        with pytest.raises(UnicodeDecodeError):  # the failure this module exists for
            for _ in range(50):
                await plain.getmany(tp, timeout_ms=500)
    finally:
        await close_consumer(plain)

    consumer = AIOKafkaConsumer(**connection.client_kwargs(), group_id=None, auto_offset_reset="earliest")
    await start_consumer(consumer)
    try:
        consumer.assign([tp])
        values, skipped = [], []
        for _ in range(100):
            records, unreadable = await getmany_safe(consumer, timeout_ms=200)
            values += [r.value for r in records.get(tp, [])]
            skipped += unreadable
            if len(values) >= 10 and len(skipped) >= 2:
                break
    finally:
        await close_consumer(consumer)
    assert values == [f"before-{i}".encode() for i in range(5)] + [f"after-{i}".encode() for i in range(5)]
    assert [(u.partition, u.offset) for u in skipped] == [(0, 5), (0, 11)]
    assert "UnicodeDecodeError" in skipped[0].error


@pytest.mark.parametrize("bad_partition", [0, 1, 2])
async def test_records_of_other_partitions_fetched_with_the_bad_one_are_not_lost(
    connection: KafkaConnection, layout, bad_partition: int
) -> None:
    """aiokafka drains partition after partition into one result; when one raises, the others'
    records were already consumed. Wherever the bad record sits, nothing else may be lost."""
    topic = f"{layout.prefix}multi"
    await create_topic(connection, topic, partitions=3)
    await send_records(connection, topic, [RawRecord(None, f"first-{p}".encode(), partition=p) for p in range(3)])
    key = next(k for k in (f"k{i}".encode() for i in range(1000)) if partition_of(k, 3) == bad_partition)
    await send_raw_header_record(connection, topic, key, b"poison")
    await send_records(
        connection, topic, [RawRecord(None, f"after-{p}-{i}".encode(), partition=p) for p in range(3) for i in range(3)]
    )

    consumer = AIOKafkaConsumer(**connection.client_kwargs(), group_id=None, auto_offset_reset="earliest")
    await start_consumer(consumer)
    try:
        consumer.assign([TopicPartition(topic, p) for p in range(3)])
        values: list[bytes] = []
        skipped = []
        for _ in range(100):
            records, unreadable = await getmany_safe(consumer, timeout_ms=200)
            values += [r.value for batch in records.values() for r in batch]
            skipped += unreadable
            if len(values) >= 12 and skipped:
                break
    finally:
        await close_consumer(consumer)
    expected = [f"first-{p}".encode() for p in range(3)] + [f"after-{p}-{i}".encode() for p in range(3) for i in range(3)]
    assert sorted(values) == sorted(expected)
    assert [(u.partition, u.offset) for u in skipped] == [(bad_partition, 1)]

