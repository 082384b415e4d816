"""Kafka -> snapshot: every middleware process reads every partition of the notices topic.

No consumer group: each process needs all notices, not a share of them. The topic is compacted,
so reading it from the beginning at start rebuilds the current state of every tenant-period.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from aiokafka import AIOKafkaConsumer, TopicPartition

from producer.config import ProducerConfig
from producer.kafka_admin import reached, topic_partitions
from producer.snapshot import QuotaSnapshot
from schemas.errors import DecodeError
from schemas.notices import Heartbeat
from schemas.wire import decode_notice

log = logging.getLogger(__name__)


class NoticesFeed:
    """Keeps a ``QuotaSnapshot`` current with the aggregator's notices and heartbeats."""

    def __init__(self, config: ProducerConfig, snapshot: QuotaSnapshot) -> None:
        self._config = config
        self._snapshot = snapshot
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None
        self._end_at_start: dict[TopicPartition, int] = {}
        self.caught_up = asyncio.Event()
        self.undecodable = 0
        self._applied = asyncio.Event()

    async def start(self) -> None:
        """Start reading; return once the topic has been read to where it ended at start."""
        if self._consumer is not None:
            return
        topic = self._config.topics.notices
        consumer = AIOKafkaConsumer(
            **self._config.connection.client_kwargs(),
            client_id=f"tokenguard-notices-{self._config.instance_id}",
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=50,
        )
        partitions = await topic_partitions(self._config.connection, topic)
        await consumer.start()
        try:
            tps = [TopicPartition(topic, p) for p in partitions]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            self._end_at_start = await consumer.end_offsets(tps)
        except BaseException:
            await consumer.stop()
            raise
        self._consumer = consumer
        self._task = asyncio.create_task(self._run(), name="tokenguard-notices")
        try:
            await asyncio.wait_for(self.caught_up.wait(), self._config.catch_up_timeout_s)
        except asyncio.TimeoutError:
            log.warning("notices not read to the end within %.0fs; deciding on what was read", self._config.catch_up_timeout_s)

    async def stop(self) -> None:
        """Idempotent."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            await consumer.stop()

    async def __aenter__(self) -> NoticesFeed:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def wait_until(self, predicate: Callable[[QuotaSnapshot], bool], timeout: float) -> None:
        """Wait until ``predicate(snapshot)`` holds, re-checking after every batch of notices."""
        async with asyncio.timeout(timeout):
            while not predicate(self._snapshot):
                self._applied.clear()
                await self._applied.wait()

    async def _check_caught_up(self, consumer: AIOKafkaConsumer) -> None:
        if not self.caught_up.is_set() and await reached(consumer, self._end_at_start):
            self.caught_up.set()

    async def _run(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        snapshot = self._snapshot
        while True:
            await self._check_caught_up(consumer)
            batches = await consumer.getmany(timeout_ms=200, max_records=10_000)
            for records in batches.values():
                for record in records:
                    try:
                        message = decode_notice(record.value)
                    except DecodeError as exc:
                        self.undecodable += 1
                        log.warning("undecodable notice at %s:%d: %s", record.topic, record.offset, exc.reason)
                        continue
                    if isinstance(message, Heartbeat):
                        snapshot.apply_heartbeat(message)
                    else:
                        snapshot.apply_notice(message)
            if batches:
                self._applied.set()
