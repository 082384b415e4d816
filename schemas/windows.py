"""The windows a rule counts in: calendar hours, days, ISO weeks, months and years in a time zone,
and fixed rate windows of N seconds.

Rate windows are fixed (aligned to multiples of N seconds since the epoch), not sliding: a fixed
window is one exact counter that the aggregator, the verifier and a replay all compute the same
way from the event's time, and its memory is one counter per window, dropped once it has ended. A
sliding window needs every event's time (or sub-buckets) and is exact only approximately. The
price: around a boundary a fixed window admits up to twice its limit within N seconds; choose N
with that in mind (a per-minute limit of L keeps any 2-minute span under 2L). Pure.
"""

from __future__ import annotations

import math
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

from schemas.periods import window_end

_specs: dict[tuple[str, int | None, str], WindowSpec] = {}
# The window of an instant too close to the year 9999 for its window's end to be a date.
OUT_OF_RANGE = "out-of-range"


class WindowSpec:
    """One kind of window in one time zone; ``at`` maps an instant to (window value, end)."""

    __slots__ = ("_end", "_start", "_tz", "_value", "kind", "seconds", "zone")

    def __init__(self, kind: str, seconds: int | None, zone: str) -> None:
        if kind not in ("hour", "day", "week", "month", "year", "rate"):
            raise ValueError(f"unknown window kind {kind!r}")
        if kind == "rate" and not seconds:
            raise ValueError("a rate window needs its length in seconds")
        self.kind, self.seconds, self.zone = kind, seconds, zone
        self._tz = ZoneInfo(zone)
        self._start = self._end = 0.0
        self._value = ""

    @classmethod
    def of(cls, kind: str, seconds: int | None, zone: str) -> WindowSpec:
        """Shared instances: 100,000 tenants' daily rules hold one spec, not 100,000."""
        key = (kind, seconds, zone)
        spec = _specs.get(key)
        if spec is None:
            spec = _specs[key] = cls(kind, seconds, zone)
        return spec

    def at(self, ts: float) -> tuple[str, float]:
        """(the window's value, its end in epoch seconds) for the instant ``ts`` (epoch seconds).
        The last window is remembered, so the calls of one window cost a comparison."""
        if self._start <= ts < self._end:
            return self._value, self._end
        try:
            value, start, end = self._compute(ts)
        except (ValueError, OverflowError):
            # An instant whose window ends past the year 9999 (a valid event_time can be
            # 9999-12-31): one window of its own that never ends, the same for every reader.
            return OUT_OF_RANGE, math.inf
        self._value, self._start, self._end = value, start, end
        return value, end

    def _compute(self, ts: float) -> tuple[str, float, float]:
        if self.kind == "rate":
            assert self.seconds is not None
            start = ts // self.seconds * self.seconds
            return f"{self.seconds}s@{int(start)}", start, start + self.seconds
        local = datetime.fromtimestamp(ts, self._tz)
        if self.kind == "hour":
            return self._hour(ts, local)
        day = local.date()
        if self.kind == "day":
            return day.isoformat(), self._midnight(day), self._midnight(day + timedelta(days=1))
        if self.kind == "week":
            year, week, weekday = day.isocalendar()
            monday = day - timedelta(days=weekday - 1)
            return f"{year:04d}-W{week:02d}", self._midnight(monday), self._midnight(monday + timedelta(days=7))
        if self.kind == "month":
            first_day = day.replace(day=1)
            following = date(day.year + day.month // 12, day.month % 12 + 1, 1)
            return f"{day.year:04d}-{day.month:02d}", self._midnight(first_day), self._midnight(following)
        if self.kind == "year":
            return f"{day.year:04d}", self._midnight(date(day.year, 1, 1)), self._midnight(date(day.year + 1, 1, 1))
        raise AssertionError(self.kind)  # refused by __init__

    def _hour(self, ts: float, local: datetime) -> tuple[str, float, float]:
        """The local clock hour of ``ts`` at its UTC offset: ``2026-10-25T02+02:00``. With the offset
        in the value, the two 02:00 hours of a fall-back night are two windows; a window ends at
        the next whole local hour or at an offset change, whichever comes first (zones such as
        Australia/Lord_Howe change by 30 minutes)."""
        offset = local.utcoffset()
        start = math.floor(ts) - local.minute * 60 - local.second
        end = float(start + 3600)
        if datetime.fromtimestamp(end - 1, self._tz).utcoffset() != offset:
            low, high = math.floor(ts), int(end) - 1  # offset(low) is ours, offset(high) is not
            while high - low > 1:
                middle = (low + high) // 2
                if datetime.fromtimestamp(middle, self._tz).utcoffset() == offset:
                    low = middle
                else:
                    high = middle
            end = float(high)
        hours = local.isoformat(timespec="hours")  # 2026-10-25T02+02:00
        return hours, float(start), end

    def _midnight(self, day: date) -> float:
        return datetime(day.year, day.month, day.day, tzinfo=self._tz).timestamp()



def rate_window_end(window_value: str) -> float | None:
    """The end (epoch seconds) of a rate window named ``<seconds>s@<start>``; None for a calendar
    window's value. From the value alone, so a counter can be expired after its rule is gone."""
    seconds, at, start = window_value.partition("s@")
    if not at or not seconds.isdigit() or not start.isdigit():
        return None
    return float(int(start) + int(seconds))


def window_value_end(window_value: str) -> float | None:
    """When a rule counter's window ends (epoch seconds), from its value alone, so a counter can be
    dropped after its rule is gone: exact for rate and hour windows; for a calendar day, ISO week,
    month or year, its end in UTC plus 14 hours (no zone ends later). None when unknown."""
    end = rate_window_end(window_value)
    if end is not None:
        return end
    if "T" in window_value:
        try:
            hour, _, offset = window_value.partition("+") if "+" in window_value else window_value.rpartition("-")
            sign = "+" if "+" in window_value else "-"
            return datetime.fromisoformat(f"{hour}:00{sign}{offset}").timestamp() + 3600
        except ValueError:
            return None
    kind = {10: "day", 8: "week", 7: "month", 4: "year"}.get(len(window_value))
    try:
        if kind == "year" and window_value.isdigit():
            return datetime(int(window_value) + 1, 1, 1, tzinfo=UTC).timestamp() + 14 * 3600
        ends = window_end(window_value, kind=kind) if kind in ("day", "week", "month") else None
    except (ValueError, OverflowError):
        return None
    return None if ends is None else ends.timestamp() + 14 * 3600
