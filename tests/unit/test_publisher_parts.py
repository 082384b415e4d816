"""The publisher's parts without a broker: the shared partitioner, the spool policy, and the
publisher's loop over a fake aiokafka producer (flush on acknowledgement, a full spool)."""

from __future__ import annotations

import asyncio
import itertools
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka.errors import KafkaError
from aiokafka.partitioner import DefaultPartitioner
from hypothesis import given, settings
from hypothesis import strategies as st

import producer.publisher as publisher_module
from producer.config import ProducerConfig
from producer.publisher import PublisherStats, UsagePublisher
from producer.spool import SEGMENT_BYTES, Spool
from producer.spool_policy import NoSpool, SpoolPolicy
from schemas.topics import TopicLayout
from schemas.usage import UsageEvent
from schemas.wire import UsageDraft, UsageLike, usage_key
from transport.partitioning import TenantPartitioner, partition_for

_ids = itertools.count()


def event(tenant: str = "acme", tokens: int = 10) -> UsageEvent:
    return UsageEvent(
        event_id=f"parts{next(_ids):012d}", tenant_id=tenant, period_key="2026-04", total_tokens=tokens,
        quota_tokens=10**9, event_time=datetime(2026, 4, 14, tzinfo=UTC), instance_id="test",
    )


def big_draft(size: int) -> UsageDraft:
    """An unvalidated draft of about ``size`` bytes encoded (the store never builds one this big)."""
    return UsageDraft(
        event_id=f"parts{next(_ids):012d}", tenant_id="acme", period_key="2026-04", model=None,
        input_tokens=None, output_tokens=None, total_tokens=1, cache_creation_input_tokens=None,
        cache_read_input_tokens=None, reasoning_output_tokens=None, quota_tokens=10**9,
        event_time=datetime(2026, 4, 14, tzinfo=UTC), streaming=False, estimated=False, instance_id="test",
        attributes={"pad": "x" * size}, trace_id=None, span_id=None,
    )


# --- the partitioner: one function, Kafka's -----------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(tenant=st.text(min_size=1, max_size=40), partitions=st.integers(1, 64))
def test_partition_for_is_kafkas_default_partitioner(tenant: str, partitions: int) -> None:
    key = usage_key(tenant)
    kafka = DefaultPartitioner()(key, list(range(partitions)), list(range(partitions)))
    assert partition_for(key, partitions) == kafka
    assert TenantPartitioner(partitions).partition(tenant) == kafka


def test_the_aggregator_judges_routing_with_the_same_function() -> None:
    from aggregator.intake import expected_partition

    assert expected_partition is partition_for


def test_a_partitioner_without_a_partition_count_has_no_answer() -> None:
    with pytest.raises(ZeroDivisionError):
        TenantPartitioner().partition("acme")


# --- the spool policy ---------------------------------------------------------------------------


class Sender:
    """A ``send`` for ``SpoolPolicy.deliver``: records what it was given, fails while ``down``."""

    def __init__(self) -> None:
        self.down = False
        self.sent: list[tuple[list[str], set[str]]] = []

    async def __call__(self, events: list[UsageLike], own: set[str]) -> list[UsageLike]:
        if self.down:
            return events
        self.sent.append(([e.event_id for e in events], set(own)))
        return []


async def test_spilled_events_are_delivered_in_order_and_reported_as_our_own(tmp_path: Path) -> None:
    stats = PublisherStats()
    policy = SpoolPolicy(Spool(tmp_path, SEGMENT_BYTES), "block", stats)
    policy.open()
    events = [event(tokens=i) for i in range(5)]
    assert policy.spill(events) == []
    assert (policy.pending, stats.spooled) == (5, 5)
    send = Sender()
    send.down = True
    assert not await policy.deliver(send, batch_max=3), "not acknowledged: stays spooled"
    assert policy.pending == 5
    send.down = False
    assert await policy.deliver(send, batch_max=3)
    assert await policy.deliver(send, batch_max=3)
    assert [ids for ids, _ in send.sent] == [[e.event_id for e in events[:3]], [e.event_id for e in events[3:]]]
    assert all(set(ids) <= own for ids, own in send.sent)
    assert policy.pending == 0
    policy.close()


