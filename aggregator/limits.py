"""Kafka -> limits table: every aggregator reads the whole compacted limits topic.

At start it reads to the end before any usage is judged; afterwards each change (a new limit, or
a tombstone that removes one) is applied at once and the affected keys are re-judged.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable

from aiokafka import AIOKafkaProducer
from aiokafka.structs import ConsumerRecord

from aggregator.config import AggregatorConfig
from aggregator.state import Limits
from producer.follower import TopicFollower
from schemas.errors import DecodeError
from producer.config import KafkaConnection
from schemas.limits import QuotaLimit
from schemas.topics import TopicLayout
from schemas.wire import decode_limit, encode, limit_key

log = logging.getLogger(__name__)

OnChange = Callable[[str | None], Awaitable[None]]


def tenant_of_limit_key(key: bytes | None) -> tuple[bool, str | None]:
    """(valid, tenant id or None for the default) from a limits record key."""
    try:
        parts = json.loads(key or b"")
    except ValueError:
        return False, None
    if parts == ["default"]:
        return True, None
    if isinstance(parts, list) and len(parts) == 2 and parts[0] == "tenant" and isinstance(parts[1], str):
        return True, parts[1]
    return False, None


class LimitsFeed:
    """Keeps a ``Limits`` table current; ``on_change`` re-judges the affected keys."""

    def __init__(self, config: AggregatorConfig, limits: Limits, *, on_change: OnChange) -> None:
        self._limits = limits
        self._on_change = on_change
        self._loaded = False
        self._follower = TopicFollower(
            config.connection, config.topics.limits, self._take_all, client_id=f"{config.aggregator_id}-limits"
        )
        self.invalid = 0

    async def start(self) -> None:
        """Return once every limit on the topic is loaded; then follow changes."""
        await self._follower.start()
        self._loaded = True
        log.info("limits loaded: %d tenants, default %s", len(self._limits.per_tenant), self._limits.topic_default)

    async def stop(self) -> None:
        await self._follower.stop()

    async def _take_all(self, records: list[ConsumerRecord]) -> None:
        for record in records:
            applied, tenant_id = self._take(record.key, record.value)
            if applied and self._loaded:
                await self._on_change(tenant_id)

    def _take(self, key: bytes | None, value: bytes | None) -> tuple[bool, str | None]:
        """Apply one limits record; (applied, tenant id or None for the default)."""
        valid, tenant_id = tenant_of_limit_key(key)
        if not valid:
            self.invalid += 1
            log.error("limits record with an unreadable key %r ignored", key)
            return False, None
        if value is None:
            self._limits.delete(tenant_id)
            return True, tenant_id
        try:
            limit = decode_limit(value)
        except DecodeError as exc:
            self.invalid += 1
            log.error("invalid limits record for %r ignored: %s", tenant_id, exc)
            return False, None
        if limit.tenant_id != tenant_id:
            self.invalid += 1
            log.error("limits record key names %r but its value names %r; ignored", tenant_id, limit.tenant_id)
            return False, None
        self._limits.set(limit)
        return True, tenant_id


async def write_limit(connection: KafkaConnection, layout: TopicLayout, limit: QuotaLimit) -> None:
    """Set a tenant's limit (or the default, ``tenant_id=None``) on the compacted limits topic."""
    await _write(connection, layout.limits, limit_key(limit.tenant_id), encode(limit))


async def delete_limit(connection: KafkaConnection, layout: TopicLayout, tenant_id: str | None) -> None:
    """Remove a tenant's limit (a tombstone); the next rule in line applies again."""
    await _write(connection, layout.limits, limit_key(tenant_id), None)


async def _write(connection: KafkaConnection, topic: str, key: bytes, value: bytes | None) -> None:
    producer = AIOKafkaProducer(**connection.client_kwargs(), client_id="tokenguard-limits-writer", acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(topic, value, key=key)
    finally:
        await producer.stop()
