"""Staleness that sees lag: is a usage partition's aggregator alive but far behind this process?

Silence is not the only way to go stale. An aggregator that heartbeats on time but applies usage
slower than the fleet writes it reports totals that are further and further in the past, and a
fleet that outruns it loses its bound without a word. Every heartbeat and notice says how far the
aggregator has got (``usage_offset``: the offset of the last usage record it applied on that
partition, ``-1`` before the first; see ``aggregator.service``'s heartbeats and
``QuotaSnapshot._heard``), and this process knows the offsets of its own acknowledged events. So an
event of ours at offset ``o`` is counted by the aggregator once ``o <= usage_offset``, and the
aggregator is ``highest_acked - usage_offset`` records behind the newest of them.

``AckedOffsets`` keeps, per usage partition, this process's acknowledged events the aggregator has
not yet been heard to cover: their offsets and when they were acknowledged (monotonic clock). A
partition's aggregator is *behind* (``AckedOffsets.behind``) when

- its heard offset is more than ``max_lag_events`` below this process's highest acknowledged
  offset (records of every producer on the partition count: all of them are what it has to apply), or
- this process's oldest event it does not cover yet was acknowledged more than ``max_lag_s`` ago.

Either test is off when its threshold is None. A partition this process has written nothing to
since the aggregator last caught up is never behind: this process knows nothing it lacks.

Memory is bounded: covered events are dropped on every query, and at most ``max_pending`` uncovered
ones are kept per partition. Past that, each new acknowledgement only moves the last entry's offset
up and keeps that entry's (older) time, so the time test may judge an aggregator behind a little
early, never late. Pure logic, no I/O; not thread-safe (one event loop owns it).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Protocol

# Uncovered acknowledged events remembered per usage partition (an offset and a time each).
MAX_PENDING = 1024


class HeardOffsets(Protocol):
    """Where the aggregator's progress is read (``QuotaSnapshot``)."""

    def heard_offset(self, partition: int) -> int | None:
        """The last usage offset the aggregator of ``partition`` said it applied (heartbeat or
        notice; ``-1``: none yet); None if never heard from."""
        ...


@dataclass(frozen=True, slots=True)
class Behind:
    """Why a partition's aggregator is judged behind: how many records and how long."""

    events: int  # this process's highest acknowledged offset minus the aggregator's heard offset
    seconds: float  # since this process's oldest event the aggregator does not cover was acknowledged

    def describe(self) -> str:
        return f"{self.events} records and {self.seconds:.1f}s behind"


class AckedOffsets:
    """This process's acknowledged usage offsets per partition, until the aggregator covers them."""

    __slots__ = ("_highest", "_max_pending", "_pending", "lagging")

    def __init__(self, max_pending: int = MAX_PENDING) -> None:
        if max_pending < 1:
            raise ValueError(f"max_pending must be at least 1, got {max_pending}")
        self._max_pending = max_pending
        self._highest: dict[int, int] = {}
        # Per partition: (offset, acknowledged at in monotonic seconds), offsets increasing.
        self._pending: dict[int, deque[tuple[int, float]]] = {}
        # Partitions last judged behind: the store logs once on the way in and once on the way out.
        self.lagging: set[int] = set()

    def acknowledged(self, partition: int, offset: int, now: float | None = None) -> None:
        """Kafka stored one of this process's events at ``offset`` of ``partition``."""
        if offset <= self._highest.get(partition, -1):
            # Acknowledgements of one partition arrive in offset order; should a lower offset come
            # late, it adds nothing: the higher one held is covered after it and is older.
            return
        self._highest[partition] = offset
        pending = self._pending.get(partition)
        if pending is None:
            pending = self._pending[partition] = deque()
        if len(pending) >= self._max_pending:
            pending[-1] = (offset, pending[-1][1])  # keep the older time: early, never late
            return
        pending.append((offset, time.monotonic() if now is None else now))

    def behind(
        self,
        partition: int,
        heard: HeardOffsets,
        max_lag_events: int | None,
        max_lag_s: float | None,
        now: float | None = None,
    ) -> Behind | None:
        """Whether the aggregator of ``partition``, as far as ``heard`` says it has applied, is behind
        this process's acknowledged events by more than ``max_lag_events`` records or ``max_lag_s``
        seconds. None when it is not, or nothing is known (never heard from is silence, not lag).
        Drops the events it is heard to cover; asks ``heard`` only while some are uncovered, so a
        caught-up partition costs a dictionary look-up (this runs on every call)."""
        pending = self._pending.get(partition)
        if not pending:
            return None
        heard_offset = heard.heard_offset(partition)
        if heard_offset is None:
            return None
        while pending and pending[0][0] <= heard_offset:
            pending.popleft()
        if not pending:
            return None
        events = pending[-1][0] - heard_offset  # the last entry holds the highest offset acknowledged
        seconds = (time.monotonic() if now is None else now) - pending[0][1]
        if (max_lag_events is not None and events > max_lag_events) or (max_lag_s is not None and seconds > max_lag_s):
            return Behind(events, seconds)
        return None

    def pending(self, partition: int) -> int:
        """Uncovered acknowledged events remembered for ``partition`` (as of the last ``behind``)."""
        return len(self._pending.get(partition, ()))
