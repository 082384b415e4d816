"""Kafka -> limits table: every aggregator reads the whole compacted limits topic.

At start it reads to the end before any usage is judged; afterwards each change (a new limit, or
a tombstone that removes one) is applied at once and the affected keys are re-judged.

Anyone who can write the topic can write anything to it. A record that is not a limit (a key that
is not ours, a value that does not decode, a key naming one tenant and a value another) is
skipped, counted and logged by the follower with its partition and offset; the records after it
are applied as if it were not there.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from aiokafka import AIOKafkaProducer
from aiokafka.structs import ConsumerRecord

from aggregator.config import AggregatorConfig
from aggregator.state import Limits
from schemas.errors import DecodeError
from schemas.limits import QuotaLimit
from schemas.policy import QuotaRule, rule_key
from schemas.rules import (
    MAX_LIMIT_KEY_BYTES,
    LimitRecord,
    PolicyRecord,
    RuleRecord,
    read_policy_record,
    tenant_of_limit_key,
)
from schemas.topics import TopicLayout
from schemas.wire import encode, limit_key
from transport.connection import KafkaConnection
from transport.follower import TopicFollower

log = logging.getLogger(__name__)

__all__ = [
    "MAX_LIMIT_KEY_BYTES", "LimitsFeed", "delete_limit", "delete_rule", "load_policies", "tenant_of_limit_key",
    "write_limit", "write_rule",
]

OnChange = Callable[[str | None], Awaitable[None]]


class LimitsFeed:
    """Keeps a ``Limits`` table current; ``on_change`` re-judges the affected keys."""

    def __init__(self, config: AggregatorConfig, limits: Limits, *, on_change: OnChange) -> None:
        self._limits = limits
        self._on_change = on_change
        self._loaded = False
        self._follower = TopicFollower(
            config.connection, config.topics.limits, self._take_all, client_id=f"{config.aggregator_id}-limits"
        )

    @property
    def invalid(self) -> int:
        """Records skipped: not limits, not readable, or not parseable by the Kafka client."""
        return sum(self._follower.skipped.values())

    @property
    def skipped(self) -> dict[str, int]:
        """Skipped records per reason."""
        return dict(self._follower.skipped)

    @property
    def failed(self) -> BaseException | None:
        """Why following the limits topic stopped, if it did: later limits are not applied then."""
        return self._follower.failed

    async def start(self) -> None:
        """Return once every limit on the topic is loaded; then follow changes."""
        await self._follower.start()
        self._loaded = True
        log.info("limits loaded: %d tenants, default %s", len(self._limits.per_tenant), self._limits.topic_default)

    async def stop(self) -> None:
        await self._follower.stop()

    async def _take_all(self, records: list[ConsumerRecord]) -> None:
        for record in records:
            applied, tenant_id = self._take(record)
            if applied and self._loaded:
                await self._on_change(tenant_id)

    def _take(self, record: ConsumerRecord) -> tuple[bool, str | None]:
        """Apply one record; (applied, the tenant whose keys to re-judge, None for every tenant)."""
        try:
            change = read_policy_record(record.key, record.value)
        except DecodeError as exc:
            return self._skip(record, exc.reason, exc.detail)
        return True, apply_policy(self._limits, change)

    def _skip(self, record: ConsumerRecord, reason: str, detail: str) -> tuple[bool, None]:
        self._follower.skip(partition=record.partition, offset=record.offset, reason=reason, detail=detail)
        return False, None


def apply_policy(limits: Limits, change: PolicyRecord) -> str | None:
    """Apply one record of the limits topic to ``limits``; the tenant whose keys it can change
    (None: every tenant's, for a default limit or rule, or a price)."""
    if isinstance(change, LimitRecord):
        if change.limit is None:
            limits.delete(change.tenant_id)
        else:
            limits.set(change.limit)
        return change.tenant_id
    limits.rules.take(change)
    return change.tenant_id if isinstance(change, RuleRecord) else None


async def load_policies(connection: KafkaConnection, topic: str, limits: Limits | None = None) -> Limits:
    """Every limit, rule and price on the limits topic as it is now (read once, to its end): for
    the verifier, replay, the simulator and the CLI. Records that are not ours are skipped."""
    limits = limits if limits is not None else Limits()

    async def take(records: list[ConsumerRecord]) -> None:
        for record in records:
            try:
                apply_policy(limits, read_policy_record(record.key, record.value))
            except DecodeError:
                continue

    follower = TopicFollower(connection, topic, take, client_id="tokenguard-limits-reader")
    await follower.start()
    await follower.stop()
    return limits


async def write_rule(connection: KafkaConnection, layout: TopicLayout, rule: QuotaRule) -> None:
    """Set a quota rule (a tenant's, or with ``tenant_id=None`` every tenant's) on the limits topic."""
    await _write(connection, layout.limits, rule_key(rule.tenant_id, rule.name), encode(rule))


async def delete_rule(connection: KafkaConnection, layout: TopicLayout, tenant_id: str | None, name: str) -> None:
    """Remove a quota rule (a tombstone); its counters stop being judged."""
    await _write(connection, layout.limits, rule_key(tenant_id, name), None)


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
