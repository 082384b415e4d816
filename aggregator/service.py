"""The aggregator service: consume usage in a group, keep exact totals, publish notices.

Per batch the order is fixed, and it is what keeps totals exact across crashes:

1. apply the batch to the in-memory totals (skipping records a key has already applied, and
   duplicates of events already seen);
2. produce the changed totals to the changelog, the notices, and any dead letters;
3. wait until the broker has acknowledged all of them;
4. only then commit the consumer offsets.

A crash anywhere leaves the committed offsets at or behind the changelog, never ahead of it, so
on restart every record is either re-applied (its effect was lost) or skipped (the changelog has it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError
from aiokafka.structs import ConsumerRecord

from aggregator.changelog import read_changelog, recent_event_ids
from aggregator.config import AggregatorConfig
from aggregator.limits import LimitsFeed
from aggregator.state import Limits, Outcome, TotalsState
from producer.kafka_admin import (
    TopicMismatchError,
    close_consumer,
    committed_offsets,
    ensure_topics,
    start_consumer,
    topic_partitions,
)
from schemas.errors import DecodeError
from schemas.notices import Heartbeat, QuotaNotice
from schemas.wire import decode_usage_record, encode, encode_fields, heartbeat_key, tenant_period_key

if TYPE_CHECKING:
    from aggregator.metrics import MetricsServer

log = logging.getLogger(__name__)


@dataclass
class AggregatorStats:
    events: int = 0
    replays_skipped: int = 0
    duplicates_dropped: int = 0
    dead_letters: int = 0
    notices: int = 0
    heartbeats: int = 0
    flushes: int = 0
    commit_failures: int = 0
    restored_keys: int = 0
    last_restore_s: float = 0.0


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, service: AggregatorService, consumer: AIOKafkaConsumer) -> None:
        self._service = service
        self._consumer = consumer

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._service._on_revoked(revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        await self._service._on_assigned(assigned, self._consumer)


class AggregatorService:
    """One aggregator process's worth of the group. ``start()``/``stop()`` or ``async with``."""

    def __init__(self, config: AggregatorConfig) -> None:
        self.config = config
        self.limits = Limits(config.default_limit, warning_ratio=config.warning_ratio)
        self.state = TotalsState(self.limits, dedup_window=config.dedup_window)
        self.stats = AggregatorStats()
        self.assigned = asyncio.Event()
        self._limits_feed = LimitsFeed(config, self.limits, on_change=self._limit_changed)
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._owned: set[int] = set()
        self._to_restore: set[TopicPartition] = set()
        self._offsets: dict[TopicPartition, int] = {}
        self._unacked: list[asyncio.Future[object]] = []
        self._stopping = False
        self._next_heartbeat = 0.0
        self.metrics: MetricsServer | None = None

    @property
    def owned_partitions(self) -> frozenset[int]:
        return frozenset(self._owned)

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def lag(self) -> dict[int, int]:
        """Per owned partition: records the broker holds beyond what this process has applied."""
        consumer = self._consumer
        if consumer is None:
            return {}
        lag = {}
        for tp in consumer.assignment():
            highwater = consumer.highwater(tp)
            if highwater is not None and tp.partition in self._owned:
                lag[tp.partition] = max(0, highwater - 1 - self.state.partition_offsets.get(tp.partition, -1))
        return lag

    def blocked_count(self) -> int:
        return sum(1 for totals in self.state.totals.values() if totals.state == "exceeded")

    async def start(self) -> None:
        if self._task is not None:
            return
        config = self.config
        if config.create_topics:
            partitions = await ensure_topics(config.connection, config.topics)
        else:
            partitions = {
                topic: len(await topic_partitions(config.connection, topic))
                for topic in (config.topics.usage, config.topics.totals)
            }
        if partitions[config.topics.usage] != partitions[config.topics.totals]:
            raise TopicMismatchError("the totals changelog must have as many partitions as the usage topic")
        client = config.connection.client_kwargs()
        producer = AIOKafkaProducer(
            **client,
            client_id=config.aggregator_id,
            acks="all",
            enable_idempotence=config.idempotence,
            linger_ms=2,
            max_batch_size=512 * 1024,
        )
        consumer = AIOKafkaConsumer(
            **client,
            client_id=config.aggregator_id,
            group_id=config.group_id,
            group_instance_id=config.group_instance_id,
            session_timeout_ms=config.session_timeout_ms,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=min(config.batch_window_ms, 100),
            max_partition_fetch_bytes=4 * 1024 * 1024,
        )
        await producer.start()
        try:
            # Limits first: the first usage batch is judged against them.
            await self._limits_feed.start()
            consumer.subscribe([config.topics.usage], listener=_Rebalance(self, consumer))
            await start_consumer(consumer)
        except BaseException:
            await self._limits_feed.stop()
            await producer.stop()
            raise
        self._producer, self._consumer = producer, consumer
        self._stopping = False
        self._task = asyncio.create_task(self._run(), name="tokenguard-aggregator")
        if config.metrics_port is not None:
            from aggregator.metrics import MetricsServer

            self.metrics = MetricsServer(self, config.metrics_host, config.metrics_port)
            await self.metrics.start()

    async def stop(self) -> None:
        """Finish the batch in hand, leave the group, close. Idempotent."""
        task, self._task = self._task, None
        if task is None:
            return
        self._stopping = True
        if self.metrics is not None:
            await self.metrics.stop()
        if not task.done():
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._limits_feed.stop()
        consumer, self._consumer = self._consumer, None
        producer, self._producer = self._producer, None
        if consumer is not None:
            await close_consumer(consumer)
        if producer is not None:
            await producer.stop()

    async def __aenter__(self) -> AggregatorService:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def wait(self) -> None:
        """Until the service stops; re-raises what made it fail."""
        if self._task is not None:
            await self._task

    async def _run(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        while not self._stopping:
            if self._to_restore:
                async with self._lock:
                    await self._restore()
            # Poll without the lock: during a rebalance getmany() waits for the new assignment, and
            # the rebalance waits for on_partitions_revoked, which needs the lock.
            batches = await self._poll_batch(consumer)
            async with self._lock:
                # 1. Apply (records of partitions revoked meanwhile are skipped: their new owner
                # reads them again from the committed offset).
                for batch in batches:
                    await self._apply_all(batch)
                await self._flush()
                await self._heartbeat_if_due()

    async def _poll_batch(self, consumer: AIOKafkaConsumer) -> list[dict[TopicPartition, list[ConsumerRecord]]]:
        """One batch: polls until ``batch_max`` records or ``batch_window_ms`` after the first one.

        Each poll is bounded: aiokafka's getmany() ignores its timeout while the group has no
        assignment, which would otherwise keep stop() waiting through a stuck rebalance."""
        window_s = self.config.batch_window_ms / 1000
        polls = []
        count = 0
        closes_at = None
        while count < self.config.batch_max and not self._stopping:
            remaining = window_s if closes_at is None else closes_at - time.monotonic()
            if remaining <= 0:
                break
            try:
                more = await asyncio.wait_for(
                    consumer.getmany(timeout_ms=max(1, int(remaining * 1000)), max_records=self.config.batch_max - count),
                    remaining + 1.0,
                )
            except asyncio.TimeoutError:
                break
            if not more:
                break
            polls.append(more)
            count += sum(len(records) for records in more.values())
            if closes_at is None:
                closes_at = time.monotonic() + window_s
        return polls

    async def _apply_all(self, batches: dict[TopicPartition, list[ConsumerRecord]]) -> int:
        count = 0
        consumer = self._consumer
        assert consumer is not None
        for tp, records in batches.items():
            if not records:
                continue
            if tp.partition in self._owned:
                await self._apply(tp, records)
                count += len(records)
            elif tp in consumer.assignment():
                # Fetched before its state was restored: read these again once it is.
                consumer.seek(tp, records[0].offset)
        return count

    async def _apply(self, tp: TopicPartition, records: list[ConsumerRecord]) -> None:
        state, stats = self.state, self.stats
        for record in records:
            try:
                event = decode_usage_record(record.key, record.value)
            except DecodeError as exc:
                await self._dead_letter(record, exc)
                state.mark_position(tp.partition, record.offset)
                continue
            outcome = state.apply(tp.partition, record.offset, event)
            if outcome is Outcome.APPLIED:
                stats.events += 1
            elif outcome is Outcome.REPLAY:
                stats.replays_skipped += 1
            else:
                stats.duplicates_dropped += 1
        self._offsets[tp] = records[-1].offset + 1

    async def _dead_letter(self, record: ConsumerRecord, exc: DecodeError) -> None:
        """Keep the original key, bytes and headers; say why in headers. Never stops the aggregator."""
        producer = self._producer
        assert producer is not None
        headers = [
            *[(name, value) for name, value in record.headers if not name.startswith("tokenguard.")],
            ("tokenguard.error.reason", exc.reason.encode()),
            ("tokenguard.error.detail", exc.detail[:1000].encode(errors="replace")),
            ("tokenguard.source.topic", record.topic.encode()),
            ("tokenguard.source.partition", str(record.partition).encode()),
            ("tokenguard.source.offset", str(record.offset).encode()),
            ("tokenguard.aggregator", self.config.aggregator_id.encode()),
        ]
        future = await producer.send(
            self.config.topics.dead_letters, value=record.value, key=record.key, headers=headers
        )
        self._unacked.append(future)
        self.stats.dead_letters += 1
        log.warning("dead-lettered usage record %s:%d: %s", record.topic, record.offset, exc.reason)

    async def _flush(self) -> None:
        producer, consumer = self._producer, self._consumer
        assert producer is not None and consumer is not None
        dirty, notify = self.state.take_changes()
        if not dirty and not self._offsets and not self._unacked:
            return
        now = datetime.now(timezone.utc)
        topics = self.config.topics
        futures = self._unacked
        self._unacked = []
        # 2. The changelog record goes to the usage record's own partition number (co-partitioned),
        # one aiokafka batch per partition rather than one send() per key.
        by_partition: dict[int, list[tuple[bytes, bytes]]] = {}
        for key, totals in dirty:
            value = encode_fields(self.state.record_fields(key, totals, now))
            by_partition.setdefault(totals.partition, []).append((tenant_period_key(*key), value))
        for partition, records in by_partition.items():
            futures.extend(await self._send_records(producer, topics.totals, partition, records))
        for key, totals, reason in notify:
            notice = QuotaNotice.model_construct(
                type="notice",
                tenant_id=key[0],
                period_key=key[1],
                state=totals.state,
                used_tokens=totals.used,
                limit_tokens=totals.limit,
                usage_partition=totals.partition,
                usage_offset=totals.applied_offset,
                reason=reason,
                aggregator_id=self.config.aggregator_id,
                emitted_at=now,
            )
            futures.append(await producer.send(topics.notices, encode(notice), key=tenant_period_key(*key)))
        # 3. A failed send raises here, before the commit: the process dies and restores, crash-only.
        await asyncio.gather(*futures)
        self.stats.notices += len(notify)
        self.stats.flushes += 1
        # 4. Commit last. If the group rebalanced meanwhile the commit fails; that is safe, since the
        # changelog already holds these records' effect and the next owner skips them.
        if self._offsets:
            offsets, self._offsets = self._offsets, {}
            try:
                await consumer.commit(offsets)
            except (CommitFailedError, IllegalStateError) as exc:
                self.stats.commit_failures += 1
                log.warning("offset commit skipped after a rebalance: %s", exc)

    @staticmethod
    async def _send_records(
        producer: AIOKafkaProducer, topic: str, partition: int, records: list[tuple[bytes, bytes]]
    ) -> list[asyncio.Future[object]]:
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

    async def _heartbeat_if_due(self) -> None:
        now = time.monotonic()
        if now < self._next_heartbeat or not self._owned:
            return
        self._next_heartbeat = now + self.config.heartbeat_interval_s
        producer = self._producer
        assert producer is not None
        emitted_at = datetime.now(timezone.utc)
        futures = []
        for partition in sorted(self._owned):
            heartbeat = Heartbeat.model_construct(
                type="heartbeat",
                usage_partition=partition,
                usage_offset=self.state.partition_offsets.get(partition, -1),
                aggregator_id=self.config.aggregator_id,
                emitted_at=emitted_at,
            )
            futures.append(
                await producer.send(self.config.topics.notices, encode(heartbeat), key=heartbeat_key(partition))
            )
        await asyncio.gather(*futures)
        self.stats.heartbeats += len(futures)

    async def _limit_changed(self, tenant_id: str | None) -> None:
        """A limit was set or removed: re-judge the affected keys and publish at once."""
        async with self._lock:
            self.state.reevaluate(tenant_id)
            if self._producer is not None and self._consumer is not None:
                await self._flush()

    async def _on_revoked(self, revoked: set[TopicPartition]) -> None:
        async with self._lock:
            if self._producer is not None and self._consumer is not None:
                await self._flush()
            partitions = {tp.partition for tp in revoked if tp.topic == self.config.topics.usage}
            self._to_restore -= set(revoked)
            self._owned -= partitions
            self.state.drop_partitions(partitions)
            for tp in revoked:
                self._offsets.pop(tp, None)
            if partitions:
                log.info("partitions revoked: %s", sorted(partitions))

    async def _on_assigned(self, assigned: set[TopicPartition], consumer: AIOKafkaConsumer) -> None:
        """Pause newly assigned partitions; the main loop restores them before resuming.

        Restoring inside this callback would stall the group's rebalance for as long as the
        restore takes, and a restore longer than the session timeout gets the member evicted,
        which starts the next rebalance: a loop. Paused, the partitions fetch nothing until
        their state is back, while the consumer keeps heartbeating.
        """
        tps = {tp for tp in assigned if tp.topic == self.config.topics.usage}
        if tps:
            consumer.pause(*tps)
        self._to_restore |= tps

    async def _restore(self) -> None:
        """Bring back the state of partitions assigned since the last batch, then resume them:
        totals from the changelog, the dedup window from the usage records before the committed offset."""
        tps, self._to_restore = self._to_restore, set()
        assigned = self._consumer.assignment() if self._consumer is not None else set()
        tps = {tp for tp in tps if tp in assigned}  # revoked again meanwhile: nothing to do
        if not tps:
            return
        partitions = {tp.partition for tp in tps}
        started = time.monotonic()
        restored = await read_changelog(self.config.connection, self.config.topics.totals, partitions)
        for record in restored.values():
            if record.usage_partition in partitions:
                self.state.restore(record)
        everything = await committed_offsets(self.config.connection, self.config.group_id, self.config.topics.usage)
        committed = {p: offset for p, offset in everything.items() if p in partitions and offset > 0}
        for partition, offset in committed.items():
            self.state.mark_position(partition, offset - 1)
        seen = await recent_event_ids(self.config.connection, self.config.topics.usage, committed, self.config.dedup_window)
        for partition, event_ids in seen.items():
            self.state.remember(partition, event_ids)
        self.stats.restored_keys += len(restored)
        self.stats.last_restore_s = time.monotonic() - started
        self._owned |= partitions
        self._next_heartbeat = 0.0
        if self._consumer is not None:
            self._consumer.resume(*tps)
        log.info(
            "partitions assigned: %s; restored %d keys and %d event ids in %.2fs",
            sorted(partitions),
            len(restored),
            sum(len(ids) for ids in seen.values()),
            self.stats.last_restore_s,
        )
        self.assigned.set()
