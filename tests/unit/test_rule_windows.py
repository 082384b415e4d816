"""The windows a quota rule counts in (``schemas.windows``): calendar windows in a time zone across
DST changes and year ends, fixed rate windows, and the one-entry cache of ``WindowSpec.at``."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.windows import WindowSpec, rate_window_end


def utc(*parts: int) -> float:
    return datetime(*parts, tzinfo=UTC).timestamp()  # type: ignore[arg-type]


def fresh(kind: str, zone: str, seconds: int | None = None) -> WindowSpec:
    """A spec of its own: no cache shared with any other test."""
    return WindowSpec(kind, seconds, zone)


def window(kind: str, zone: str, ts: float, seconds: int | None = None) -> tuple[str, float, float]:
    """(value, start, end) computed without any cache."""
    return fresh(kind, zone, seconds)._compute(ts)


# --- calendar windows across DST ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("zone", "kind", "ts", "value", "start", "end"),
    [
        # Europe/Paris, spring forward 2024-03-31 02:00 CET -> 03:00 CEST (01:00Z): a 23-hour day
        ("Europe/Paris", "day", utc(2024, 3, 31, 12), "2024-03-31", utc(2024, 3, 30, 23), utc(2024, 3, 31, 22)),
        ("Europe/Paris", "hour", utc(2024, 3, 31, 0, 30), "2024-03-31T01+01:00", utc(2024, 3, 31, 0), utc(2024, 3, 31, 1)),
        ("Europe/Paris", "hour", utc(2024, 3, 31, 1, 30), "2024-03-31T03+02:00", utc(2024, 3, 31, 1), utc(2024, 3, 31, 2)),
        ("Europe/Paris", "week", utc(2024, 3, 31, 12), "2024-W13", utc(2024, 3, 24, 23), utc(2024, 3, 31, 22)),
        ("Europe/Paris", "month", utc(2024, 3, 15), "2024-03", utc(2024, 2, 29, 23), utc(2024, 3, 31, 22)),
        # Europe/Paris, fall back 2024-10-27 03:00 CEST -> 02:00 CET (01:00Z): a 25-hour day
        ("Europe/Paris", "day", utc(2024, 10, 27, 12), "2024-10-27", utc(2024, 10, 26, 22), utc(2024, 10, 27, 23)),
        ("Europe/Paris", "month", utc(2024, 10, 31, 22, 59), "2024-10", utc(2024, 9, 30, 22), utc(2024, 10, 31, 23)),
        ("Europe/Paris", "month", utc(2024, 10, 31, 23), "2024-11", utc(2024, 10, 31, 23), utc(2024, 11, 30, 23)),
        # America/New_York, spring 2024-03-10 02:00 EST -> 03:00 EDT (07:00Z); fall 2024-11-03 (06:00Z)
        ("America/New_York", "day", utc(2024, 3, 10, 12), "2024-03-10", utc(2024, 3, 10, 5), utc(2024, 3, 11, 4)),
        ("America/New_York", "hour", utc(2024, 3, 10, 7, 10), "2024-03-10T03-04:00", utc(2024, 3, 10, 7), utc(2024, 3, 10, 8)),
        ("America/New_York", "day", utc(2024, 11, 3, 12), "2024-11-03", utc(2024, 11, 3, 4), utc(2024, 11, 4, 5)),
        ("America/New_York", "month", utc(2024, 11, 15), "2024-11", utc(2024, 11, 1, 4), utc(2024, 12, 1, 5)),
        ("America/New_York", "week", utc(2024, 11, 3, 12), "2024-W44", utc(2024, 10, 28, 4), utc(2024, 11, 4, 5)),
        # Australia/Lord_Howe: a half-hour DST shift. Fall back 2024-04-07 02:00 +11 -> 01:30 +10:30
        ("Australia/Lord_Howe", "day", utc(2024, 4, 7, 0), "2024-04-07", utc(2024, 4, 6, 13), utc(2024, 4, 7, 13, 30)),
        # spring 2024-10-06 02:00 +10:30 -> 02:30 +11
        ("Australia/Lord_Howe", "day", utc(2024, 10, 6, 0), "2024-10-06", utc(2024, 10, 5, 13, 30), utc(2024, 10, 6, 13)),
        ("Australia/Lord_Howe", "month", utc(2024, 10, 15), "2024-10", utc(2024, 9, 30, 13, 30), utc(2024, 10, 31, 13)),
        ("Australia/Lord_Howe", "year", utc(2024, 6, 1), "2024", utc(2023, 12, 31, 13), utc(2024, 12, 31, 13)),
    ],
)
def test_calendar_window_value_start_and_end(zone: str, kind: str, ts: float, value: str, start: float, end: float) -> None:
    assert window(kind, zone, ts) == (value, start, end)
    assert fresh(kind, zone).at(ts) == (value, end)


@pytest.mark.parametrize("zone", ["Europe/Paris", "America/New_York", "Australia/Lord_Howe", "UTC"])
@pytest.mark.parametrize("kind", ["day", "week", "month", "year"])
def test_consecutive_calendar_windows_tile_time(zone: str, kind: str) -> None:
    """Each window's end is the next one's start, through 2024's DST changes in every zone."""
    spec = fresh(kind, zone)
    ts = utc(2024, 1, 1)
    _, start, end = spec._compute(ts)
    values = set()
    while ts < utc(2025, 1, 10):
        value, start, end = spec._compute(ts)
        assert start <= ts < end
        assert value not in values
        values.add(value)
        _, next_start, _ = spec._compute(end)
        assert next_start == end
        ts = end