async def test_a_full_spool_refuses_under_block_and_clears_once_delivery_makes_room(tmp_path: Path) -> None:
    stats = PublisherStats()
    spool = Spool(tmp_path, SEGMENT_BYTES // 4)
    policy = SpoolPolicy(spool, "block", stats)
    policy.open()
    batch = [big_draft(100_000) for _ in range(2)]
    while not policy.spill(batch):
        pass
    assert policy.full and stats.spool_refused == 2
    assert policy.spill(batch) == batch, "refused again, nothing written"
    send = Sender()
    while spool.size_bytes >= spool.max_bytes // 2:
        assert not policy.full or spool.size_bytes >= spool.max_bytes // 2
        await policy.deliver(send, batch_max=1)
    assert not policy.full
    policy.close()


def test_drop_oldest_makes_room_and_counts_the_loss(tmp_path: Path) -> None:
    stats = PublisherStats()
    policy = SpoolPolicy(Spool(tmp_path, SEGMENT_BYTES // 4), "drop_oldest", stats)
    policy.open()
    written = 0
    while stats.spool_dropped == 0:
        assert policy.spill([big_draft(100_000)]) == []
        written += 1
    assert not policy.full
    assert policy.pending + stats.spool_dropped == written
    policy.close()


def test_without_a_spool_every_spill_is_refused() -> None:
    events: list[UsageLike] = [event()]
    assert NoSpool().spill(events) == events
    assert NoSpool.pending == 0 and not NoSpool.full


# --- the publisher over a fake producer ---------------------------------------------------------


class FakeProducer:
    """Just what the publisher uses of ``AIOKafkaProducer``. Sends fail while ``down``; while
    ``hold`` is set, acknowledgements wait until it is cleared."""

    def __init__(self) -> None:
        self.down = False
        self.hold: asyncio.Event | None = None
        self.next_offset: dict[int, int] = defaultdict(int)
        self.sent: list[tuple[int, list[bytes]]] = []
        self.client = SimpleNamespace(close=self._noop)

    async def _noop(self) -> None:
        pass

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def partitions_for(self, topic: str) -> set[int]:
        return {0, 1, 2}

    def create_batch(self) -> Any:
        records: list[bytes] = []

        def append(*, key: bytes, value: bytes, timestamp: None, headers: list[tuple[str, bytes]]) -> object:
            records.append(key)
            return object()

        return SimpleNamespace(append=append, close=lambda: None, records=records)

    async def send_batch(self, batch: Any, topic: str, *, partition: int) -> asyncio.Future[object]:
        if self.down:
            raise KafkaError("broker away")
        base = self.next_offset[partition]
        self.next_offset[partition] += len(batch.records)
        self.sent.append((partition, list(batch.records)))
        future: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        hold = self.hold

        async def acknowledge() -> None:
            if hold is not None:
                await hold.wait()
            future.set_result(SimpleNamespace(offset=base))

        task = asyncio.ensure_future(acknowledge())
        future.add_done_callback(lambda _: task.cancel() if not task.done() else None)
        return future


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeProducer:
    producer = FakeProducer()
    monkeypatch.setattr(publisher_module, "new_producer", lambda config: producer)
    return producer


def config(spool_dir: Path | None, **overrides: Any) -> ProducerConfig:
    return ProducerConfig(
        topics=TopicLayout(prefix="parts."), instance_id="test", spool_dir=spool_dir, linger_ms=0,
        send_timeout_s=1.0, stop_timeout_s=1.0, create_topics=False, **overrides,
    )


async def test_flush_returns_on_acknowledgement_and_times_out_without_it(fake: FakeProducer) -> None:
    delivered: list[tuple[str, int, int]] = []
    publisher = UsagePublisher(config(None), on_delivered=lambda e, p, o: delivered.append((e.tenant_id, p, o)))
    async with publisher:
        for tenant in ("acme", "globex", "acme"):
            publisher.publish(event(tenant))
        await publisher.flush(timeout=5)
        assert publisher.stats.delivered == 3
        assert [(t, p) for t, p, _ in delivered] == [(t, publisher.partition_of(t)) for t in ("acme", "acme", "globex")]
        assert [o for t, _, o in delivered if t == "acme"] == [0, 1]

        fake.hold = asyncio.Event()
        publisher.publish(event())
        with pytest.raises(TimeoutError, match="1 usage events not delivered"):
            await publisher.flush(timeout=0.2)
        flushing = asyncio.ensure_future(publisher.flush(timeout=5))
        await asyncio.sleep(0.05)
        assert not flushing.done()
        fake.hold.set()
        await asyncio.wait_for(flushing, 1.0)  # woken by the acknowledgement
        assert publisher.stats.delivered == 4


async def test_events_a_full_spool_refuses_are_kept_in_memory_once(fake: FakeProducer, tmp_path: Path) -> None:
    fake.down = True
    publisher = UsagePublisher(config(tmp_path, spool_max_bytes=SEGMENT_BYTES // 4))
    await publisher.start()
    events = [big_draft(150_000) for _ in range(8)]  # 1.2 MB: more than the whole spool
    for draft in events:
        publisher.publish(draft)
    deadline = asyncio.get_running_loop().time() + 10
    while publisher.stats.spool_refused < len(events):
        assert asyncio.get_running_loop().time() < deadline, "the spool never refused the batch"
        await asyncio.sleep(0.01)
    assert publisher.spool_full
    await publisher.stop(timeout=0.5)
    assert publisher.queue_depth == len(events), "refused events stay in memory, each once"
    assert publisher.spool_pending == 0
