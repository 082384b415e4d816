"""getmany_safe on the real broker: a record aiokafka cannot parse is skipped by offset and
reported; every other record is returned once, in order."""

from __future__ import annotations

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from tests.helpers import send_raw, send_with_raw_header_name
from transport.admin import close_consumer, start_consumer
from transport.connection import KafkaConnection
from transport.fetch import getmany_safe

pytestmark = pytest.mark.integration


async def _topic(connection: KafkaConnection, name: str) -> None:
    admin = AIOKafkaAdminClient(**connection.client_kwargs())
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, 1, 1)])
    finally:
        await admin.close()


async def test_unparseable_header_name_is_skipped_and_reported(connection: KafkaConnection, layout) -> None:
    topic = f"{layout.prefix}raw"
    await _topic(connection, topic)
    await send_raw(connection, topic, [(b"k", f"before-{i}".encode()) for i in range(5)])
    await send_with_raw_header_name(connection, topic, b"k", b"poison")
    await send_raw(connection, topic, [(b"k", f"after-{i}".encode()) for i in range(5)])
    await send_with_raw_header_name(connection, topic, b"k", b"poison-last")

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
    from aiokafka import AIOKafkaProducer

    topic = f"{layout.prefix}multi"
    admin = AIOKafkaAdminClient(**connection.client_kwargs())
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, 3, 1)])
    finally:
        await admin.close()
    producer = AIOKafkaProducer(**connection.client_kwargs(), acks="all")
    await producer.start()
    try:
        for partition in range(3):
            await producer.send_and_wait(topic, f"first-{partition}".encode(), partition=partition)
    finally:
        await producer.stop()
    key = next(k for k in (f"k{i}".encode() for i in range(1000)) if _home(k) == bad_partition)
    await send_with_raw_header_name(connection, topic, key, b"poison")
    producer = AIOKafkaProducer(**connection.client_kwargs(), acks="all")
    await producer.start()
    try:
        for partition in range(3):
            for i in range(3):
                await producer.send_and_wait(topic, f"after-{partition}-{i}".encode(), partition=partition)
    finally:
        await producer.stop()

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


def _home(key: bytes) -> int:
    from aggregator.intake import expected_partition

    return expected_partition(key, 3)
