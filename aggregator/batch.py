"""One batch: poll it, then apply it record by record, in offset order, to the partitions this
process owns. What a record must be to count is ``intake``'s; what happens to one that cannot
count is ``deadletter``'s; what becomes durable and when is ``checkpoint``'s.

The rebalance rule lives here: a record is applied only if its partition is in ``owned`` (assigned
and restored) and its offset is at or after ``next[tp]`` (the position recovery sought to, then the
offset after the last record applied). Anything else in a batch is dropped: its partition was
revoked, or not yet restored, and the next owner (or the restore) reads it again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.structs import ConsumerRecord

from aggregator.checkpoint import Checkpoint
from aggregator.config import AggregatorConfig
from aggregator.deadletter import dead_letter
from aggregator.intake import accept
from aggregator.state import Outcome, TotalsState
from aggregator.stats import AggregatorStats
from schemas.errors import DecodeError
from transport.fetch import Unreadable, getmany_safe

log = logging.getLogger(__name__)

Poll = tuple[dict[TopicPartition, list[ConsumerRecord]], list[Unreadable]]


class BatchApplier:
    """Applies polled records to ``state``; shares ``owned`` and ``next`` with the service, which
    changes them on rebalance and restore."""

    def __init__(
        self,
        config: AggregatorConfig,
        state: TotalsState,
        stats: AggregatorStats,
        checkpoint: Checkpoint,
        *,
        partitions: int,
        owned: set[int],
        next_offsets: dict[TopicPartition, int],
    ) -> None:
        self.config = config
        self.state = state
        self.stats = stats
        self._checkpoint = checkpoint
        self._partitions = partitions
        self._owned = owned
        self._next = next_offsets

    async def poll(self, consumer: AIOKafkaConsumer, stopping: Callable[[], bool]) -> list[Poll]:
        """One batch: polls until ``batch_max`` records or ``batch_window_ms`` after the first one.

        Each poll is bounded: aiokafka's getmany() ignores its timeout while the group has no
        assignment, which would otherwise keep stop() waiting through a stuck rebalance."""
        window_s = self.config.batch_window_ms / 1000
        polls: list[Poll] = []
        count = 0
        closes_at = None
        while count < self.config.batch_max and not stopping():
            remaining = window_s if closes_at is None else closes_at - time.monotonic()
            if remaining <= 0:
                break
            try:
                more, unreadable = await getmany_safe(
                    consumer,
                    timeout_ms=max(1, int(remaining * 1000)),
                    max_records=self.config.batch_max - count,
                    bound_s=remaining + 1.0,
                )
            except TimeoutError:
                break
            if not more and not unreadable:
                break
            polls.append((more, unreadable))
            count += sum(len(records) for records in more.values()) + len(unreadable)
            if closes_at is None:
                closes_at = time.monotonic() + window_s
        return polls

    async def apply(self, batches: dict[TopicPartition, list[ConsumerRecord]], unreadable: list[Unreadable]) -> None:
        """Apply one poll's records of owned partitions, in offset order; drop the rest (see the
        module docstring). Records the client could not parse are dead-lettered in their place."""
        checkpoint = self._checkpoint
        skipped_in: dict[TopicPartition, list[Unreadable]] = {}
        for skipped in unreadable:
            skipped_in.setdefault(TopicPartition(skipped.topic, skipped.partition), []).append(skipped)
        for tp in batches.keys() | skipped_in.keys():
            if tp.partition not in self._owned:
                continue
            expected = self._next.get(tp, 0)
            records = [record for record in batches.get(tp, []) if record.offset >= expected]
            bad = sorted((s for s in skipped_in.get(tp, []) if s.offset >= expected), key=lambda s: s.offset)
            if not records and not bad:
                continue
            start = 0
            for skipped in bad:
                end = start
                while end < len(records) and records[end].offset < skipped.offset:
                    end += 1
                if end > start:
                    await self._apply_records(tp, records[start:end])
                start = end
                self.stats.unreadable_records += 1
                await self._dead_letter_unreadable(skipped)
                self.state.mark_position(tp.partition, skipped.offset)
            if start < len(records):
                await self._apply_records(tp, records[start:])
            last = max(records[-1].offset if records else -1, bad[-1].offset if bad else -1)
            self._next[tp] = last + 1
            checkpoint.advance(tp, last + 1)

    async def _apply_records(self, tp: TopicPartition, records: list[ConsumerRecord]) -> None:
        state, stats, partitions, partition = self.state, self.stats, self._partitions, tp.partition
        apply, applied_outcome = state.apply, Outcome.APPLIED
        applied = 0
        for record in records:
            try:
                event = accept(record, partitions)
            except DecodeError as exc:
                await self._dead_letter(record, exc.reason, exc.detail)
                state.mark_position(partition, record.offset)
                continue
            outcome = apply(partition, record.offset, event, record.timestamp / 1000)
            if outcome is applied_outcome:
                applied += 1
            elif outcome is Outcome.ADJUSTMENT:
                applied += 1
                stats.adjustments += 1
            elif outcome is Outcome.REPLAY:
                stats.replays_skipped += 1
            elif outcome is Outcome.DUPLICATE:
                stats.duplicates_dropped += 1
            else:
                stats.id_conflicts += 1
                await self._dead_letter(
                    record, "id_conflict", f"event {event.event_id!r} of this tenant was seen with other content"
                )
        stats.events += applied

    async def _dead_letter(self, record: ConsumerRecord, reason: str, detail: str) -> None:
        """Keep the original key, bytes and headers; say why in headers. Never stops the aggregator."""
        letter = dead_letter(
            key=record.key, value=record.value, headers=record.headers, reason=reason, detail=detail,
            topic=record.topic, partition=record.partition, offset=record.offset,
            aggregator_id=self.config.aggregator_id,
        )
        await self._checkpoint.dead_letter(letter)
        self.stats.dead_letters += 1
        log.warning("dead-lettered usage record %s:%d:%d: %s", record.topic, record.partition, record.offset, reason)

    async def _dead_letter_unreadable(self, skipped: Unreadable) -> None:
        """A record the Kafka client cannot parse: its bytes are not to be had through this client,
        so the dead letter names where it is, for an operator to read with another tool."""
        # An empty value, not None: Kafka needs a key or a value, and this record has neither here.
        letter = dead_letter(
            key=None, value=b"", headers=[], reason="unreadable_record", detail=skipped.error,
            topic=skipped.topic, partition=skipped.partition, offset=skipped.offset,
            aggregator_id=self.config.aggregator_id,
        )
        await self._checkpoint.dead_letter(letter)
        self.stats.dead_letters += 1
