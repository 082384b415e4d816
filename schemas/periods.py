"""Period keys: the bucket a call's tokens count against. Zero-argument callables, as in the seed.

Each takes an optional timezone (and ``now``, for tests), so a business whose billing month starts at local midnight can
pass ``functools.partial(month_key, tz=ZoneInfo("Europe/Berlin"))``. The default is UTC.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from datetime import UTC, datetime, tzinfo

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
