"""Encoding off the call path: the bytes the store's journal wrote are the bytes sent (encoded
once), and the publisher encodes queued events while a batch is on its way without changing what
is sent or in which order."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

import producer.publisher as publisher_module
from producer.encoding import encode_event
from producer.publisher import UsagePublisher
from tests.unit.test_publisher_parts import FakeProducer, big_draft, config


class ValueProducer(FakeProducer):
    """Records each appended value with its key, in batch order."""

    def __init__(self) -> None:
        super().__init__()
        self.values: list[bytes] = []

    def create_batch(self) -> Any:
        batch = super().create_batch()
        keep = batch.append

        def append(*, key: bytes, value: bytes, timestamp: None, headers: list[tuple[str, bytes]]) -> object:
            self.values.append(value)
            return keep(key=key, value=value, timestamp=timestamp, headers=headers)

        batch.append = append
        return batch


def spooled_lines(root: Path) -> list[bytes]:
    return [line for segment in sorted(root.glob("*/*.jsonl")) for line in segment.read_bytes().split(b"\n") if line]


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> ValueProducer:
    producer = ValueProducer()
    monkeypatch.setattr(publisher_module, "new_producer", lambda config: producer)
    return producer


async def test_the_bytes_given_with_an_event_are_the_bytes_sent(fake: ValueProducer) -> None:
    events = [big_draft(10) for _ in range(3)]
    async with UsagePublisher(config(None)) as publisher:
        marked = b'{"given":1}'
        publisher.publish(events[0], marked)
        publisher.publish(events[1])
        publisher.publish(events[2], encode_event(events[2]))
        await publisher.flush(timeout=5)
        assert fake.values == [marked, encode_event(events[1]), encode_event(events[2])]
        assert publisher._wire == {}, "each given value is taken out when sent"


async def test_events_queued_behind_a_batch_in_flight_are_encoded_meanwhile_and_sent_in_order(fake: ValueProducer) -> None:
    fake.hold = asyncio.Event()
    async with UsagePublisher(config(None, batch_max=4)) as publisher:
        first = [big_draft(10) for _ in range(4)]
        behind = [big_draft(10) for _ in range(6)]
        for event in first + behind:
            publisher.publish(event)
        async with asyncio.timeout(5):
            while not fake.sent:
                await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)  # the sender is waiting for the first batch's acknowledgement
        assert len(fake.sent) == 1, "one batch in flight at a time"
        assert set(publisher._wire) == {event.event_id for event in behind[:4]}, "the next batch's events, encoded"
        assert publisher.queue_depth == 6, "still queued: nothing else changed"
        fake.hold.set()
        await publisher.flush(timeout=5)
    assert fake.values == [encode_event(event) for event in first + behind]
    assert sum(len(records) for _, records in fake.sent) == 10, "each event sent once"


async def test_spilled_events_take_their_given_bytes_to_the_spool(fake: ValueProducer, tmp_path: Path) -> None:
    fake.down = True
    publisher = UsagePublisher(config(tmp_path))
    await publisher.start()
    events = [big_draft(10) for _ in range(3)]
    for event in events:
        publisher.publish(event, encode_event(event))
    async with asyncio.timeout(5):
        while publisher.spool_pending < len(events):
            await asyncio.sleep(0.01)
    assert publisher._wire == {}, "spooled: their entries are taken out, not kept for ever"
    await publisher.stop(timeout=0.5)
    assert spooled_lines(tmp_path) == [encode_event(event) for event in events]


async def test_the_cache_of_given_bytes_is_bounded(fake: ValueProducer) -> None:
    fake.down = True  # nothing is ever sent, and there is no spool: every event stays queued
    async with UsagePublisher(config(None, batch_max=5)) as publisher:
        for event in (big_draft(10) for _ in range(50)):
            publisher.publish(event, encode_event(event))
            assert len(publisher._wire) <= 10
