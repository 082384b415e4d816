"""The checkpoint: how one batch's effect becomes durable, in an order that keeps totals exact.

1. The batch is applied to the in-memory totals (by the service; records a key has already applied
   and duplicates are skipped there).
2. The changed totals go to the changelog (to the usage record's own partition number: the two
   topics are co-partitioned), the notices to the notices topic, dead letters to theirs.
3. Every one of those sends is awaited until the broker has acknowledged it.
4. Only then are the consumer offsets committed.

A crash anywhere leaves the committed offsets at or behind the changelog, never ahead: on restart
each record is either applied again (its effect was lost) or skipped (the changelog has it).

The invariant the service keeps for step 4: ``offsets[tp]`` is only ever the offset after a record
of ``tp`` that was applied (or dead-lettered) by this process while it owned ``tp``, having applied
every record of ``tp`` from the restored position up to it, in order. It is set only by
``advance`` and dropped for partitions that are revoked; so the group never commits past a record
that was not applied exactly once.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError

from aggregator.deadletter import DeadLetter
from aggregator.state import Totals, TotalsState
from schemas.notices import QuotaNotice
from schemas.sealed import Adjustment, SealedTotals, adjustment_key, sealed_key, utc
from schemas.topics import TopicLayout
from schemas.wire import encode, encode_fields, tenant_period_key

log = logging.getLogger(__name__)


class Checkpoint:
    """Collects a batch's pending sends and offsets; ``commit()`` runs steps 2 to 4."""

    def __init__(self, producer: AIOKafkaProducer, consumer: AIOKafkaConsumer, topics: TopicLayout, aggregator_id: str) -> None:
        self._producer = producer
        self._consumer = consumer
        self._topics = topics
        self._aggregator_id = aggregator_id
        self.offsets: dict[TopicPartition, int] = {}
        self._pending: list[asyncio.Future[object]] = []
        self.notices = 0
        self.commit_failures = 0

    def advance(self, tp: TopicPartition, next_offset: int) -> None:
        """Every record of ``tp`` before ``next_offset`` is applied or dead-lettered."""
        if next_offset > self.offsets.get(tp, -1):
            self.offsets[tp] = next_offset

    def forget(self, tps: set[TopicPartition]) -> None:
        """Partitions revoked: whatever was not committed for them is the next owner's to redo."""
        for tp in tps:
            self.offsets.pop(tp, None)

    async def dead_letter(self, letter: DeadLetter) -> None:
        future = await self._producer.send(
            self._topics.dead_letters, value=letter.value, key=letter.key, headers=letter.headers
        )
        self._pending.append(future)

    async def commit(self, state: TotalsState, now: datetime) -> None:
        dirty, notify = state.take_changes()
        clears = state.take_clears()
        expired = state.take_expired()
        sealed = state.take_sealed()
        adjustments = state.take_adjustments()
        if not (dirty or notify or clears or expired or sealed or adjustments or self.offsets or self._pending):
            return
        producer, topics = self._producer, self._topics
        futures, self._pending = self._pending, []
        # 2.
        # Notices first: every instance waits on them, nothing waits on the changelog until the
        # commit below, which awaits both alike.
        for key, totals, reason in notify:
            # The notice covers every record of its partition up to the position, not only up to
            # this key's last event: a later notice always outranks an earlier one in a snapshot.
            notice = QuotaNotice.model_construct(
                type="notice",
                tenant_id=key[0],
                period_key=key[1],
                state=totals.state,
                used_tokens=totals.used,
                limit_tokens=totals.limit,
                usage_partition=totals.partition,
                usage_offset=max(totals.applied_offset, state.partition_offsets.get(totals.partition, -1)),
                reason=reason,
                aggregator_id=self._aggregator_id,
                emitted_at=now,
            )
            futures.append(await producer.send(topics.notices, encode(notice), key=tenant_period_key(*key)))
        for key in [*clears, *(key for key, _ in expired), *(key for key, _, _ in sealed)]:
            futures.append(await producer.send(topics.notices, None, key=tenant_period_key(*key)))
        by_partition: dict[int, list[tuple[bytes, bytes | None]]] = {}
        for key, totals in dirty:
            value = encode_fields(state.record_fields(key, totals, now))
            by_partition.setdefault(totals.partition, []).append((tenant_period_key(*key), value))
        for key, partition in [*expired, *((key, totals.partition) for key, totals, _ in sealed)]:
            by_partition.setdefault(partition, []).append((tenant_period_key(*key), None))
        for partition, records in by_partition.items():
            futures.extend(await self._send_records(topics.totals, partition, records))
        # A sealed key's final totals go out in the same batch as its changelog tombstone, all
        # before the commit: after a crash it is restored from the changelog and sealed again.
        closed: dict[int, list[tuple[bytes, bytes | None]]] = {}
        for key, totals, when in sealed:
            closed.setdefault(totals.partition, []).append((sealed_key(*key), encode(self._sealed_record(key, totals, when, now))))
        for partition, offset, event, appended_at in adjustments:
            record = Adjustment.model_construct(
                type="adjustment", tenant_id=event.tenant_id, period_key=event.period_key, event_id=event.event_id,
                total_tokens=event.total_tokens, usage_partition=partition, usage_offset=offset,
                event_time=event.event_time, appended_at=utc(appended_at), aggregator_id=self._aggregator_id,
                recorded_at=now,
            )
            closed.setdefault(partition, []).append(
                (adjustment_key(event.tenant_id, event.period_key, event.event_id), encode(record)))
        for partition, records in closed.items():
            futures.extend(await self._send_records(topics.sealed, partition, records))
        # 3. A failed send raises here, before the commit: the process dies and restores, crash-only.
        await asyncio.gather(*futures)
        self.notices += len(notify)
        # 4. If the group rebalanced meanwhile the commit fails; that is safe, since the changelog
        # already holds these records' effect and the next owner skips them.
        if self.offsets:
            offsets, self.offsets = self.offsets, {}
            try:
                await self._consumer.commit(offsets)
            except (CommitFailedError, IllegalStateError) as exc:
                self.commit_failures += 1
                log.warning("offset commit skipped after a rebalance: %s", exc)

    def _sealed_record(self, key: tuple[str, str], totals: Totals, when: float, now: datetime) -> SealedTotals:
        return SealedTotals.model_construct(
            type="sealed", tenant_id=key[0], period_key=key[1], used_tokens=totals.used, event_count=totals.events,
            usage_partition=totals.partition, applied_offset=totals.applied_offset, first_offset=totals.first_offset,
            seal_time=utc(when), aggregator_id=self._aggregator_id, sealed_at=now,
        )

    async def _send_records(self, topic: str, partition: int, records: list[tuple[bytes, bytes | None]]) -> list[asyncio.Future[object]]:
        """One aiokafka batch per partition rather than one ``send()`` per key."""
        producer = self._producer
        futures = []
        batch = producer.create_batch()
        for key, value in records:
            if batch.append(key=key, value=value, timestamp=None) is None:
                futures.append(await producer.send_batch(batch, topic, partition=partition))
                batch = producer.create_batch()
                batch.append(key=key, value=value, timestamp=None)
        if batch.record_count():
            futures.append(await producer.send_batch(batch, topic, partition=partition))
        return futures
