"""Exact totals per (tenant, period): pure logic, no I/O, so it is testable without a broker.

Every key remembers the usage offset through which it has applied events. After a crash the
consumer may re-read records whose effect the changelog already holds; ``apply`` skips them, which
is what makes the totals exact without Kafka transactions. Duplicates that arrive at a new offset
(same event id) are dropped by a per-partition window.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from aggregator.dedup import DedupWindow
from producer.periods import period_kind
from schemas.limits import QuotaLimit
from schemas.notices import QuotaState
from schemas.totals import TotalsRecord
from schemas.usage import UsageEvent

Key = tuple[str, str]


class Outcome(enum.Enum):
    APPLIED = "applied"
    REPLAY = "replay"  # this record's effect is already in the restored totals
    DUPLICATE = "duplicate"  # another record carried the same event id


@dataclass(slots=True)
class Totals:
    partition: int
    used: int = 0
    events: int = 0
    applied_offset: int = -1
    limit: int = 0
    state: QuotaState = "ok"
    event_quota: int | None = None


def classify(used: int, limit: int, warning_ratio: float) -> QuotaState:
    if used >= limit:
        return "exceeded"
    if used >= limit * warning_ratio:
        return "warning"
    return "ok"


class Limits:
    """Which limit applies: the tenant's own (limits topic), else the topic's default record, else
    the aggregator's configured default, else the quota the event carried from its middleware."""

    def __init__(self, default_limit: int | None = None, *, warning_ratio: float = 0.8) -> None:
        self.default_limit = default_limit
        self.warning_ratio = warning_ratio
        self.per_tenant: dict[str, QuotaLimit] = {}
        self.topic_default: QuotaLimit | None = None

    def set(self, limit: QuotaLimit) -> None:
        if limit.tenant_id is None:
            self.topic_default = limit
        else:
            self.per_tenant[limit.tenant_id] = limit

    def delete(self, tenant_id: str | None) -> None:
        if tenant_id is None:
            self.topic_default = None
        else:
            self.per_tenant.pop(tenant_id, None)

    def rule(self, tenant_id: str, period_key: str, event_quota: int | None) -> tuple[int, float]:
        """(limit, warning ratio) for one tenant-period."""
        for record in (self.per_tenant.get(tenant_id), self.topic_default):
            if record is not None and record.period in ("any", period_kind(period_key)):
                return record.limit_tokens, record.warning_ratio or self.warning_ratio
        if self.default_limit is not None:
            return self.default_limit, self.warning_ratio
        return (event_quota if event_quota is not None else 0), self.warning_ratio


class TotalsState:
    """Totals of the partitions this aggregator owns, plus what changed since the last flush."""

    def __init__(self, limits: Limits, *, dedup_window: int = 100_000) -> None:
        self.limits = limits
        self.dedup_window = dedup_window
        self.totals: dict[Key, Totals] = {}
        self.partition_offsets: dict[int, int] = {}
        self._windows: dict[int, DedupWindow] = {}
        self._dirty: set[Key] = set()
        self._notify: dict[Key, str] = {}

    def _window(self, partition: int) -> DedupWindow:
        window = self._windows.get(partition)
        if window is None:
            window = self._windows[partition] = DedupWindow(self.dedup_window)
        return window

    def restore(self, record: TotalsRecord) -> None:
        """Take a changelog record as the key's state (the latest record per key wins)."""
        self.totals[(record.tenant_id, record.period_key)] = Totals(
            partition=record.usage_partition,
            used=record.used_tokens,
            events=record.event_count,
            applied_offset=record.applied_offset,
            limit=record.limit_tokens,
            state=record.state,
            event_quota=record.event_quota_tokens,
        )

    def remember(self, partition: int, event_ids: Iterable[str]) -> None:
        """Seed a partition's dedup window with ids already processed before a restart."""
        window = self._window(partition)
        for event_id in event_ids:
            window.add(event_id)

    def apply(self, partition: int, offset: int, event: UsageEvent) -> Outcome:
        key = (event.tenant_id, event.period_key)
        window = self._window(partition)
        self.mark_position(partition, offset)
        totals = self.totals.get(key)
        if totals is not None and offset <= totals.applied_offset:
            window.add(event.event_id)
            return Outcome.REPLAY
        if event.event_id in window:
            return Outcome.DUPLICATE
        window.add(event.event_id)
        if totals is None:
            totals = self.totals[key] = Totals(partition=partition)
        totals.used += event.total_tokens
        totals.events += 1
        totals.applied_offset = offset
        totals.event_quota = event.quota_tokens
        self._dirty.add(key)
        self._evaluate(key, totals, "state_changed")
        return Outcome.APPLIED

    def _evaluate(self, key: Key, totals: Totals, reason: str) -> None:
        limit, warning_ratio = self.limits.rule(key[0], key[1], totals.event_quota)
        state = classify(totals.used, limit, warning_ratio)
        limit_changed = limit != totals.limit
        totals.limit = limit
        if state != totals.state or (limit_changed and reason == "limit_changed"):
            totals.state = state
            self._dirty.add(key)
            self._notify.setdefault(key, reason)

    def reevaluate(self, tenant_id: str | None) -> None:
        """After a limit change: one tenant's keys, or every key when the default changed."""
        for key, totals in self.totals.items():
            if tenant_id is None or key[0] == tenant_id:
                self._evaluate(key, totals, "limit_changed")

    def mark_position(self, partition: int, offset: int) -> None:
        """The consumer has passed ``offset`` (also for records that were dead-lettered)."""
        if offset > self.partition_offsets.get(partition, -1):
            self.partition_offsets[partition] = offset

    def take_changes(self) -> tuple[list[tuple[Key, Totals]], list[tuple[Key, Totals, str]]]:
        """(keys whose totals changed, keys to publish a notice for, with the reason) since last call."""
        dirty = [(key, self.totals[key]) for key in self._dirty]
        notify = [(key, self.totals[key], reason) for key, reason in self._notify.items()]
        self._dirty.clear()
        self._notify.clear()
        return dirty, notify

    def drop_partitions(self, partitions: set[int]) -> None:
        """Forget partitions another aggregator now owns; its restore brings their state back."""
        for key in [k for k, t in self.totals.items() if t.partition in partitions]:
            del self.totals[key]
            self._dirty.discard(key)
            self._notify.pop(key, None)
        for partition in partitions:
            self.partition_offsets.pop(partition, None)
            self._windows.pop(partition, None)

    def to_record(self, key: Key, totals: Totals, now: datetime) -> TotalsRecord:
        return TotalsRecord.model_construct(**self.record_fields(key, totals, now))

    @staticmethod
    def record_fields(key: Key, totals: Totals, now: datetime) -> dict[str, object]:
        """The changelog record's fields (``TotalsRecord``'s names), for ``wire.encode_fields``."""
        return {
            "tenant_id": key[0],
            "period_key": key[1],
            "used_tokens": totals.used,
            "event_count": totals.events,
            "limit_tokens": totals.limit,
            "state": totals.state,
            "usage_partition": totals.partition,
            "applied_offset": totals.applied_offset,
            "updated_at": now,
            "event_quota_tokens": totals.event_quota,
        }
