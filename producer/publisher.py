"""The usage publisher: the hot path only appends to a queue; a background task ships batches.

A call never awaits the broker. The sender drains up to ``batch_max`` events, groups them by the
partition their tenant key hashes to (``transport.partitioning``: Kafka's murmur2, as the Java
client does), sends one aiokafka batch per partition (``producer.sending``), and reports each
event's offset once the broker acknowledges it, which is what lets the snapshot tell its own
spend apart from what a notice already covers.

When Kafka is away or slow (a batch not acknowledged within ``send_timeout_s``), events go to the
on-disk spool and are delivered from there (``producer.spool_policy``). ``stop()`` spools what it
could not deliver in time; the next start on the host delivers it. After a failed send the Kafka
producer is replaced by a new one, and closed within a bound.

Started ``offline`` (the store's degraded start: Kafka did not answer), the publisher takes events
as usual but writes every one to the spool and sends nothing until ``connect()`` (once the topics
are known to exist and their partition count is known); then the spool is delivered first.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from producer.config import ProducerConfig
from producer.encoding import encode_event
from producer.errors import PublisherError, WaitTimeoutError
from producer.sending import close_within, new_producer, send_batches
from producer.spool import Spool
from producer.spool_policy import NoSpool, SpoolPolicy
from schemas.wire import UsageLike
from transport.partitioning import TenantPartitioner

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
        self._acked = asyncio.Event()  # set whenever stats.delivered grows: what flush() waits on
        self._producer: AIOKafkaProducer | None = None
        self._task: asyncio.Task[None] | None = None
        self.stats = PublisherStats()
        self.partitioner = TenantPartitioner()  # its count is the usage topic's, known once started
        # The usage partition a tenant's events go to; the store asks it which aggregator judges a tenant.
        self.partition_of = self.partitioner.partition
        self.spool: SpoolPolicy | NoSpool = (
            SpoolPolicy(Spool(config.spool_dir, config.spool_max_bytes), config.spool_full_policy, self.stats)
            if config.spool_dir
            else NoSpool()
        )
        self._in_flight: list[UsageLike] = []
        # Encoded values of queued events given to ``publish``, by event id; what is missing is encoded when sent.
        # Sent or spooled, an event's entry is taken out; bounded for a queue that Kafka does not drain.
        self._wire: dict[str, bytes] = {}
        self._wire_max = 2 * config.batch_max
        self._closing: set[asyncio.Task[None]] = set()
        self._accepting = False
        self._stopping = False
        self._offline = False

    @property
    def offline(self) -> bool:
        """Started without Kafka (``start(offline=True)``) and not yet ``connect()``-ed: every event
        goes to the spool."""
        return self._offline

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def spool_pending(self) -> int:
        return self.spool.pending

    @property
    def spool_full(self) -> bool:
        """The spool refused events (policy ``block``: the store refuses new calls meanwhile)."""
        return self.spool.full

    async def start(self, *, offline: bool = False) -> None:
        """Connect and start shipping. ``offline``: connect later (``connect()``); until then every
        event goes to the spool (``PublisherError`` without one: nothing could keep the events)."""
        if self._task is not None:
            return
        if offline:
            if isinstance(self.spool, NoSpool):
                raise PublisherError("the publisher cannot start offline without a spool directory")
            # Provisional, until connect() learns the topic's count: only which aggregator's
            # silence the store consults depends on it meanwhile, and none is heard from offline.
            self.partitioner.partitions = self._config.topics.partitions
            self._offline = True
        else:
            producer, partitions = await self._connected_producer()
            self._producer = producer
            self.partitioner.partitions = partitions
            self._offline = False
        self.spool.open()
        self._accepting = True
        self._stopping = False
        self._task = asyncio.create_task(self._run(), name="tokenguard-publisher")

    async def connect(self) -> None:
        """Leave offline mode: connect (the usage topic must exist), learn its partition count,
        then deliver the spool and what follows it. Raises the Kafka client's error if Kafka does
        not answer (the caller retries). No-op unless offline."""
        if not self._offline:
            return
        producer, partitions = await self._connected_producer()
        if partitions != self.partitioner.partitions:
            self.partitioner = TenantPartitioner(partitions)
            self.partition_of = self.partitioner.partition
        self._producer = producer
        self._offline = False
        self._wakeup.set()

    async def _connected_producer(self) -> tuple[AIOKafkaProducer, int]:
        producer = new_producer(self._config)
        try:
            await producer.start()
            partitions = await producer.partitions_for(self._topic)
        except BaseException:
            await close_within(producer, 1.0)
            raise
        return producer, len(partitions)

    async def _replace_producer(self) -> None:
        """After a failed send, start over with a new producer (a new producer id).

        An idempotent producer whose batches were abandoned on a timeout keeps sequence numbers
        the broker will never see, and every later batch fails with OutOfOrderSequenceNumber.
        The abandoned events are spooled and sent again; the aggregator drops repeats by id.
        """
        old, self._producer = self._producer, None
        if old is not None:
            closing = asyncio.create_task(close_within(old, self._config.send_timeout_s))
            self._closing.add(closing)
            closing.add_done_callback(self._closing.discard)

    async def _ready_producer(self) -> AIOKafkaProducer | None:
        if self._producer is None:
            producer = new_producer(self._config)
            try:
                await asyncio.wait_for(producer.start(), self._config.send_timeout_s)
            except (TimeoutError, KafkaError, OSError) as exc:
                log.debug("Kafka producer could not start yet: %r", exc)
                await close_within(producer, 1.0)
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
        self._queue.extend(self.spool.spill(leftover, self._wire))
        producer, self._producer = self._producer, None
        if producer is not None:
            await close_within(producer, timeout)
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
        self.spool.close()
        if self._queue:
            log.error("usage publisher stopped with %d events neither delivered nor spooled", len(self._queue))

    async def __aenter__(self) -> UsagePublisher:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @property
    def settled(self) -> int:
        """How many of the events published so far are acknowledged by Kafka or in the spool:
        exactly the first ``settled`` of them, since the queue is FIFO and one batch is in flight
        at a time (``producer.journal`` deletes what they fill)."""
        return self.stats.published - len(self._queue) - len(self._in_flight)

    def publish(self, event: UsageLike, encoded: bytes | None = None) -> None:
        """Queue one event for delivery. Constant time; never awaits. ``encoded``: the event's
        ``encode_usage`` bytes when the caller has them already (the store's journal), so the
        sender does not encode it again."""
        if not self._accepting:
            raise PublisherError("the usage publisher is not running: call start() first")
        if encoded is not None:
            wire = self._wire
            if len(wire) >= self._wire_max:  # a cache, bounded: what it dropped is encoded again
                wire.clear()
            wire[event.event_id] = encoded
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
        target = self.stats.published
        try:
            async with asyncio.timeout(timeout):
                while self.stats.delivered < target:
                    self._acked.clear()
                    await self._acked.wait()
        except TimeoutError:
            raise WaitTimeoutError(f"{target - self.stats.delivered} usage events not delivered within {timeout}s") from None

    async def _run(self) -> None:
        backoff = 0.1
        while True:
            if self._offline:
                # No Kafka yet: straight to the spool, in order (refused ones wait in memory, in front).
                if self._queue:
                    self._queue.extendleft(reversed(self.spool.spill(self._drain_queue(), self._wire)))
                if self._stopping:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if self.spool.pending:
                # Catching up: later events queue behind the spooled ones, in order.
                self._queue.extendleft(reversed(self.spool.spill(self._drain_queue(), self._wire)))
                if await self.spool.deliver(self._send_within_timeout, self._config.batch_max):
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
            refused = self.spool.spill(failed, self._wire)
            self._queue.extendleft(reversed(refused))  # the spool refused them: keep them in memory, in front
            if self._stopping and refused:
                return
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    def _drain_queue(self, limit: int | None = None) -> list[UsageLike]:
        take = len(self._queue) if limit is None else min(limit, len(self._queue))
        return [self._queue.popleft() for _ in range(take)]

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
        acked, failed = await send_batches(producer, self._topic, events, self.partition_of, self._wire, self._encode_ahead)
        for partition, base, chunk in acked:
            self._acknowledged(chunk, partition, base, own)
        return failed

    def _encode_ahead(self) -> None:
        """While a batch is on its way to the broker, encode the next one's events (still queued:
        nothing about their order or delivery changes), so the broker's work and ours overlap."""
        wire = self._wire
        if len(wire) >= self._wire_max:
            return
        for event in itertools.islice(self._queue, self._config.batch_max):
            if event.event_id not in wire:
                wire[event.event_id] = encode_event(event)

    def _acknowledged(self, chunk: list[UsageLike], partition: int, base: int, own: set[str] | None) -> None:
        self.stats.delivered += sum(1 for e in chunk if own is None or e.event_id in own)
        self._acked.set()
        if self._on_delivered is None:
            return
        for index, event in enumerate(chunk):
            # Events adopted from another process's spool were never in this snapshot.
            if own is None or event.event_id in own:
                self._on_delivered(event, partition, base + index)