@pytest.mark.parametrize("zone", ["Europe/Paris", "America/New_York", "UTC"])
def test_hour_windows_contain_their_instant_through_dst(zone: str) -> None:
    ts = utc(2024, 3, 1)
    while ts < utc(2024, 11, 30):
        _, start, end = window("hour", zone, ts)
        assert start <= ts < end
        ts += 1800


def test_lord_howe_fall_back_hour_window_contains_its_instant() -> None:
    # 2024-04-07 01:45 +10:30 (second pass of 01:30-02:00) == 2024-04-06T15:15Z
    ts = utc(2024, 4, 6, 15, 15)
    value, start, end = window("hour", "Australia/Lord_Howe", ts)
    assert start <= ts < end, (value, datetime.fromtimestamp(end, UTC))


def test_lord_howe_spring_forward_cached_hour_agrees_with_a_fresh_spec() -> None:
    spec = fresh("hour", "Australia/Lord_Howe")
    spec.at(utc(2024, 10, 5, 15, 40))  # 02:40 +11, in the short local hour 02
    ts = utc(2024, 10, 5, 16, 10)  # 03:10 +11
    assert spec.at(ts) == fresh("hour", "Australia/Lord_Howe").at(ts) == ("2024-10-06T03+11:00", utc(2024, 10, 5, 17))


@pytest.mark.parametrize(("zone", "first"), [("Europe/Paris", utc(2024, 10, 27, 0, 30)),
                                             ("America/New_York", utc(2024, 11, 3, 5, 30))])
def test_distinct_hour_windows_have_distinct_values_at_fall_back(zone: str, first: float) -> None:
    one = window("hour", zone, first)
    two = window("hour", zone, first + 3600)
    assert one[2] <= first + 3600  # they are two windows
    assert one[0] != two[0]


# --- year end and ISO weeks --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("zone", "ts", "week", "year", "month", "day"),
    [
        ("Europe/Paris", utc(2024, 12, 31, 22, 59), "2025-W01", "2024", "2024-12", "2024-12-31"),
        ("Europe/Paris", utc(2024, 12, 31, 23, 0), "2025-W01", "2025", "2025-01", "2025-01-01"),
        ("UTC", utc(2026, 12, 31, 12), "2026-W53", "2026", "2026-12", "2026-12-31"),
        ("UTC", utc(2027, 1, 3, 23, 59), "2026-W53", "2027", "2027-01", "2027-01-03"),
        ("UTC", utc(2027, 1, 4), "2027-W01", "2027", "2027-01", "2027-01-04"),
        ("UTC", utc(2021, 1, 3, 12), "2020-W53", "2021", "2021-01", "2021-01-03"),
        ("America/New_York", utc(2027, 1, 1, 3), "2026-W53", "2026", "2026-12", "2026-12-31"),
        ("America/New_York", utc(2027, 1, 1, 5), "2026-W53", "2027", "2027-01", "2027-01-01"),
        ("Australia/Lord_Howe", utc(2025, 12, 31, 12, 59), "2026-W01", "2025", "2025-12", "2025-12-31"),
        ("Australia/Lord_Howe", utc(2025, 12, 31, 13), "2026-W01", "2026", "2026-01", "2026-01-01"),
    ],
)
def test_year_end_and_iso_week_values(zone: str, ts: float, week: str, year: str, month: str, day: str) -> None:
    assert [window(kind, zone, ts)[0] for kind in ("week", "year", "month", "day")] == [week, year, month, day]


def test_iso_week_53_spans_the_new_year() -> None:
    value, start, end = window("week", "UTC", utc(2027, 1, 1))
    assert (value, start, end) == ("2026-W53", utc(2026, 12, 28), utc(2027, 1, 4))


