"""Read every partition of a compacted topic from the beginning, then keep following it.

No consumer group: each reader needs the whole topic, not a share of it. Reading a compacted
topic from the beginning rebuilds the latest value of every key; the notices feed and the
aggregator's limits feed are both built on this.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.structs import ConsumerRecord

from producer.config import KafkaConnection
from producer.kafka_admin import close_consumer, reached, start_consumer, topic_partitions

log = logging.getLogger(__name__)

RecordsHandler = Callable[[list[ConsumerRecord]], Awaitable[None]]


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
        self._task: asyncio.Task[None] | None = None
        self.batches = asyncio.Event()

    async def start(self) -> None:
        if self._consumer is not None:
            return
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
            await close_consumer(consumer)
            raise
        self._consumer = consumer
        self._task = asyncio.create_task(self._follow(consumer), name=f"follow-{self._topic}")

    async def stop(self) -> None:
        """Idempotent."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            await close_consumer(consumer)

    async def _poll(self, consumer: AIOKafkaConsumer) -> None:
        batches = await consumer.getmany(timeout_ms=200, max_records=10_000)
        for records in batches.values():
            await self._on_records(records)
        if batches:
            self.batches.set()

    async def _follow(self, consumer: AIOKafkaConsumer) -> None:
        while True:
            await self._poll(consumer)
