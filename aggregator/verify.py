"""The independent verifier: recompute totals from the usage topic and compare with the changelog.

``Recompute`` is deliberately simpler than the aggregator: no offsets, no windows, no restore; it
accepts each record by the same rules (``aggregator.intake``: valid, on its key's partition, ids
that agree), each value decided by the pydantic model itself (the aggregator's compiled decoder is
what it judges, so not what it judges with), drops every repeat of a (tenant, event id) (not only those within a window), counts
the same identity with other content as a conflict, and sums. Billing consumers can use it as it
is to rebuild totals from a replay.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

from aggregator.changelog import read_changelog, read_sealed
from aggregator.intake import Identity, UsageRecord, accept, fingerprint, identity
from aggregator.limits import load_policies
from schemas.errors import DecodeError
from schemas.policy import COUNTER_PREFIX, parse_counter_key
from schemas.rulebook import RuleBook
from schemas.sealed import SealedTotals, seal_time
from schemas.topics import TopicLayout
from schemas.totals import TotalsRecord
from schemas.usage import UsageEvent
from schemas.windows import window_value_end
from schemas.wire import decode_usage_record_model
from transport.admin import committed_offsets, topic_partitions
from transport.connection import KafkaConnection
from transport.fetch import Unreadable
from transport.reading import end_offsets, offset_bounds, read_ranges

Key = tuple[str, str]


@dataclass(frozen=True)
class KeyTotals:
    used: int
    events: int


class Recompute:
    """Feed it the usage topic's records (``partitions``: the topic's partition count); it sums
    each (tenant, event id) once per (tenant, period), and, given ``rules``, once in the counter
    of every rule it matches (``RuleBook.counters``, as the aggregator counts)."""

    def __init__(self, partitions: int, rules: RuleBook | None = None, seal_grace_s: float | None = None) -> None:
        self.partitions = partitions
        self.rules = rules
        # With a grace, an event appended after its period's seal time (``schemas.sealed``) is
        # counted in ``late`` (key -> event id -> tokens), not in its tenant-period.
        self.seal_grace_s = seal_grace_s
        self.late: dict[Key, dict[str, int]] = {}
        self.partition_of: dict[Key, int] = {}
        self._used: dict[Key, int] = {}
        self._events: dict[Key, int] = {}
        self._seen: dict[Identity, int] = {}
        self.invalid: Counter[str] = Counter()
        self.duplicates = 0
        self.records = 0

    def add(self, record: UsageRecord) -> UsageEvent | None:
        """The event if it counted; None when invalid (counted by reason) or a repeat."""
        self.records += 1
        try:
            event = accept(record, self.partitions, decode_usage_record_model)
        except DecodeError as exc:
            self.invalid[exc.reason] += 1
            return None
        who, content = identity(event), fingerprint(event)
        seen = self._seen.get(who)
        if seen is not None:
            if seen == content:
                self.duplicates += 1
            else:
                self.invalid["id_conflict"] += 1
            return None
        self._seen[who] = content
        appended = getattr(record, "timestamp", None)
        if self.seal_grace_s is not None and appended is not None:
            when = seal_time(event.period_key, self.seal_grace_s)
            if when is not None and appended / 1000 > when:
                self.late.setdefault((event.tenant_id, event.period_key), {})[event.event_id] = event.total_tokens
                for key, amount in self._counted(event)[1:]:  # its rule counters still count it
                    self._count(key, amount, record.partition)
                return event
        for key, amount in self._counted(event):
            self._count(key, amount, record.partition)
        return event

    def _count(self, key: Key, amount: int, partition: int) -> None:
        self._used[key] = self._used.get(key, 0) + amount
        self._events[key] = self._events.get(key, 0) + 1
        self.partition_of[key] = partition

    def _counted(self, event: UsageEvent) -> list[tuple[Key, int]]:
        counted = [((event.tenant_id, event.period_key), event.total_tokens)]
        if self.rules is not None:
            found = self.rules.counters(event.tenant_id, event, event.attributes, event.event_time)
            counted += [((event.tenant_id, key), amount) for key, amount in found]
        return counted

    def unreadable(self, skipped: Unreadable) -> None:
        """A record the Kafka client could not parse: never counted (the aggregator dead-letters it)."""
        self.records += 1
        self.invalid["unreadable_record"] += 1

    def keys_of(self, event: UsageEvent) -> list[Key]:
        """The keys ``event`` counts in: its tenant-period and its rule counters."""
        return [key for key, _ in self._counted(event)]

    def forget(self, event: UsageEvent) -> None:
        """Take back a counted event (its id stays seen: repeats of it still count as repeats)."""
        for key, amount in self._counted(event):
            self._used[key] -= amount
            self._events[key] -= 1
            if not self._events[key]:
                del self._used[key], self._events[key], self.partition_of[key]

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


def compare(expected: dict[Key, KeyTotals], actual: Mapping[Key, TotalsRecord | SealedTotals]) -> list[Difference]:
    differences = []
    for key in sorted(set(expected) | set(actual)):
        want = expected.get(key)
        record = actual.get(key)
        have = KeyTotals(record.used_tokens, record.event_count) if record is not None else None
        if want != have:
            differences.append(Difference(key, want, have))
    return differences


@dataclass(frozen=True)
class Unverifiable:
    """A key some of whose events the topic no longer holds (its first event is before its usage
    partition's log start): the changelog's totals cannot be recomputed, only kept."""

    key: Key
    changelog: KeyTotals
    retained: KeyTotals | None
    log_start: int

    def __str__(self) -> str:
        kept = "none" if self.retained is None else f"{self.retained.used} tokens / {self.retained.events} events"
        return (f"{self.key[0]!r} {self.key[1]!r}: not verifiable, events before the log start "
                f"(offset {self.log_start}): aggregator {self.changelog.used} tokens / "
                f"{self.changelog.events} events, still on the topic {kept}")


def truncated(record: TotalsRecord | SealedTotals, log_starts: dict[int, int]) -> bool:
    """Whether some of a key's events may be gone from the usage topic: its first event lies before
    its partition's log start (retention or DeleteRecords moved it); for a record that does not
    say where its first event was, whenever the partition has lost any record."""
    start = log_starts.get(record.usage_partition, 0)
    if start <= 0:
        return False
    return record.first_offset is None or record.first_offset < start


@dataclass
class VerifyReport:
    records: int = 0
    keys: int = 0
    events: int = 0  # events counted, once each (not once per rule counter they are also in)
    duplicates: int = 0
    invalid: dict[str, int] = field(default_factory=dict)
    lag: int = 0
    differences: list[Difference] = field(default_factory=list)
    changelog_rejected: Counter[str] = field(default_factory=Counter)
    expired: int = 0
    unverifiable: list[Unverifiable] = field(default_factory=list)
    sealed: int = 0  # sealed tenant-periods compared with their SealedTotals
    adjustments: int = 0


async def group_lag(connection: KafkaConnection, group_id: str, topic: str) -> int:
    """Usage records the aggregator group has not committed yet, over all partitions."""
    ends = await end_offsets(connection, topic)
    committed = await committed_offsets(connection, group_id, topic)
    return sum(end - committed.get(p, 0) for p, end in ends.items())


async def verify(
    connection: KafkaConnection, layout: TopicLayout, group_id: str, *, wait_s: float = 60.0,
    rules: RuleBook | None = None, rate_window_keep_s: float = 60.0, seal_grace_s: float | None = None,
) -> VerifyReport:
    """Wait (up to ``wait_s``) for the group to catch up, then recompute and compare.

    Meant for a drained stream: events published while it runs show up as differences. A key
    whose first event is before its partition's log start (retention deleted some of its events)
    is not compared: it is reported in ``unverifiable`` with both figures. Rule
    counters are recomputed with ``rules`` (default: the rules on the limits topic now); a rule
    counter the aggregator has dropped (its window ended over ``rate_window_keep_s`` ago) is not
    a difference (``report.expired`` counts them): those counters enforce, they do not bill.
    """
    report = VerifyReport()
    deadline = time.monotonic() + wait_s
    while (lag := await group_lag(connection, group_id, layout.usage)) > 0 and time.monotonic() < deadline:  # noqa: ASYNC110 - polls the broker
        await asyncio.sleep(0.5)
    report.lag = lag
    partitions = await topic_partitions(connection, layout.usage)
    if rules is None:
        rules = (await load_policies(connection, layout.limits)).rules
    recompute = Recompute(len(partitions), rules, seal_grace_s)
    ranges = {p: (None, None) for p in partitions}
    async for records in read_ranges(connection, layout.usage, ranges, on_unreadable=recompute.unreadable):
        for record in records:
            recompute.add(record)
    expected = recompute.totals()
    log_starts, usage_ends = await offset_bounds(connection, layout.usage)
    actual: dict[Key, TotalsRecord | SealedTotals] = dict(await read_changelog(
        connection, layout.totals, usage_ends=usage_ends, partition_count=len(partitions),
        rejected=report.changelog_rejected,
    ))
    report.records = recompute.records
    report.keys = len(expected)
    report.events = sum(t.events for key, t in expected.items() if not key[1].startswith(COUNTER_PREFIX))
    report.duplicates = recompute.duplicates
    report.invalid = dict(recompute.invalid)
    ended_before = time.time() - rate_window_keep_s
    for key in [k for k in expected if k not in actual and _window_ended(k[1], ended_before)]:
        del expected[key]
        report.expired += 1
    if seal_grace_s is not None:
        sealed, adjustments = await read_sealed(connection, layout.sealed, report.changelog_rejected)
        report.sealed = len(sealed)
        for key, closed in sealed.items():
            actual.setdefault(key, closed)
        for key in sorted(set(recompute.late) | set(adjustments)):
            want, have_ids = recompute.late.get(key, {}), adjustments.get(key, {})
            report.adjustments += len(have_ids)
            if want != have_ids:
                report.differences.append(Difference(
                    (key[0], f"{key[1]} (adjustments)"), KeyTotals(sum(want.values()), len(want)),
                    KeyTotals(sum(have_ids.values()), len(have_ids))))
    for key, record in list(actual.items()):
        have = KeyTotals(record.used_tokens, record.event_count)
        if expected.get(key) != have and truncated(record, log_starts):
            report.unverifiable.append(Unverifiable(key, have, expected.pop(key, None), log_starts[record.usage_partition]))
            del actual[key]
    report.differences = compare(expected, actual) + report.differences
    return report


def _window_ended(period_key: str, before: float) -> bool:
    """Whether a rule counter's window ended before ``before``, as the aggregator's expiry judges it."""
    parsed = parse_counter_key(period_key)
    end = window_value_end(parsed[2]) if parsed else None
    return end is not None and end < before
