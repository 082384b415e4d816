"""When a tenant-period seals, by the usage records' broker timestamps: pure, no I/O.

A key of a period with a known end seals at ``schemas.sealed.seal_time`` (its end in UTC, plus a
margin for every time zone, plus the grace for late events). An event belongs to its period's
sealed total when its record was appended at or before that time, else it is an adjustment. The
aggregator can only seal a key once it has read its partition past that time: a record appended
later than the seal time has been applied (``observe``), or the partition is caught up and the
clock is past it (``due``'s ``through``). From then on its partition counts the period as sealed
(``sealed_through``), whatever a later record's timestamp says.
"""

from __future__ import annotations

import heapq
import math

from schemas.sealed import seal_time

Key = tuple[str, str]


class Sealer:
    """Per partition: the keys waiting to seal, how far its records' broker timestamps have got,
    and the time through which its periods are sealed.

    Keys wait grouped by seal time (a heap of the distinct times, a list of keys for each): a
    million tenants of one month share one seal time, so a key costs a list slot, not a heap
    entry of its own."""

    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self.watermark: dict[int, float] = {}
        self.sealed_through: dict[int, float] = {}
        self._times_due: dict[int, list[float]] = {}
        self._waiting: dict[int, dict[float, list[Key]]] = {}
        self._times: dict[str, float | None] = {}

    def seal_time(self, period_key: str) -> float | None:
        times = self._times
        if period_key not in times:
            if len(times) >= 10_000:
                times.clear()
            times[period_key] = seal_time(period_key, self.grace_s)
        return times[period_key]

    def track(self, partition: int, key: Key) -> None:
        """A key is held for ``partition``: it will be due at its period's seal time."""
        when = self.seal_time(key[1])
        if when is None:
            return
        waiting = self._waiting.setdefault(partition, {})
        keys = waiting.get(when)
        if keys is None:
            waiting[when] = [key]
            heapq.heappush(self._times_due.setdefault(partition, []), when)
        else:
            keys.append(key)

    def observe(self, partition: int, appended_at: float) -> None:
        if appended_at > self.watermark.get(partition, -math.inf):
            self.watermark[partition] = appended_at

    def is_late(self, partition: int, period_key: str, appended_at: float | None) -> bool:
        """Whether an event of ``period_key`` appended at ``appended_at`` (epoch seconds; None when
        the record has no timestamp) is an adjustment of its sealed period."""
        when = self.seal_time(period_key)
        if when is None:
            return False
        if appended_at is not None and appended_at > when:
            return True
        return when <= self.sealed_through.get(partition, -math.inf)

    def due(self, partition: int, through: float) -> list[Key]:
        """The keys of ``partition`` whose seal time is before ``through`` (the partition has been
        read that far); the partition's periods count as sealed through it from now on."""
        if through > self.sealed_through.get(partition, -math.inf):
            self.sealed_through[partition] = through
        times = self._times_due.get(partition)
        found: list[Key] = []
        while times and times[0] < through:
            found.extend(self._waiting[partition].pop(heapq.heappop(times)))
        return found

    def partitions(self) -> list[int]:
        return list(self._waiting)

    def pending(self) -> dict[int, list[tuple[float, Key]]]:
        """Per partition, (seal time, key) of every key waiting, in order: for tests and tools."""
        return {partition: sorted((when, key) for when, keys in waiting.items() for key in keys)
                for partition, waiting in self._waiting.items()}

    def drop(self, partitions: set[int]) -> None:
        for partition in partitions:
            self.watermark.pop(partition, None)
            self.sealed_through.pop(partition, None)
            self._waiting.pop(partition, None)
            self._times_due.pop(partition, None)
