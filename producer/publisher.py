"""The usage publisher: the hot path only appends to a queue; a background task ships batches.

A call never awaits the broker. The sender drains up to ``batch_max`` events, groups them by the
partition their tenant key hashes to (Kafka's murmur2, as the Java client does), appends them to
one aiokafka batch per partition, and reports each event's offset once the broker acknowledges
it, which is what lets the snapshot tell its own spend apart from what a notice already covers.

When Kafka is away or slow (a batch not acknowledged within ``send_timeout_s``), events go to the
on-disk spool, and new events follow them there until the spool is delivered, so a tenant's
events reach Kafka in the order they were spent. ``stop()`` spools what it could not deliver in
time; the next start on the host delivers it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from aiokafka.partitioner import DefaultPartitioner

from producer.config import ProducerConfig
from producer.errors import PublisherError
from producer.spool import Spool, SpoolFull
from schemas.errors import DecodeError
from schemas.wire import UsageLike, decode_usage, encode_usage, usage_headers, usage_key

log = logging.getLogger(__name__)

DeliveryCallback = Callable[[UsageLike, int, int], None]


@dataclass
class PublisherStats:
    published: int = 0
    delivered: int = 0
    send_errors: int = 0
    over_queue_max: int = 0
    spooled: int = 0
    spool_dropped: int = 0
    spool_refused: int = 0


class UsagePublisher:
    """Ships usage events to the usage topic in the background; ``publish()`` never blocks."""

    def __init__(self, config: ProducerConfig, *, on_delivered: DeliveryCallback | None = None) -> None:
        self._config = config
        self._topic = config.topics.usage
        self._on_delivered = on_delivered
        self._queue: deque[UsageLike] = deque()
        self._wakeup = asyncio.Event()
        self._producer: AIOKafkaProducer | None = None
        self._task: asyncio.Task[None] | None = None
        self._partitions: list[int] = []
        self._partition_of: dict[str, int] = {}
        self._spool = Spool(config.spool_dir, config.spool_max_bytes) if config.spool_dir else None
        self._in_flight: list[UsageLike] = []
        self._closing: set[asyncio.Task[None]] = set()
        self._spilled_here: set[str] = set()  # ids of our own events in the spool: we report their offsets
        self._accepting = False
        self._stopping = False
        self.spool_full = False
        self.stats = PublisherStats()

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def spool_pending(self) -> int:
        return self._spool.pending if self._spool else 0

    def _new_producer(self) -> AIOKafkaProducer:
        return AIOKafkaProducer(
            **self._config.connection.client_kwargs(),
            client_id=f"tokenguard-{self._config.instance_id}",
            acks="all",
            enable_idempotence=self._config.idempotence,
            linger_ms=self._config.linger_ms,
            max_batch_size=512 * 1024,
            request_timeout_ms=int(self._config.send_timeout_s * 1000),
        )

    async def start(self) -> None:
        if self._task is not None:
            return
        producer = self._new_producer()
        await producer.start()
        try:
            partitions = await producer.partitions_for(self._topic)
        except BaseException:
            await producer.stop()
            raise
        if self._spool is not None:
            self._spool.open()
        self._producer = producer
        self._partitions = sorted(partitions)
        self._accepting = True
        self._stopping = False
        self._task = asyncio.create_task(self._run(), name="tokenguard-publisher")

    async def _replace_producer(self) -> None:
        """After a failed send, start over with a new producer (a new producer id).

        An idempotent producer whose batches were abandoned on a timeout keeps sequence numbers
        the broker will never see, and every later batch fails with OutOfOrderSequenceNumber.
        The abandoned events are spooled and sent again; the aggregator drops repeats by id.
        """
        old, self._producer = self._producer, None
        if old is not None:
            closing = asyncio.create_task(_close_within(old, self._config.send_timeout_s))
            self._closing.add(closing)
            closing.add_done_callback(self._closing.discard)

    async def _ready_producer(self) -> AIOKafkaProducer | None:
        if self._producer is None:
            producer = self._new_producer()
            try:
                await asyncio.wait_for(producer.start(), self._config.send_timeout_s)
            except (TimeoutError, KafkaError, OSError) as exc:
                log.debug("Kafka producer could not start yet: %r", exc)
                await _close_within(producer, 1.0)
                return None
            self._producer = producer
        return self._producer

    async def stop(self, timeout: float | None = None) -> None:
        """Deliver what is queued within ``timeout``, spool the rest, close. Idempotent."""
        if not self._accepting and self._task is None:
            return
        timeout = self._config.stop_timeout_s if timeout is None else timeout
        self._accepting = False
        self._stopping = True
        self._wakeup.set()
        task, self._task = self._task, None
        if task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(task), timeout)
            except TimeoutError:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        # A batch cut off mid-send may be partly delivered: spooling it again is safe (dedup by id).
        leftover = self._in_flight + list(self._queue)
        self._in_flight = []
        self._queue.clear()
        self._spill(leftover)
        producer, self._producer = self._producer, None
        if producer is not None:
            await _close_within(producer, timeout)
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
        if self._spool is not None:
            if self._spool.pending:
                log.warning("%d usage events stay in the spool at %s for the next start", self._spool.pending, self._spool.root)
            self._spool.close()
        if self._queue:
            log.error("usage publisher stopped with %d events neither delivered nor spooled", len(self._queue))

    async def __aenter__(self) -> UsagePublisher:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def publish(self, event: UsageLike) -> None:
        """Queue one event for delivery. Constant time; never awaits."""
        if not self._accepting:
            raise PublisherError("the usage publisher is not running: call start() first")
        queue = self._queue
        if len(queue) >= self._config.queue_max:
            self.stats.over_queue_max += 1
            if self.stats.over_queue_max % 100_000 == 1:
                log.warning("usage queue holds %d events (past queue_max %d): Kafka is slow or away", len(queue), self._config.queue_max)
        queue.append(event)
        self.stats.published += 1
        if not self._wakeup.is_set():
            self._wakeup.set()

    async def flush(self, timeout: float = 10.0) -> None:
        """Wait until every event published so far is acknowledged by the broker."""
        loop = asyncio.get_running_loop()
        target = self.stats.published
        deadline = loop.time() + timeout
        while self.stats.delivered < target:
            if loop.time() > deadline:
                raise TimeoutError(f"{target - self.stats.delivered} usage events not delivered within {timeout}s")
            await asyncio.sleep(0.005)

    def _partition(self, tenant_id: str) -> int:
        partition = self._partition_of.get(tenant_id)
        if partition is None:
            if len(self._partition_of) > 100_000:
                self._partition_of.clear()
            partition = DefaultPartitioner()(usage_key(tenant_id), self._partitions, self._partitions)
            self._partition_of[tenant_id] = partition
        return partition

    def partition_of(self, tenant_id: str) -> int:
        """The usage partition a tenant's events go to (and whose aggregator judges it)."""
        return self._partition(tenant_id)

    async def _run(self) -> None:
        backoff = 0.1
        while True:
            if self._spool is not None and self._spool.pending:
                # Catching up: later events queue behind the spooled ones, in order.
                self._spill(self._drain_queue())
                if await self._deliver_spool():
                    backoff = 0.1
                    continue
                if self._stopping:
                    return
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            if not self._queue:
                if self._stopping:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if self._config.linger_ms and len(self._queue) < self._config.batch_max and not self._stopping:
                await asyncio.sleep(self._config.linger_ms / 1000)
            batch = self._in_flight = self._drain_queue(self._config.batch_max)
            failed = await self._send_within_timeout(batch)
            self._in_flight = []
            if not failed:
                backoff = 0.1
                continue
            self.stats.send_errors += 1
            if self._spool is not None:
                self._spill(failed)
                if self.spool_full:  # the spool refused them: keep them in memory, in front
                    self._queue.extendleft(reversed(failed))
            else:
                self._queue.extendleft(reversed(failed))
            if self._stopping and (self._spool is None or self.spool_full):
                return
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    def _drain_queue(self, limit: int | None = None) -> list[UsageLike]:
        take = len(self._queue) if limit is None else min(limit, len(self._queue))
        return [self._queue.popleft() for _ in range(take)]

    def _spill(self, events: list[UsageLike]) -> None:
        """Events that cannot go to Kafka now go to disk, per the spool-full policy."""
        if not events:
            return
        if self._spool is None:
            self._queue.extendleft(reversed(events))
            return
        lines = [encode_usage(event) for event in events]
        while True:
            try:
                self._spool.append(lines)
                break
            except SpoolFull:
                if self._config.spool_full_policy == "drop_oldest" and self._spool.pending:
                    lost = self._spool.drop_oldest_segment()
                    self.stats.spool_dropped += lost
                    log.error("usage spool full: DROPPED the %d oldest spooled usage events (policy drop_oldest)", lost)
                    continue
                self.stats.spool_refused += len(events)
                if not self.spool_full:
                    log.error("usage spool full (%d bytes): new calls are blocked until Kafka takes it", self._spool.size_bytes)
                self.spool_full = True
                self._queue.extendleft(reversed(events))
                return
        self.spool_full = False
        self.stats.spooled += len(events)
        self._spilled_here.update(event.event_id for event in events)

    async def _deliver_spool(self) -> bool:
        """Send the oldest spooled events; True when they were all acknowledged."""
        assert self._spool is not None
        lines = self._spool.peek(self._config.batch_max)
        events: list[UsageLike] = []
        for line in lines:
            try:
                events.append(decode_usage(line))
            except DecodeError as exc:  # a torn last line after a crash: nothing to deliver
                log.error("unreadable spooled usage event skipped: %s", exc)
        if await self._send_within_timeout(events, own=self._spilled_here):
            return False
        self._spool.consume(len(lines))
        self._spilled_here.difference_update(event.event_id for event in events)
        if self.spool_full and self._spool.size_bytes < self._spool.max_bytes // 2:
            self.spool_full = False
        return True

    async def _send_within_timeout(self, events: list[UsageLike], own: set[str] | None = None) -> list[UsageLike]:
        """Send; return the events not acknowledged in time (all of them on a timeout).

        A timed-out batch may still reach the broker later; it is sent again from the spool, and
        the aggregator drops the repeat by event id.
        """
        if not events:
            return []
        producer = await self._ready_producer()
        if producer is None:
            return events
        try:
            failed = await asyncio.wait_for(self._send(producer, events, own), self._config.send_timeout_s)
        except (TimeoutError, KafkaError) as exc:
            log.warning("%d usage events not acknowledged: %r", len(events), exc)
            failed = events
        if failed:
            await self._replace_producer()
        return failed

    async def _send(self, producer: AIOKafkaProducer, events: list[UsageLike], own: set[str] | None) -> list[UsageLike]:
        by_partition: dict[int, list[UsageLike]] = {}
        for event in events:
            by_partition.setdefault(self._partition(event.tenant_id), []).append(event)
        in_flight: list[tuple[asyncio.Future[object], int, list[UsageLike]]] = []
        failed: list[UsageLike] = []
        for partition, items in by_partition.items():
            for chunk, batch in self._batches(producer, items):
                if batch is None:
                    log.error("usage event %s does not fit in a batch; it stays queued", chunk[0].event_id)
                    failed.extend(chunk)
                    continue
                try:
                    future = await producer.send_batch(batch, self._topic, partition=partition)
                except KafkaError as exc:
                    log.warning("sending %d usage events failed: %r", len(chunk), exc)
                    failed.extend(chunk)
                    continue
                in_flight.append((future, partition, chunk))
        results = await asyncio.gather(*(future for future, _, _ in in_flight), return_exceptions=True)
        for (_, partition, chunk), result in zip(in_flight, results, strict=True):
            if isinstance(result, BaseException):
                log.warning("usage batch of %d events to partition %d failed: %r", len(chunk), partition, result)
                failed.extend(chunk)
                continue
            self._acknowledged(chunk, partition, result.offset, own)  # type: ignore[attr-defined]
        return failed

    def _batches(self, producer: AIOKafkaProducer, items: list[UsageLike]) -> Iterable[tuple[list[UsageLike], object]]:
        """Consecutive chunks of ``items`` with a closed batch holding each (None: would not fit)."""
        start = 0
        while start < len(items):
            batch = producer.create_batch()
            count = 0
            for event in items[start:]:
                key, value, headers = usage_key(event.tenant_id), encode_usage(event), usage_headers(event)
                if batch.append(key=key, value=value, timestamp=None, headers=headers) is None:
                    break
                count += 1
            if count == 0:
                yield items[start : start + 1], None
                start += 1
                continue
            batch.close()
            yield items[start : start + count], batch
            start += count

    def _acknowledged(self, chunk: list[UsageLike], partition: int, base: int, own: set[str] | None) -> None:
        self.stats.delivered += sum(1 for e in chunk if own is None or e.event_id in own)
        if self._on_delivered is None:
            return
        for index, event in enumerate(chunk):
            # Events adopted from another process's spool were never in this snapshot.
            if own is None or event.event_id in own:
                self._on_delivered(event, partition, base + index)


async def _close_within(producer: AIOKafkaProducer, timeout: float) -> None:
    """``producer.stop()``, bounded. An idempotent aiokafka producer's stop() waits for every
    pending batch, forever while the broker is away; by then those events are in our spool, so
    past ``timeout`` its tasks are cancelled and its connections closed instead."""
    stopping = asyncio.ensure_future(producer.stop())
    try:
        await asyncio.wait_for(asyncio.shield(stopping), timeout)
        return
    except TimeoutError:
        log.warning("the Kafka producer did not close within %.0fs (broker away); abandoning its pending batches", timeout)
    sender_task = getattr(getattr(producer, "_sender", None), "sender_task", None)
    for task in (stopping, sender_task):
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
    await producer.client.close()
