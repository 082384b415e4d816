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

from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo

_specs: dict[tuple[str, int | None, str], WindowSpec] = {}


class WindowSpec:
    """One kind of window in one time zone; ``at`` maps an instant to (window value, end)."""

    __slots__ = ("_end", "_start", "_tz", "_value", "kind", "seconds", "zone")

    def __init__(self, kind: str, seconds: int | None, zone: str) -> None:
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
        value, start, end = self._compute(ts)
        self._value, self._start, self._end = value, start, end
        return value, end

    def _compute(self, ts: float) -> tuple[str, float, float]:
        if self.kind == "rate":
            assert self.seconds is not None
            start = ts // self.seconds * self.seconds
            return f"{self.seconds}s@{int(start)}", start, start + self.seconds
        local = datetime.fromtimestamp(ts, self._tz)
        if self.kind == "hour":
            first = local.replace(minute=0, second=0, microsecond=0)
            start = first.timestamp()
            return first.strftime("%Y-%m-%dT%H"), start, start + 3600
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
        raise ValueError(f"unknown window kind {self.kind!r}")

    def _midnight(self, day: date) -> float:
        return datetime(day.year, day.month, day.day, tzinfo=self._tz).timestamp()



def rate_window_end(window_value: str) -> float | None:
    """The end (epoch seconds) of a rate window named ``<seconds>s@<start>``; None for a calendar
    window's value. From the value alone, so a counter can be expired after its rule is gone."""
    seconds, at, start = window_value.partition("s@")
    if not at or not seconds.isdigit() or not start.isdigit():
        return None
    return float(int(start) + int(seconds))
