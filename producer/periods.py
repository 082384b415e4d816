"""Period keys: the bucket a call's tokens count against. Zero-argument callables, as in the seed.

Each takes an optional timezone (and ``now``, for tests), so a business whose billing month starts at local midnight can
pass ``functools.partial(month_key, tz=ZoneInfo("Europe/Berlin"))``. The default is UTC.
"""

from __future__ import annotations

import re
from datetime import datetime, timezone, tzinfo


def _at(now: datetime | None, tz: tzinfo) -> datetime:
    return datetime.now(tz) if now is None else now.astimezone(tz)


def month_key(*, tz: tzinfo = timezone.utc, now: datetime | None = None) -> str:
    """``2026-04``."""
    return _at(now, tz).strftime("%Y-%m")


def day_key(*, tz: tzinfo = timezone.utc, now: datetime | None = None) -> str:
    """``2026-04-14``."""
    return _at(now, tz).strftime("%Y-%m-%d")


def week_key(*, tz: tzinfo = timezone.utc, now: datetime | None = None) -> str:
    """ISO 8601 week, ``2026-W16``: every week has seven days and belongs to one year.

    The seed used ``%Y-W%W``, whose week 00 is the partial week before the year's first Monday, so
    the days around New Year fall into two short buckets. ``seed_week_key`` keeps that scheme for
    deployments whose stored totals were keyed by it.
    """
    year, week, _ = _at(now, tz).isocalendar()
    return f"{year:04d}-W{week:02d}"


def seed_week_key(*, tz: tzinfo = timezone.utc, now: datetime | None = None) -> str:
    """The seed's ``%Y-W%W`` week key, for continuity with totals stored by the seed."""
    return _at(now, tz).strftime("%Y-W%W")


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
