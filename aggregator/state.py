"""Exact totals per (tenant, period): pure logic, no I/O, so it is testable without a broker.

Every key remembers the usage offset through which it has applied events. After a crash the
consumer may re-read records whose effect the changelog already holds; ``apply`` skips them, which
is what makes the totals exact without Kafka transactions.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from schemas.notices import QuotaState
from schemas.totals import TotalsRecord
from schemas.usage import UsageEvent

Key = tuple[str, str]


@dataclass(slots=True)
class Totals:
    partition: int
    used: int = 0
    events: int = 0
    applied_offset: int = -1
    limit: int = 0
    state: QuotaState = "ok"


def classify(used: int, limit: int, warning_ratio: float) -> QuotaState:
    if used >= limit:
        return "exceeded"
    if used >= limit * warning_ratio:
        return "warning"
    return "ok"


class Limits:
    """Which limit applies to a tenant: its own, else the deployment default, else the event's."""

    def __init__(self, default_limit: int | None = None) -> None:
        self.default_limit = default_limit
        self.per_tenant: dict[str, int] = {}

    def limit_for(self, tenant_id: str, event_quota: int) -> int:
        limit = self.per_tenant.get(tenant_id)
        if limit is not None:
            return limit
        return self.default_limit if self.default_limit is not None else event_quota


class TotalsState:
    """Totals of the partitions this aggregator owns, plus what changed since the last flush."""

    def __init__(self, limits: Limits, *, warning_ratio: float = 0.8) -> None:
        self.limits = limits
        self.warning_ratio = warning_ratio
        self.totals: dict[Key, Totals] = {}
        self.partition_offsets: dict[int, int] = {}
        self._dirty: set[Key] = set()
        self._changed_state: set[Key] = set()

    def restore(self, record: TotalsRecord) -> None:
        """Take a changelog record as the key's state (the latest record per key wins)."""
        self.totals[(record.tenant_id, record.period_key)] = Totals(
            partition=record.usage_partition,
            used=record.used_tokens,
            events=record.event_count,
            applied_offset=record.applied_offset,
            limit=record.limit_tokens,
            state=record.state,
        )

    def apply(self, partition: int, offset: int, event: UsageEvent) -> bool:
        """Add one usage record; False when the changelog shows it was applied already."""
        key = (event.tenant_id, event.period_key)
        totals = self.totals.get(key)
        if totals is None:
            totals = self.totals[key] = Totals(partition=partition)
        if offset > self.partition_offsets.get(partition, -1):
            self.partition_offsets[partition] = offset
        if offset <= totals.applied_offset:
            return False
        totals.used += event.total_tokens
        totals.events += 1
        totals.applied_offset = offset
        totals.limit = self.limits.limit_for(event.tenant_id, event.quota_tokens)
        self._dirty.add(key)
        state = classify(totals.used, totals.limit, self.warning_ratio)
        if state != totals.state:
            totals.state = state
            self._changed_state.add(key)
        return True

    def mark_position(self, partition: int, offset: int) -> None:
        """The consumer has passed ``offset`` (also for records that were dead-lettered)."""
        if offset > self.partition_offsets.get(partition, -1):
            self.partition_offsets[partition] = offset

    def take_changes(self) -> tuple[list[tuple[Key, Totals]], list[tuple[Key, Totals]]]:
        """(keys whose totals changed, keys whose quota state changed) since the last call."""
        dirty = [(key, self.totals[key]) for key in self._dirty]
        changed = [(key, self.totals[key]) for key in self._changed_state]
        self._dirty.clear()
        self._changed_state.clear()
        return dirty, changed

    def drop_partitions(self, partitions: set[int]) -> None:
        """Forget partitions another aggregator now owns; its restore brings their state back."""
        for key in [k for k, t in self.totals.items() if t.partition in partitions]:
            del self.totals[key]
            self._dirty.discard(key)
            self._changed_state.discard(key)
        for partition in partitions:
            self.partition_offsets.pop(partition, None)

    def to_record(self, key: Key, totals: Totals, now: datetime) -> TotalsRecord:
        return TotalsRecord.model_construct(
            tenant_id=key[0],
            period_key=key[1],
            used_tokens=totals.used,
            event_count=totals.events,
            limit_tokens=totals.limit,
            state=totals.state,
            usage_partition=totals.partition,
            applied_offset=totals.applied_offset,
            updated_at=now,
        )