def test_december_month_ends_at_next_january() -> None:
    assert window("month", "Europe/Paris", utc(2025, 12, 10)) == ("2025-12", utc(2025, 11, 30, 23), utc(2025, 12, 31, 23))


# --- rate windows ------------------------------------------------------------------------------


def test_rate_window_value_and_end() -> None:
    spec = fresh("rate", "UTC", 60)
    assert spec.at(1_700_000_000) == ("60s@1699999980", 1_700_000_040.0)
    assert spec.at(1_700_000_039.999) == ("60s@1699999980", 1_700_000_040.0)
    assert spec.at(1_700_000_040) == ("60s@1700000040", 1_700_000_100.0)  # the end starts the next window
    assert spec.at(1_700_000_039) == ("60s@1699999980", 1_700_000_040.0)
    assert spec.at(1_699_999_979.5) == ("60s@1699999920", 1_699_999_980.0)  # and backwards


@pytest.mark.parametrize("zone", ["UTC", "Europe/Paris", "Australia/Lord_Howe"])
def test_rate_windows_ignore_the_zone(zone: str) -> None:
    assert fresh("rate", zone, 3600).at(utc(2024, 4, 6, 15, 15)) == fresh("rate", "UTC", 3600).at(utc(2024, 4, 6, 15, 15))


def test_rate_window_needs_seconds() -> None:
    with pytest.raises(ValueError, match="seconds"):
        WindowSpec("rate", None, "UTC")
    with pytest.raises(ValueError, match="seconds"):
        WindowSpec("rate", 0, "UTC")


def test_unknown_kind_refused() -> None:
    with pytest.raises(ValueError, match="unknown window kind"):
        fresh("fortnight", "UTC").at(0)


@pytest.mark.parametrize("seconds", [1, 7, 60, 3600, 86400])
@pytest.mark.parametrize("ts", [0, 1, 1_700_000_000, 1_700_000_000.5, 4_102_444_800])
def test_rate_window_end_from_the_value_equals_at(seconds: int, ts: float) -> None:
    value, end = fresh("rate", "UTC", seconds).at(ts)
    assert rate_window_end(value) == end
    assert end - seconds <= ts < end


@pytest.mark.parametrize(
    "value",
    ["2024-03", "2024-W13", "2024-03-31", "2024-03-31T02", "2024", "", "s@", "60s@", "s@100", "60s@-5", "-60s@5",
     "60x@100", "60s@1.5", "60s@10s@10", "9" * 30 + "s@" + "9" * 30],
)
def test_rate_window_end_of_other_values(value: str) -> None:
    end = rate_window_end(value)
    if value == "9" * 30 + "s@" + "9" * 30:
        assert end is not None and end > 0
    else:
        assert end is None


# --- the one-entry cache ---------------------------------------------------------------------


def test_cache_never_returns_a_later_window_for_an_earlier_instant() -> None:
    spec = fresh("day", "Europe/Paris")
    assert spec.at(utc(2024, 10, 27, 12))[0] == "2024-10-27"
    assert spec.at(utc(2024, 10, 26, 21, 59))[0] == "2024-10-26"  # time went backwards
    assert spec.at(utc(2024, 10, 26, 22))[0] == "2024-10-27"
    assert spec.at(utc(2024, 10, 27, 23))[0] == "2024-10-28"


def test_shared_specs_are_one_instance_per_kind_seconds_and_zone() -> None:
    assert WindowSpec.of("day", None, "Europe/Paris") is WindowSpec.of("day", None, "Europe/Paris")
    assert WindowSpec.of("day", None, "Europe/Paris") is not WindowSpec.of("day", None, "America/New_York")
    assert WindowSpec.of("rate", 60, "UTC") is not WindowSpec.of("rate", 30, "UTC")


@settings(max_examples=300, deadline=None)
@given(
    kind=st.sampled_from(["hour", "day", "week", "month", "year", "rate"]),
    zone=st.sampled_from(["UTC", "Europe/Paris", "America/New_York"]),
    moments=st.lists(st.datetimes(min_value=datetime(2023, 12, 25), max_value=datetime(2025, 1, 7),
                                  timezones=st.just(UTC)), min_size=1, max_size=20),
)
def test_cached_answers_equal_fresh_answers_in_any_order(kind: str, zone: str, moments: list[datetime]) -> None:
    """Instants as events carry them (datetimes, microsecond precision), in any order."""
    spec = WindowSpec.of(kind, 90 if kind == "rate" else None, zone)
    for moment in moments:
        ts = moment.timestamp()
        value, end = spec.at(ts)
        want, start, want_end = window(kind, zone, ts, 90 if kind == "rate" else None)
        assert (value, end) == (want, want_end)
        assert start <= ts < end
