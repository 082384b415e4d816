from __future__ import annotations

from datetime import UTC, datetime, timedelta

from producer.snapshot import QuotaSnapshot, from_the_future, within_end
from schemas.notices import Heartbeat, QuotaNotice

T0 = datetime(2026, 4, 14, tzinfo=UTC)


def notice(used: int, offset: int, *, state: str = "ok", limit: int = 100, partition: int = 0, at: int = 0) -> QuotaNotice:
    return QuotaNotice(
        tenant_id="acme", period_key="p", state=state, used_tokens=used, limit_tokens=limit,  # type: ignore[arg-type]
        usage_partition=partition, usage_offset=offset, aggregator_id="agg", emitted_at=T0 + timedelta(seconds=at),
    )


def test_unknown_tenant_is_allowed_up_to_the_default_limit() -> None:
    snap = QuotaSnapshot()
    assert snap.decide("acme", "p", 100).allowed
    assert not snap.decide("acme", "p", 0).allowed


def test_own_spend_blocks_before_any_notice() -> None:
    snap = QuotaSnapshot()
    snap.add_local("acme", "p", 60)
    assert snap.decide("acme", "p", 100).allowed
    snap.add_local("acme", "p", 40)
    decision = snap.decide("acme", "p", 100)
    assert not decision.allowed and decision.used == 100


def test_exceeded_notice_blocks_every_instance() -> None:
    snap = QuotaSnapshot()
    snap.apply_notice(notice(120, 9, state="exceeded"))
    decision = snap.decide("acme", "p", 100)
    assert not decision.allowed and decision.used == 120
    assert snap.decide("other", "p", 100).allowed, "one tenant's notice never blocks another"
    assert snap.decide("acme", "next-period", 100).allowed, "a new period starts at zero"


def test_notice_used_plus_spend_above_its_offset() -> None:
    snap = QuotaSnapshot()
    for offset in (5, 6, 7):
        snap.add_local("acme", "p", 10)
        snap.acknowledged("acme", "p", 10, partition=0, offset=offset)
    snap.add_local("acme", "p", 10)  # in flight, not acknowledged yet
    assert snap.used("acme", "p") == 40
    snap.apply_notice(notice(50, 6, state="warning"))  # covers offsets 5 and 6 (and others' spend)
    assert snap.used("acme", "p") == 50 + 10 + 10
    snap.acknowledged("acme", "p", 10, partition=0, offset=8)
    assert snap.used("acme", "p") == 70


def test_ack_already_covered_by_a_notice_is_not_counted_twice() -> None:
    snap = QuotaSnapshot()
    snap.add_local("acme", "p", 10)
    snap.apply_notice(notice(80, 12))
    snap.acknowledged("acme", "p", 10, partition=0, offset=12)
    assert snap.used("acme", "p") == 80


def test_older_notices_do_not_replace_newer_ones() -> None:
    snap = QuotaSnapshot()
    assert snap.apply_notice(notice(120, 9, state="exceeded", at=1))
    assert not snap.apply_notice(notice(80, 7, state="warning", at=0))
    assert not snap.decide("acme", "p", 100).allowed
    # Same offset, later emission: a limit change re-evaluated the same totals.
    assert snap.apply_notice(notice(120, 9, state="ok", limit=500, at=2))
    assert snap.decide("acme", "p", 100).allowed


def test_heartbeat_age_is_measured_from_the_aggregator_timestamp() -> None:
    snap = QuotaSnapshot()
    assert snap.heartbeat_age(0) is None
    snap.apply_heartbeat(Heartbeat(usage_partition=0, usage_offset=3, aggregator_id="agg", emitted_at=T0))
    assert snap.heartbeat_age(0, now=T0.timestamp() + 2.5) == 2.5
    older = Heartbeat(usage_partition=0, usage_offset=1, aggregator_id="agg", emitted_at=T0 - timedelta(seconds=9))
    snap.apply_heartbeat(older)  # read back late from the compacted topic: ignored
    assert snap.heartbeat_age(0, now=T0.timestamp() + 2.5) == 2.5


def test_a_notice_offset_must_be_below_its_partitions_end() -> None:
    ends = {0: 10, 1: 0}
    assert within_end(0, 9, ends) and within_end(0, -1, ends), "-1: the notice covers nothing yet"
    assert not within_end(0, 10, ends), "offset 10 is the next record's: it does not exist yet"
    assert not within_end(0, 2**62, ends)
    assert within_end(1, -1, ends) and not within_end(1, 0, ends)
    assert not within_end(2, -1, ends), "a partition not known to exist"


def test_a_date_further_ahead_than_the_clock_skew_is_from_the_future() -> None:
    now = T0.timestamp()
    assert not from_the_future(T0, now, 60)
    assert not from_the_future(T0 + timedelta(seconds=60), now, 60)
    assert from_the_future(T0 + timedelta(seconds=61), now, 60)
    assert from_the_future(T0.replace(year=9999), now, 60)
    assert not from_the_future(T0 - timedelta(days=365), now, 60), "old ones are merely old: staleness handles them"
