"""Kafka -> snapshot: every middleware process reads every partition of the notices topic.

The topic is compacted, so reading it from the beginning at start rebuilds the current state of
every tenant-period; afterwards each notice and heartbeat updates the snapshot as it arrives.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from aiokafka.structs import ConsumerRecord

from producer.config import ProducerConfig
from producer.follower import TopicFollower
from producer.snapshot import QuotaSnapshot
from schemas.errors import DecodeError
from schemas.notices import Heartbeat
from schemas.wire import decode_notice

log = logging.getLogger(__name__)


class NoticesFeed:
    """Keeps a ``QuotaSnapshot`` current with the aggregator's notices and heartbeats."""

    def __init__(self, config: ProducerConfig, snapshot: QuotaSnapshot) -> None:
        self._snapshot = snapshot
        self._follower = TopicFollower(
            config.connection,
            config.topics.notices,
            self._take,
            client_id=f"tokenguard-notices-{config.instance_id}",
            catch_up_s=config.catch_up_timeout_s,
            strict=False,
        )

    @property
    def undecodable(self) -> int:
        """Records skipped because they are not a notice or heartbeat (or not parseable at all)."""
        return sum(self._follower.skipped.values())

    @property
    def skipped(self) -> dict[str, int]:
        """Skipped records per reason."""
        return dict(self._follower.skipped)

    @property
    def failed(self) -> BaseException | None:
        """Why following the notices topic stopped, if it did. The snapshot then hears no more
        heartbeats, so the staleness policy takes over within ``stale_after_s``."""
        return self._follower.failed

    async def start(self) -> None:
        """Start reading; return once the topic has been read to where it ended at start."""
        await self._follower.start()

    async def stop(self) -> None:
        """Idempotent."""
        await self._follower.stop()

    async def __aenter__(self) -> NoticesFeed:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def wait_until(self, predicate: Callable[[QuotaSnapshot], bool], timeout: float) -> None:
        """Wait until ``predicate(snapshot)`` holds, re-checking after every batch of notices."""
        batches = self._follower.batches
        async with asyncio.timeout(timeout):
            while not predicate(self._snapshot):
                batches.clear()
                await batches.wait()

    async def _take(self, records: list[ConsumerRecord]) -> None:
        snapshot = self._snapshot
        for record in records:
            try:
                message = decode_notice(record.value)
            except DecodeError as exc:
                self._follower.skip(partition=record.partition, offset=record.offset, reason=exc.reason, detail=exc.detail)
                continue
            if isinstance(message, Heartbeat):
                snapshot.apply_heartbeat(message)
            else:
                snapshot.apply_notice(message)
