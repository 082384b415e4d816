"""Period keys: the bucket a call's tokens count against. Zero-argument callables, as in the seed.

Each takes an optional timezone (and ``now``, for tests), so a business whose billing month starts at local midnight can
pass ``functools.partial(month_key, tz=ZoneInfo("Europe/Berlin"))``. The default is UTC.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta, tzinfo

_cache: dict[tuple[Callable[[datetime], str], tzinfo], tuple[int, str]] = {}


def _key(render: Callable[[datetime], str], tz: tzinfo, now: datetime | None) -> str:
    """``render`` the period of ``now`` (default: this instant) in ``tz``.

    The middleware asks on every call; a key computed in the same whole second is reused,
    which is exact because period boundaries fall on whole seconds.
    """
    if now is not None:
        return render(now.astimezone(tz))
    second = int(time.time())
    cached = _cache.get((render, tz))
    if cached is not None and cached[0] == second:
        return cached[1]
    value = render(datetime.fromtimestamp(second, tz))
    _cache[(render, tz)] = (second, value)
    return value


def _month(moment: datetime) -> str:
    return moment.strftime("%Y-%m")


def _day(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d")


def _iso_week(moment: datetime) -> str:
    year, week, _ = moment.isocalendar()
    return f"{year:04d}-W{week:02d}"


def _seed_week(moment: datetime) -> str:
    return moment.strftime("%Y-W%W")


def month_key(*, tz: tzinfo = UTC, now: datetime | None = None) -> str:
    """``2026-04``."""
    return _key(_month, tz, now)


def day_key(*, tz: tzinfo = UTC, now: datetime | None = None) -> str:
    """``2026-04-14``."""
    return _key(_day, tz, now)


def week_key(*, tz: tzinfo = UTC, now: datetime | None = None) -> str:
    """ISO 8601 week, ``2026-W16``: every week has seven days and belongs to one year.

    The seed used ``%Y-W%W``, whose week 00 is the partial week before the year's first Monday, so
    the days around New Year fall into two short buckets. ``seed_week_key`` keeps that scheme for
    deployments whose stored totals were keyed by it.
    """
    return _key(_iso_week, tz, now)


def seed_week_key(*, tz: tzinfo = UTC, now: datetime | None = None) -> str:
    """The seed's ``%Y-W%W`` week key, for continuity with totals stored by the seed."""
    return _key(_seed_week, tz, now)


_KINDS = (
    ("day", re.compile(r"^\d{4}-\d{2}-\d{2}$")),
    ("week", re.compile(r"^\d{4}-W\d{2}$")),
    ("month", re.compile(r"^\d{4}-\d{2}$")),
)


def period_kind(period_key: str) -> str | None:
    """``month``, ``week`` or ``day`` for keys these functions make; None for custom keys."""
    for kind, pattern in _KINDS:
        if pattern.match(period_key):
            return kind
    return None


# --------------------------------------------------------------------------------------------
# When a period key's window ends: the instant the key function would first return another key.
# --------------------------------------------------------------------------------------------

_FUNCTION_KINDS: dict[object, tuple[str, Callable[[datetime], str]]] = {
    month_key: ("month", _month),
    day_key: ("day", _day),
    week_key: ("week", _iso_week),
    seed_week_key: ("seed_week", _seed_week),
}


def key_function_kind(fn: object) -> tuple[str, tzinfo] | None:
    """(kind, time zone) of one of this module's key functions, also through
    ``functools.partial(month_key, tz=...)``; None for any other (custom) function. ``kind`` is
    ``month``, ``day``, ``week`` (ISO) or ``seed_week`` (the seed's ``%Y-W%W``)."""
    tz: object = UTC
    func = fn
    keywords = getattr(fn, "keywords", None)
    if isinstance(keywords, dict) and callable(getattr(fn, "func", None)) and not getattr(fn, "args", ()):
        func = fn.func  # type: ignore[attr-defined]
        tz = keywords.get("tz", UTC)
        if set(keywords) - {"tz"} or not isinstance(tz, tzinfo):
            return None
    try:
        known = _FUNCTION_KINDS.get(func)
    except TypeError:  # not hashable: not one of ours
        return None
    if known is None:
        return None
    return known[0], tz  # type: ignore[return-value]


def _midnight(year: int, month: int, day: int, tz: tzinfo) -> datetime:
    return datetime(year, month, day, tzinfo=tz)


def window_end(period_key: str, *, kind: str | None = None, tz: tzinfo = UTC) -> datetime | None:
    """The instant (aware, in ``tz``) the window of ``period_key`` ends: local midnight of the first
    day no longer in it. ``kind`` is ``month``, ``day``, ``week`` (ISO 8601) or ``seed_week``
    (``%Y-W%W``, whose last week of a year ends on 1 January); None takes ``period_kind(period_key)``
    (a week-shaped key is then read as ISO). None when the key is not of that kind or names no real
    period (``2026-13``, ``2026-W54``). Pure."""
    if kind is None:
        kind = period_kind(period_key)
    try:
        if kind == "month" and _KINDS[2][1].match(period_key):
            year, month = int(period_key[:4]), int(period_key[5:7])
            if not 1 <= month <= 12:
                return None
            return _midnight(year + month // 12, month % 12 + 1, 1, tz)
        if kind == "day" and _KINDS[0][1].match(period_key):
            start = date(int(period_key[:4]), int(period_key[5:7]), int(period_key[8:10]))
            end = start + timedelta(days=1)
            return _midnight(end.year, end.month, end.day, tz)
        if kind == "week" and _KINDS[1][1].match(period_key):
            end = date.fromisocalendar(int(period_key[:4]), int(period_key[6:8]), 1) + timedelta(days=7)
            return _midnight(end.year, end.month, end.day, tz)
        if kind == "seed_week" and _KINDS[1][1].match(period_key):
            year, week = int(period_key[:4]), int(period_key[6:8])
            january_1 = date(year, 1, 1)
            first_monday = january_1 + timedelta(days=(7 - january_1.weekday()) % 7)
            end = min(first_monday + timedelta(days=7 * week), date(year + 1, 1, 1))
            if week > 53 or end <= january_1:
                return None
            return _midnight(end.year, end.month, end.day, tz)
    except ValueError:  # day 31 of April, ISO week 54, year 0 ...
        return None
    return None


def seconds_until_end(
    period_key: str, *, kind: str | None = None, tz: tzinfo = UTC, now: datetime | None = None
) -> float | None:
    """Seconds from ``now`` (default: this instant) until ``window_end``; never negative (a past
    window has ended: 0). None when the window end is unknown."""
    end = window_end(period_key, kind=kind, tz=tz)
    if end is None:
        return None
    moment = datetime.now(UTC) if now is None else now
    # Through timestamps: subtracting two datetimes of the same tzinfo ignores their UTC offsets,
    # which is wrong across a daylight-saving change.
    return max(0.0, end.timestamp() - moment.timestamp())
