"""The independent verifier: recompute totals from the usage topic and compare with the changelog.

``Recompute`` is deliberately simpler than the aggregator: no offsets, no windows, no restore; it
validates each record the same way, drops every repeated event id (not only those within a
window), and sums. Billing consumers can use it as it is to rebuild totals from a replay.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, TopicPartition

from aggregator.changelog import read_changelog, read_ranges
from producer.config import KafkaConnection
from producer.kafka_admin import close_consumer, committed_offsets, start_consumer, topic_partitions
from schemas.errors import DecodeError
from schemas.topics import TopicLayout
from schemas.totals import TotalsRecord
from schemas.usage import UsageEvent
from schemas.wire import decode_usage_record

Key = tuple[str, str]


@dataclass(frozen=True)
class KeyTotals:
    used: int
    events: int


class Recompute:
    """Feed it usage records in any order; it sums each event id once per (tenant, period)."""

    def __init__(self) -> None:
        self._used: dict[Key, int] = {}
        self._events: dict[Key, int] = {}
        self._seen: set[str] = set()
        self.invalid: Counter[str] = Counter()
        self.duplicates = 0
        self.records = 0

    def add(self, key: bytes | None, value: bytes | None) -> UsageEvent | None:
        """The event if it counted; None when invalid (counted by reason) or a repeat."""
        self.records += 1
        try:
            event = decode_usage_record(key, value)
        except DecodeError as exc:
            self.invalid[exc.reason] += 1
            return None
        if event.event_id in self._seen:
            self.duplicates += 1
            return None
        self._seen.add(event.event_id)
        period = (event.tenant_id, event.period_key)
        self._used[period] = self._used.get(period, 0) + event.total_tokens
        self._events[period] = self._events.get(period, 0) + 1
        return event

    def forget(self, event: UsageEvent) -> None:
        """Take back a counted event (its id stays seen: repeats of it still count as repeats)."""
        period = (event.tenant_id, event.period_key)
        self._used[period] -= event.total_tokens
        self._events[period] -= 1
        if not self._events[period]:
            del self._used[period], self._events[period]

    def totals(self) -> dict[Key, KeyTotals]:
        return {k: KeyTotals(self._used[k], self._events[k]) for k in self._used}


@dataclass(frozen=True)
class Difference:
    key: Key
    expected: KeyTotals | None
    actual: KeyTotals | None

    def __str__(self) -> str:
        def show(t: KeyTotals | None) -> str:
            return "missing" if t is None else f"{t.used} tokens / {t.events} events"

        return f"{self.key[0]!r} {self.key[1]!r}: recomputed {show(self.expected)}, aggregator {show(self.actual)}"


def compare(expected: dict[Key, KeyTotals], actual: dict[Key, TotalsRecord]) -> list[Difference]:
    differences = []
    for key in sorted(set(expected) | set(actual)):
        want = expected.get(key)
        record = actual.get(key)
        have = KeyTotals(record.used_tokens, record.event_count) if record is not None else None
        if want != have:
            differences.append(Difference(key, want, have))
    return differences


@dataclass
class VerifyReport:
    records: int = 0
    keys: int = 0
    events: int = 0
    duplicates: int = 0
    invalid: dict[str, int] = field(default_factory=dict)
    lag: int = 0
    differences: list[Difference] = field(default_factory=list)


async def end_offsets(connection: KafkaConnection, topic: str) -> dict[int, int]:
    partitions = await topic_partitions(connection, topic)
    consumer = AIOKafkaConsumer(**connection.client_kwargs(), group_id=None, enable_auto_commit=False)
    await start_consumer(consumer)
    try:
        ends = await consumer.end_offsets([TopicPartition(topic, p) for p in partitions])
    finally:
        await close_consumer(consumer)
    return {tp.partition: offset for tp, offset in ends.items()}


async def group_lag(connection: KafkaConnection, group_id: str, topic: str) -> int:
    """Usage records the aggregator group has not committed yet, over all partitions."""
    ends = await end_offsets(connection, topic)
    committed = await committed_offsets(connection, group_id, topic)
    return sum(end - committed.get(p, 0) for p, end in ends.items())


async def verify(
    connection: KafkaConnection, layout: TopicLayout, group_id: str, *, wait_s: float = 60.0
) -> VerifyReport:
    """Wait (up to ``wait_s``) for the group to catch up, then recompute and compare.

    Meant for a drained stream: events published while it runs show up as differences.
    """
    report = VerifyReport()
    deadline = time.monotonic() + wait_s
    while (lag := await group_lag(connection, group_id, layout.usage)) > 0 and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
    report.lag = lag
    recompute = Recompute()
    partitions = await topic_partitions(connection, layout.usage)
    async for records in read_ranges(connection, layout.usage, {p: (None, None) for p in partitions}):
        for record in records:
            recompute.add(record.key, record.value)
    expected = recompute.totals()
    actual = await read_changelog(connection, layout.totals)
    report.records = recompute.records
    report.keys = len(expected)
    report.events = sum(t.events for t in expected.values())
    report.duplicates = recompute.duplicates
    report.invalid = dict(recompute.invalid)
    report.differences = compare(expected, actual)
    return report
