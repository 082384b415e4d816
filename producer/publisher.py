"""The usage publisher: the hot path only appends to a queue; a background task ships batches.

A call never awaits the broker. The sender drains up to ``batch_max`` events, groups them by the
partition their tenant key hashes to (Kafka's murmur2, as the Java client does), appends them to
one aiokafka batch per partition, and reports each event's offset once the broker acknowledges
it, which is what lets the snapshot tell its own spend apart from what a notice already covers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from aiokafka.partitioner import DefaultPartitioner

from producer.config import ProducerConfig
from producer.errors import PublisherError
from schemas.usage import UsageEvent
from schemas.wire import encode, usage_headers, usage_key

log = logging.getLogger(__name__)

DeliveryCallback = Callable[[UsageEvent, int, int], None]


@dataclass
class PublisherStats:
    published: int = 0
    delivered: int = 0
    send_errors: int = 0
    over_queue_max: int = 0


class UsagePublisher:
    """Ships usage events to the usage topic in the background; ``publish()`` never blocks."""

    def __init__(self, config: ProducerConfig, *, on_delivered: DeliveryCallback | None = None) -> None:
        self._config = config
        self._topic = config.topics.usage
        self._on_delivered = on_delivered
        self._queue: deque[UsageEvent] = deque()
        self._wakeup = asyncio.Event()
        self._producer: AIOKafkaProducer | None = None
        self._task: asyncio.Task[None] | None = None
        self._partitions: list[int] = []
        self._partition_of: dict[str, int] = {}
        self._accepting = False
        self._stopping = False
        self.stats = PublisherStats()

    async def start(self) -> None:
        if self._producer is not None:
            return
        producer = AIOKafkaProducer(
            **self._config.connection.client_kwargs(),
            client_id=f"tokenguard-{self._config.instance_id}",
            acks="all",
            enable_idempotence=self._config.idempotence,
            linger_ms=self._config.linger_ms,
            max_batch_size=512 * 1024,
        )
        await producer.start()
        try:
            partitions = await producer.partitions_for(self._topic)
        except BaseException:
            await producer.stop()
            raise
        self._producer = producer
        self._partitions = sorted(partitions)
        self._accepting = True
        self._task = asyncio.create_task(self._run(), name="tokenguard-publisher")

    async def stop(self, timeout: float = 10.0) -> None:
        """Deliver what is queued (within ``timeout``) and close. Idempotent."""
        if self._producer is None:
            return
        self._accepting = False
        self._stopping = True
        self._wakeup.set()
        task, self._task = self._task, None
        if task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(task), timeout)
            except asyncio.TimeoutError:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        producer, self._producer = self._producer, None
        await producer.stop()
        if self._queue:
            log.error("usage publisher stopped with %d events undelivered", len(self._queue))

    async def __aenter__(self) -> UsagePublisher:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    def publish(self, event: UsageEvent) -> None:
        """Queue one event for delivery. Constant time; never awaits."""
        if not self._accepting:
            raise PublisherError("the usage publisher is not running: call start() first")
        queue = self._queue
        if len(queue) >= self._config.queue_max:
            self.stats.over_queue_max += 1
            if self.stats.over_queue_max % 10_000 == 1:
                log.warning("usage queue holds %d events (limit %d): Kafka is slow or away", len(queue), self._config.queue_max)
        queue.append(event)
        self.stats.published += 1
        if not self._wakeup.is_set():
            self._wakeup.set()

    async def flush(self, timeout: float = 10.0) -> None:
        """Wait until every event published so far is acknowledged by the broker."""
        target = self.stats.published
        deadline = asyncio.get_running_loop().time() + timeout
        while self.stats.delivered < target:
            if asyncio.get_running_loop().time() > deadline:
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

    async def _run(self) -> None:
        backoff = 0.1
        while True:
            if not self._queue:
                if self._stopping:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if self._config.linger_ms and len(self._queue) < self._config.batch_max and not self._stopping:
                await asyncio.sleep(self._config.linger_ms / 1000)
            take = min(len(self._queue), self._config.batch_max)
            batch = [self._queue.popleft() for _ in range(take)]
            failed = await self._send(batch)
            if failed:
                # Put them back in front, in order, and try again: never drop usage.
                self._queue.extendleft(reversed(failed))
                self.stats.send_errors += 1
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            else:
                backoff = 0.1

    async def _send(self, events: list[UsageEvent]) -> list[UsageEvent]:
        """Send one drained batch; return the events that were not acknowledged."""
        producer = self._producer
        assert producer is not None
        by_partition: dict[int, list[UsageEvent]] = {}
        for event in events:
            by_partition.setdefault(self._partition(event.tenant_id), []).append(event)
        in_flight: list[tuple[asyncio.Future[object], int, list[UsageEvent]]] = []
        failed: list[UsageEvent] = []
        for partition, items in by_partition.items():
            start = 0
            while start < len(items):
                batch = producer.create_batch()
                count = 0
                for event in items[start:]:
                    key, value, headers = usage_key(event.tenant_id), encode(event), usage_headers(event)
                    if batch.append(key=key, value=value, timestamp=None, headers=headers) is None:
                        break
                    count += 1
                chunk = items[start : start + max(count, 1)]
                start += len(chunk)
                if count == 0:
                    log.error("usage event %s does not fit in a batch; it stays queued", chunk[0].event_id)
                    failed.extend(chunk)
                    continue
                batch.close()
                try:
                    future = await producer.send_batch(batch, self._topic, partition=partition)
                except KafkaError as exc:
                    log.warning("sending %d usage events failed: %r", len(chunk), exc)
                    failed.extend(chunk)
                    continue
                in_flight.append((future, partition, chunk))
        results = await asyncio.gather(*(future for future, _, _ in in_flight), return_exceptions=True)
        for (_, partition, chunk), result in zip(in_flight, results):
            if isinstance(result, BaseException):
                log.warning("usage batch of %d events to partition %d failed: %r", len(chunk), partition, result)
                failed.extend(chunk)
                continue
            base = result.offset  # type: ignore[attr-defined]
            self.stats.delivered += len(chunk)
            if self._on_delivered is not None:
                for index, event in enumerate(chunk):
                    self._on_delivered(event, partition, base + index)
        return failed
