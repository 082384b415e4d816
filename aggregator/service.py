"""The aggregator service: consume usage in a group, keep exact totals, publish notices.

This module holds the lifecycle, the consume loop, the rebalance hooks and the heartbeats. The
parts with rules of their own live beside it: ``batch`` (polling and applying a batch),
``recovery`` (state of newly assigned partitions), ``checkpoint`` (the numbered commit order),
``intake`` (what a record must be to count), ``deadletter``, ``notices`` (policing the notices
topic) and ``state`` (the pure totals).

How a batch meets a rebalance: records are applied only for partitions in ``_owned`` (assigned
and restored), and only in offset order from the position recovery sought to. A partition that is
revoked leaves ``_owned`` at once (its records still in the batch are dropped, and its uncommitted
offsets are forgotten); when it is assigned again, recovery restores it and seeks the consumer to
the group's committed offset before any of its records is applied. Nothing fetched before that
seek is ever applied, and nothing is committed that was not applied.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from aiokafka import AIOKafkaClient, AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError

from aggregator import recovery
from aggregator.batch import BatchApplier
from aggregator.checkpoint import Checkpoint
from aggregator.config import AggregatorConfig
from aggregator.errors import RetentionError
from aggregator.intake import expected_partition
from aggregator.limits import LimitsFeed
from aggregator.notices import NoticesWatch
from aggregator.state import Limits, TotalsState
from aggregator.stats import AggregatorStats
from schemas.notices import Heartbeat
from schemas.wire import encode, heartbeat_key
from transport.admin import (
    TopicMismatchError,
    aiokafka_quieted,
    close_consumer,
    ensure_topics,
    retention_findings,
    start_consumer,
    topic_partitions,
)
from transport.connection import KafkaConnection

if TYPE_CHECKING:
    from aggregator.metrics import MetricsServer

log = logging.getLogger(__name__)

# Waiting for Kafka at start: first retry after WAIT_FIRST_S, doubling up to WAIT_MAX_S; each probe
# bounded by WAIT_PROBE_S; one warning at most every WAIT_LOG_EVERY_S.
WAIT_FIRST_S = 0.5
WAIT_MAX_S = 5.0
WAIT_PROBE_S = 5.0
WAIT_LOG_EVERY_S = 10.0


async def _cluster_answers(connection: KafkaConnection, timeout_s: float) -> str | None:
    """None when the cluster answers a metadata request within ``timeout_s``; else why not, in one
    line. aiokafka's own per-attempt errors are kept out of the log meanwhile (one line of ours
    says it all)."""
    with aiokafka_quieted() as capture:
        client = AIOKafkaClient(**connection.client_kwargs(), client_id="tokenguard-aggregator-probe",
                                request_timeout_ms=max(1000, int(timeout_s * 1000)))
        try:
            async with asyncio.timeout(timeout_s):
                await client.bootstrap()
            return None
        except TimeoutError:
            return f"no answer within {timeout_s:g}s"
        except (KafkaError, OSError) as exc:
            return capture.last or f"{type(exc).__name__}: {exc}"
        finally:
            await client.close()



class _Rebalance(ConsumerRebalanceListener):
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
        self.state = TotalsState(self.limits, dedup_window=config.dedup_window,
                                 seal_grace_s=config.seal_grace_s if config.seal_periods else None)
        self.stats = AggregatorStats()
        self.assigned = asyncio.Event()
        self._limits_feed = LimitsFeed(config, self.limits, on_change=self._limit_changed)
        self._watch = NoticesWatch(config, on_seen=self._notices_seen)
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._checkpoint: Checkpoint | None = None
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._partitions = 0
        self._owned: set[int] = set()
        self._to_restore: set[TopicPartition] = set()
        self._next: dict[TopicPartition, int] = {}
        self._stopping = False
        self._next_heartbeat = 0.0
        self._next_reassert = 0.0
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
        """Wait for Kafka (capped backoff, a warning at most every ``WAIT_LOG_EVERY_S``), then check
        the topics, start the feeds and join the group. The metrics endpoint is up from the first
        moment: ``/healthz`` answers 200 while the process waits (it is alive), ``/readyz`` 503
        until its partitions are restored. Cancelling start() (SIGTERM while waiting) closes
        everything it opened."""
        if self._task is not None:
            return
        config = self.config
        if config.metrics_port is not None and self.metrics is None:
            from aggregator.metrics import MetricsServer

            self.metrics = MetricsServer(self, config.metrics_host, config.metrics_port)
            await self.metrics.start()
        # The wait is this service's task meanwhile: ``running`` (liveness) holds while it waits.
        waiting = self._task = asyncio.create_task(self._wait_for_kafka(), name="tokenguard-aggregator-waiting")
        try:
            await waiting
            self._task = None
            await self._start_consuming()
        except BaseException:
            waiting.cancel()
            self._task = None
            metrics, self.metrics = self.metrics, None
            if metrics is not None:
                await metrics.stop()
            raise

    async def _wait_for_kafka(self) -> None:
        """Return once the cluster answers a metadata request; until then retry with capped
        exponential backoff, logging a warning at most every ``WAIT_LOG_EVERY_S``."""
        where = self.config.connection.bootstrap_servers
        delay, attempt, logged, began = WAIT_FIRST_S, 0, -float("inf"), time.monotonic()
        while True:
            attempt += 1
            failure = await _cluster_answers(self.config.connection, WAIT_PROBE_S)
            if failure is None:
                if attempt > 1:
                    log.warning("Kafka at %s answers (attempt %d, after %.1fs waiting)", where, attempt, time.monotonic() - began)
                return
            if time.monotonic() - logged >= WAIT_LOG_EVERY_S:
                logged = time.monotonic()
                log.warning("waiting for Kafka at %s (attempt %d, next in %.1fs): %s", where, attempt, delay, failure)
            await asyncio.sleep(delay)
            delay = min(delay * 2, WAIT_MAX_S)

    async def _start_consuming(self) -> None:
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
        self._partitions = partitions[config.topics.usage]
        problem, warning = await retention_findings(config.connection, config.topics.usage,
                                                    longest_period_s=config.longest_period_s,
                                                    seal_grace_s=config.seal_grace_s)
        if warning:
            log.warning("%s", warning)
        if problem and not config.allow_short_retention:
            raise RetentionError(problem)
        if problem:
            log.warning("starting anyway (TOKENGUARD_ALLOW_SHORT_RETENTION): %s", problem)
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
            await self._watch.start()
            consumer.subscribe([config.topics.usage], listener=_Rebalance(self, consumer))
            await start_consumer(consumer)
        except BaseException:
            await close_consumer(consumer)
            await self._watch.stop()
            await self._limits_feed.stop()
            await producer.stop()
            raise
        self._producer, self._consumer = producer, consumer
        self._checkpoint = Checkpoint(producer, consumer, config.topics, config.aggregator_id)
        # The applier polls one slice at a time; this loop decides when a flush is due.
        self._batch = BatchApplier(
            replace(config, batch_window_ms=config.poll_window_ms), self.state, self.stats, self._checkpoint,
            partitions=self._partitions, owned=self._owned, next_offsets=self._next,
        )
        self._stopping = False
        self._next_reassert = time.monotonic() + config.reassert_interval_s
        self._task = asyncio.create_task(self._run(), name="tokenguard-aggregator")

    async def stop(self) -> None:
        """Finish the batch in hand, leave the group, close everything. Idempotent.

        Closes everything even when the consume loop has failed; the failure is logged here and
        raised by ``wait()``, never by ``stop()`` (which cleanup paths call)."""
        task, self._task = self._task, None
        if task is None:
            return
        self._stopping = True
        try:
            if self.metrics is not None:
                await self.metrics.stop()
            if not task.done():
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait({task})
            if not task.cancelled() and task.exception() is not None:
                log.error("the consume loop had failed: %r", task.exception())
        finally:
            await self._watch.stop()
            await self._limits_feed.stop()
            consumer, self._consumer = self._consumer, None
            producer, self._producer = self._producer, None
            self._checkpoint = None
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
        """Poll in slices of ``poll_window_ms``, apply each slice at once, flush on the cadence of
        ``_flush_due``: a notice is published one slice after the record that made it, not a
        whole batch window later, while the changelog and the offset commit keep the window's
        large batches when nothing needs saying."""
        consumer = self._consumer
        assert consumer is not None
        opened_at: float | None = None  # when the first record since the last flush was applied
        applied = 0
        while not self._stopping:
            if self._to_restore:
                async with self._lock:
                    await self._restore()
            # Poll without the lock: during a rebalance getmany() waits for the new assignment, and
            # the rebalance waits for on_partitions_revoked, which needs the lock.
            polls = await self._batch.poll(consumer, lambda: self._stopping)
            async with self._lock:
                # 1. Apply, poll by poll, in order (see the module docstring for rebalances).
                for records, unreadable in polls:
                    await self._batch.apply(records, unreadable)
                polled = sum(len(batch) for records, _ in polls for batch in records.values()) + sum(
                    len(unreadable) for _, unreadable in polls)
                if polled and opened_at is None:
                    opened_at = time.monotonic()
                applied += polled
                if not self._flush_due(polled, applied, opened_at):
                    continue
                await self._flush()
                opened_at, applied = None, 0
                await self._heartbeat_if_due()
                self._reassert_if_due()
        if applied:
            async with self._lock:
                await self._flush()  # a graceful stop leaves nothing applied and unsaid

    def _flush_due(self, polled: int, applied: int, opened_at: float | None) -> bool:
        """Flush when a notice waits to be published (a tenant crossed a threshold: every
        instance should know now), when the last slice found nothing more (idle: nothing to gain
        by waiting), at ``batch_max`` records or ``batch_window_ms`` after the first one."""
        if not polled or applied >= self.config.batch_max or self.state.notices_due:
            return True
        return opened_at is not None and time.monotonic() - opened_at >= self.config.batch_window_ms / 1000

    async def _flush(self) -> None:
        checkpoint = self._checkpoint
        assert checkpoint is not None
        await checkpoint.commit(self.state, datetime.now(UTC))
        self.stats.flushes += 1
        self.stats.notices = checkpoint.notices
        self.stats.commit_failures = checkpoint.commit_failures

    async def _heartbeat_if_due(self) -> None:
        now = time.monotonic()
        if now < self._next_heartbeat or not self._owned:
            return
        self._next_heartbeat = now + self.config.heartbeat_interval_s
        self.stats.rate_windows_expired += self.state.expire(time.time(), self.config.rate_window_keep_s)
        self.stats.sealed += self.state.seal(time.time(), self._caught_up())
        producer = self._producer
        assert producer is not None
        emitted_at = datetime.now(UTC)
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

    def _caught_up(self) -> set[int]:
        """Owned partitions whose every record (as of the last fetch) has been applied: their
        periods can seal by the clock, not only by a later record's timestamp."""
        consumer = self._consumer
        if consumer is None:
            return set()
        caught_up = set()
        for partition in self._owned:
            highwater = consumer.highwater(TopicPartition(self.config.topics.usage, partition))
            if highwater is not None and self.state.partition_offsets.get(partition, -1) + 1 >= highwater:
                caught_up.add(partition)
        return caught_up

    def _reassert_if_due(self) -> None:
        """Queue the not-'ok' keys' notices again, and re-check what the notices topic says; the
        next flush publishes them. Bounds how long a forged or lost notice can stand."""
        now = time.monotonic()
        if now < self._next_reassert:
            return
        self._next_reassert = now + self.config.reassert_interval_s
        self.stats.reasserted += self.state.reassert()
        self._correct(list(self._watch.said))

    def _correct(self, keys: list[tuple[str, str]]) -> None:
        said = self._watch.said
        for key in keys:
            home = expected_partition(key[0].encode(), self._partitions) if self._partitions else -1
            if home in self._owned and self.state.correct(key, said.get(key)):
                self.stats.corrections += 1

    async def _notices_seen(self, keys: list[tuple[str, str]]) -> None:
        """The notices topic changed for ``keys``: put right at once what contradicts our state."""
        async with self._lock:
            before = self.stats.corrections
            self._correct(keys)
            if self.stats.corrections != before and self._checkpoint is not None:
                log.warning("corrected %d notices that contradicted this aggregator's state", self.stats.corrections - before)
                await self._flush()

    async def _limit_changed(self, tenant_id: str | None) -> None:
        """A limit was set or removed: re-judge the affected keys and publish at once."""
        async with self._lock:
            self.state.reevaluate(tenant_id)
            if self._checkpoint is not None:
                await self._flush()

    async def _on_revoked(self, revoked: set[TopicPartition]) -> None:
        async with self._lock:
            if self._checkpoint is not None:
                await self._flush()
            tps = {tp for tp in revoked if tp.topic == self.config.topics.usage}
            partitions = {tp.partition for tp in tps}
            self._to_restore -= tps
            self._owned -= partitions
            self.state.drop_partitions(partitions)
            for tp in tps:
                self._next.pop(tp, None)
            if self._checkpoint is not None:
                self._checkpoint.forget(tps)
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
        """Bring back the state of partitions assigned since the last batch, then resume them."""
        tps, self._to_restore = self._to_restore, set()
        consumer = self._consumer
        assert consumer is not None
        tps = {tp for tp in tps if tp in consumer.assignment()}  # revoked again meanwhile: nothing to do
        if not tps:
            return
        partitions = {tp.partition for tp in tps}
        # A partition that was still owned (assigned again without a revoke in between) starts over.
        self._owned -= partitions
        self.state.drop_partitions(partitions)
        restored = await recovery.restore(self.config, consumer, self.state, tps, self._partitions)
        self._next.update(restored.positions)
        self.stats.restored_keys += restored.keys
        self.stats.last_restore_s = restored.seconds
        self.stats.changelog_rejected += sum(restored.rejected.values())
        self._owned |= partitions
        self._next_heartbeat = 0.0
        self._correct([key for key in self._watch.said if expected_partition(key[0].encode(), self._partitions) in partitions])
        consumer.resume(*tps)
        log.info(
            "partitions assigned: %s; restored %d keys and %d event ids in %.2fs",
            sorted(partitions), restored.keys, restored.event_ids, restored.seconds,
        )
        if restored.rejected:
            log.error("changelog records not taken as state: %s", dict(restored.rejected))
        self.assigned.set()
