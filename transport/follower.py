"""Read every partition of a compacted topic from the beginning, then keep following it.

No consumer group: each reader needs the whole topic, not a share of it. Reading a compacted
topic from the beginning rebuilds the latest value of every key; the notices feed, the
aggregator's limits feed and notices watch, and the demo's watcher are all built on this.

Anyone who can write a topic can write anything to it, so a follower survives any record:

- a record the Kafka client cannot parse (``transport.fetch.getmany_safe``) is skipped by offset;
- a record the handler raises on is skipped: the batch is handed over again one record at a time,
  so only the bad record is lost (handlers of a compacted topic apply "latest value per key",
  which a repeat leaves as it was);
- a handler that cannot read a record calls ``skip()`` itself.

Each skip is counted per reason (``skipped``) and logged with its partition and offset, at error
level the first time a reason is seen on the topic, at debug level afterwards: a flood of garbage
does not flood the log. If following stops for any other reason, it does not stop silently: the
error is logged with its traceback and kept in ``failed``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Awaitable, Callable

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.structs import ConsumerRecord

from transport.admin import close_consumer, reached, start_consumer, topic_partitions
from transport.connection import KafkaConnection
from transport.fetch import getmany_safe

log = logging.getLogger(__name__)

RecordsHandler = Callable[[list[ConsumerRecord]], Awaitable[None]]

# A retriable Kafka error (a leader moving, a broker restarting) pauses following this long at most.
MAX_BACKOFF_S = 5.0


class TopicFollower:
    """``start()`` returns once the topic is read to where it ended at start (or ``catch_up_s``
    passed: then it raises ``TimeoutError`` if ``strict``, else logs and goes on following)."""

    def __init__(
        self,
        connection: KafkaConnection,
        topic: str,
        on_records: RecordsHandler,
        *,
        client_id: str,
        catch_up_s: float = 30.0,
        strict: bool = True,
    ) -> None:
        self._connection = connection
        self._topic = topic
        self._on_records = on_records
        self._client_id = client_id
        self._catch_up_s = catch_up_s
        self._strict = strict
        self._consumer: AIOKafkaConsumer | None = None
        self._reading: AIOKafkaConsumer | None = None  # the live consumer, from before catch-up
        self._task: asyncio.Task[None] | None = None
        self._failed: BaseException | None = None
        self._logged: set[str] = set()
        self.skipped: Counter[str] = Counter()
        self.batches = asyncio.Event()

    @property
    def topic(self) -> str:
        return self._topic

    @property
    def failed(self) -> BaseException | None:
        """Why following stopped, if it stopped by itself; None while it runs (or after ``stop()``)."""
        return self._failed

    async def start(self) -> None:
        if self._consumer is not None:
            return
        self._failed = None
        tps = [TopicPartition(self._topic, p) for p in await topic_partitions(self._connection, self._topic)]
        consumer = AIOKafkaConsumer(
            **self._connection.client_kwargs(),
            client_id=self._client_id,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=50,
        )
        await start_consumer(consumer)
        self._reading = consumer
        try:
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            ends = await consumer.end_offsets(tps)
            try:
                async with asyncio.timeout(self._catch_up_s):
                    while not await reached(consumer, ends):
                        await self._poll(consumer)
            except TimeoutError:
                if self._strict:
                    raise
                log.warning("%s not read to its end within %.0fs; going on with what was read", self._topic, self._catch_up_s)
        except BaseException:
            self._reading = None
            await close_consumer(consumer)
            raise
        self._consumer = consumer
        self._task = asyncio.create_task(self._follow(consumer), name=f"follow-{self._topic}")

    async def wait_until(self, predicate: Callable[[], bool], timeout: float) -> None:
        """Wait until ``predicate()`` holds, re-checking after every batch read (``TimeoutError``
        after ``timeout``): what a reader of the followed state awaits instead of sleeping."""
        async with asyncio.timeout(timeout):
            while not predicate():
                self.batches.clear()
                await self.batches.wait()

    async def stop(self) -> None:
        """Idempotent."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        consumer, self._consumer = self._consumer, None
        self._reading = None
        if consumer is not None:
            await close_consumer(consumer)

    async def end_offsets(self, topic: str, partitions: list[int]) -> dict[int, int]:
        """End offsets of ``partitions`` of any ``topic``, asked with this follower's consumer (no
        new connection). Only for partitions that exist: aiokafka waits for others until its
        request timeout."""
        consumer = self._reading
        if consumer is None:
            raise RuntimeError(f"the follower of {self._topic} is not running")
        ends = await consumer.end_offsets([TopicPartition(topic, p) for p in partitions])
        return {tp.partition: offset for tp, offset in ends.items()}

    def skip(self, *, partition: int, offset: int, reason: str, detail: str = "", error: BaseException | None = None) -> None:
        """Count a record this follower's reader could not use and log it (loudly once per reason)."""
        self.skipped[reason] += 1
        first = reason not in self._logged
        if first:
            self._logged.add(reason)
        log.log(
            logging.ERROR if first else logging.DEBUG,
            "skipped record %s:%d:%d (%s%s)%s", self._topic, partition, offset, reason,
            f": {detail[:200]}" if detail else "",
            "; later records skipped for this reason are counted, logged at debug level" if first else "",
            exc_info=error if first and error is not None else None,
        )

    async def _poll(self, consumer: AIOKafkaConsumer) -> None:
        batches, unreadable = await getmany_safe(consumer, timeout_ms=200, max_records=10_000)
        for bad in unreadable:
            self.skip(partition=bad.partition, offset=bad.offset, reason="unreadable", detail=bad.error)
        for records in batches.values():
            await self._deliver(records)
        if batches or unreadable:
            self.batches.set()

    async def _deliver(self, records: list[ConsumerRecord]) -> None:
        """Hand a batch to the handler; if it raises, hand the records one by one and skip the
        ones it raises on, so one bad record costs only itself."""
        try:
            await self._on_records(records)
            return
        except Exception as exc:
            if len(records) == 1:
                self._handler_failed(records[0], exc)
                return
        for record in records:
            try:
                await self._on_records([record])
            except Exception as exc:
                self._handler_failed(record, exc)

    def _handler_failed(self, record: ConsumerRecord, error: Exception) -> None:
        self.skip(partition=record.partition, offset=record.offset, reason=f"handler raised {type(error).__name__}",
                  detail=str(error)[:200], error=error)

    async def _follow(self, consumer: AIOKafkaConsumer) -> None:
        backoff = 0.1
        while True:
            try:
                await self._poll(consumer)
                backoff = 0.1
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if getattr(exc, "retriable", False):
                    log.warning("following %s: %r; retrying in %.1fs", self._topic, exc, backoff)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, MAX_BACKOFF_S)
                    continue
                self._failed = exc
                log.error("following %s stopped: what it feeds is no longer updated", self._topic, exc_info=exc)
                return
