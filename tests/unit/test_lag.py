"""Staleness that sees lag (issue 11, item 6): ``producer.lag`` judges whether a partition's aggregator,
alive, is behind this process's own acknowledged usage; the store applies the staleness policy to it.
Pure logic, plus a store that is built but never started (no broker): its acknowledgements are
handed to ``_delivered`` and its heartbeats to the snapshot, as the publisher and the feed would."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path

import pytest

from producer.config import ProducerConfig
from producer.kafka_store import KafkaQuotaStore
from producer.lag import AckedOffsets
from producer.snapshot import STALE_REASON, QuotaSnapshot
from schemas.notices import Heartbeat, QuotaNotice
from transport.connection import SettingsError

PERIOD = "2026-04"


class Heard:
    """The aggregator's progress per partition, as a heartbeat's ``usage_offset`` states it."""

    def __init__(self, **offsets: int) -> None:
        self.offsets = {int(name.removeprefix("p")): offset for name, offset in offsets.items()}

    def heard_offset(self, partition: int) -> int | None:
        return self.offsets.get(partition)


def acked(*offsets: int, partition: int = 0, at: float = 0.0, step: float = 0.0, cap: int = 1024) -> AckedOffsets:
    tracker = AckedOffsets(cap)
    for i, offset in enumerate(offsets):
        tracker.acknowledged(partition, offset, now=at + i * step)
    return tracker


# -- the heard offset is the last offset applied, not the next one --------------------------------


def test_an_event_at_the_heard_offset_is_covered() -> None:
    """A heartbeat's usage_offset is the offset of the last record the aggregator applied
    (``state.partition_offsets``; -1 before the first). Our event at that very offset is counted:
    not behind, however long ago it was acknowledged. Read as "next offset", it would be behind."""
    tracker = acked(10, 11)
    assert tracker.behind(0, Heard(p0=11), None, 1.0, now=100.0) is None
    assert tracker.pending(0) == 0, "covered events are forgotten"


def test_one_below_the_heard_offset_is_one_record_behind() -> None:
    tracker = acked(10, 11)
    behind = tracker.behind(0, Heard(p0=10), None, 1.0, now=100.0)
    assert behind is not None and behind.events == 1 and behind.seconds == 100.0


def test_events_behind_is_highest_acknowledged_minus_heard_and_strictly_more_than_the_limit() -> None:
    tracker = acked(*range(10))  # offsets 0..9, acknowledged just now
    assert tracker.behind(0, Heard(p0=4), 5, None, now=0.0) is None, "5 behind is not more than 5"
    behind = tracker.behind(0, Heard(p0=4), 4, None, now=0.0)
    assert behind is not None and behind.events == 5


def test_an_aggregator_that_applied_nothing_reports_minus_one() -> None:
    behind = acked(0, 1, 2).behind(0, Heard(p0=-1), 2, None, now=0.0)
    assert behind is not None and behind.events == 3, "offsets 0, 1 and 2 are all unapplied"


def test_other_producers_records_count_towards_events_behind() -> None:
    """Offsets between ours were written by other instances: the aggregator has to apply them too."""
    behind = acked(5, 500).behind(0, Heard(p0=5), 100, None, now=0.0)
    assert behind is not None and behind.events == 495


# -- the time test --------------------------------------------------------------------------------


def test_time_behind_is_measured_from_the_oldest_uncovered_acknowledgement() -> None:
    tracker = acked(10, 11, 12, at=0.0, step=4.0)  # acknowledged at 0, 4 and 8 s
    assert tracker.behind(0, Heard(p0=9), None, 5.0, now=5.0) is None, "5 s is not more than 5 s"
    behind = tracker.behind(0, Heard(p0=9), None, 5.0, now=5.5)
    assert behind is not None and behind.seconds == 5.5
    # The aggregator applies offset 10: the oldest it lacks is now 11, acknowledged at 4 s.
    assert tracker.behind(0, Heard(p0=10), None, 5.0, now=8.5) is None
    behind = tracker.behind(0, Heard(p0=10), None, 5.0, now=9.5)
    assert behind is not None and behind.seconds == 5.5 and behind.events == 2


def test_either_test_alone_suffices_and_none_turns_each_off() -> None:
    tracker = acked(*range(100), at=0.0)
    heard = Heard(p0=-1)
    assert tracker.behind(0, heard, None, None, now=1e9) is None
    assert tracker.behind(0, heard, 10, None, now=0.0) is not None  # events only
    assert tracker.behind(0, heard, None, 1.0, now=2.0) is not None  # time only
    assert tracker.behind(0, heard, 1000, 10.0, now=2.0) is None  # neither exceeded


# -- what is not lag ------------------------------------------------------------------------------


def test_never_heard_from_is_silence_not_lag() -> None:
    assert acked(1, 2, 3).behind(0, Heard(), 0, 0.0, now=1e9) is None


def test_a_partition_this_process_wrote_nothing_to_is_never_behind() -> None:
    tracker = acked(1, 2, 3, partition=0)
    assert tracker.behind(1, Heard(p0=-1, p1=-1), 0, 0.0, now=1e9) is None
    assert tracker.behind(0, Heard(p0=-1, p1=-1), 0, 0.0, now=1e9) is not None, "partition 0 is"


def test_caught_up_stays_caught_up_until_this_process_writes_again() -> None:
    tracker = acked(1, 2)
    assert tracker.behind(0, Heard(p0=2), 0, 0.0, now=1e9) is None
    tracker.acknowledged(0, 3, now=0.0)
    assert tracker.behind(0, Heard(p0=2), 0, 0.0, now=1e9) is not None


def test_a_lower_offset_acknowledged_late_adds_nothing() -> None:
    tracker = acked(7, at=0.0)
    tracker.acknowledged(0, 3, now=50.0)
    assert tracker.pending(0) == 1
    assert tracker.behind(0, Heard(p0=7), None, 1.0, now=100.0) is None


# -- bounded memory ----------------------------------------------------------------------------------


def test_memory_is_capped_per_partition_and_ages_err_early_never_late() -> None:
    tracker = acked(0, 1, 2, 3, 4, at=0.0, step=1.0, cap=3)  # kept: (0, 0 s), (1, 1 s), (4, 2 s)
    assert tracker.pending(0) == 3
    # The oldest event really uncovered at heard 2 is offset 3, acknowledged at 3 s: 4.5 s at 7.5 s.
    # The capped entry that stands for 3 and 4 carries 2 s: judged behind a second early.
    behind = tracker.behind(0, Heard(p0=2), None, 5.0, now=7.5)
    assert behind is not None and behind.seconds == 5.5 and behind.events == 2
    assert tracker.behind(0, Heard(p0=4), None, 5.0, now=7.5) is None, "still covered at its real offset"


def test_a_flood_of_acknowledgements_stays_bounded() -> None:
    tracker = AckedOffsets()
    for offset in range(200_000):
        tracker.acknowledged(0, offset, now=0.0)
    assert tracker.pending(0) == 1024
    assert tracker.behind(0, Heard(p0=199_999), 1, 1.0, now=1e9) is None
    assert tracker.pending(0) == 0


def test_max_pending_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_pending"):
        AckedOffsets(0)


# -- the snapshot is where the heard offset is read -------------------------------------------------


def test_the_snapshot_hears_the_newest_heartbeat_or_notice() -> None:
    snapshot = QuotaSnapshot()
    assert snapshot.heard_offset(0) is None
    t = datetime.now(UTC).timestamp()
    snapshot.apply_heartbeat(heartbeat(0, 41, t))
    assert snapshot.heard_offset(0) == 41
    snapshot.apply_notice(QuotaNotice(
        tenant_id="a", period_key=PERIOD, state="warning", used_tokens=1, limit_tokens=2, usage_partition=0,
        usage_offset=57, aggregator_id="agg", emitted_at=datetime.fromtimestamp(t + 1, UTC),
    ))
    assert snapshot.heard_offset(0) == 57
    assert acked(57).behind(0, snapshot, 0, 0.0, now=1e9) is None


# -- configuration ------------------------------------------------------------------------------------


def test_defaults_and_validation() -> None:
    config = ProducerConfig(spool_dir=None)
    assert (config.max_lag_events, config.max_lag_s, config.lag_policy) == (100_000, 60.0, "fail_closed")
    assert ProducerConfig(spool_dir=None, max_lag_events=None, max_lag_s=None).max_lag_s is None
    for bad in ({"max_lag_events": 0}, {"max_lag_s": 0.0}, {"max_lag_s": float("nan")}):
        with pytest.raises(ValueError, match="max_lag"):
            ProducerConfig(spool_dir=None, **bad)  # type: ignore[arg-type]


def test_environment() -> None:
    config = ProducerConfig.from_env({"TOKENGUARD_MAX_LAG_EVENTS": "2500", "TOKENGUARD_MAX_LAG_S": "1.5"})
    assert (config.max_lag_events, config.max_lag_s) == (2500, 1.5)
    config = ProducerConfig.from_env({"TOKENGUARD_MAX_LAG_EVENTS": "off", "TOKENGUARD_MAX_LAG_S": "OFF"})
    assert (config.max_lag_events, config.max_lag_s) == (None, None)
    assert ProducerConfig.from_env({}).max_lag_s == 60.0
    for variable, value in (("TOKENGUARD_MAX_LAG_EVENTS", "0"), ("TOKENGUARD_MAX_LAG_S", "-1"),
                            ("TOKENGUARD_MAX_LAG_S", "soon")):
        with pytest.raises(SettingsError) as caught:
            ProducerConfig.from_env({variable: value})
        assert str(caught.value).startswith(variable), caught.value


# -- the store: policy, logging once each way, counting ---------------------------------------------


def heartbeat(partition: int, offset: int, at: float | None = None) -> Heartbeat:
    at = datetime.now(UTC).timestamp() if at is None else at
    return Heartbeat(usage_partition=partition, usage_offset=offset, aggregator_id="agg",
                     emitted_at=datetime.fromtimestamp(at, UTC))


class Event:
    def __init__(self, tenant: str, tokens: int) -> None:
        self.tenant_id, self.period_key, self.total_tokens = tenant, PERIOD, tokens


def built_store(tmp_path: Path, **changes: object) -> tuple[KafkaQuotaStore, int]:
    config = ProducerConfig(spool_dir=tmp_path / "spool", create_topics=False, max_lag_s=None, **changes)  # type: ignore[arg-type]
    store = KafkaQuotaStore(config)
    store.publisher.partitioner.partitions = 3  # what start() learns from the broker
    return store, store.publisher.partition_of("a")


def test_a_store_judges_a_lagging_partition_stale_and_logs_once_each_way(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store, partition = built_store(tmp_path, max_lag_events=10, lag_policy="fail_closed")
    store.snapshot.apply_heartbeat(heartbeat(partition, 99))
    for offset in range(100, 120):
        store._delivered(Event("a", 1), partition, offset)  # type: ignore[arg-type]
    store.snapshot.apply_heartbeat(heartbeat(partition, 105))  # alive, 14 records behind our newest
    assert store.is_stale("a")
    assert store.peek("a", PERIOD, 1000).reason == STALE_REASON
    with caplog.at_level(logging.WARNING, logger="producer.kafka_store"):
        for _ in range(3):
            refused = store.check("a", PERIOD, 1000)
            assert not refused.allowed and refused.reason == STALE_REASON
        store.snapshot.apply_heartbeat(heartbeat(partition, 109))  # 10 behind: not more than 10
        assert not store.is_stale("a")
        for _ in range(3):
            assert store.check("a", PERIOD, 1000).allowed
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    assert "alive but 14 records" in lines[0] and "fail_closed" in lines[0]
    assert "caught up" in lines[1]
    assert (store.stats.stale_decisions, store.stats.lag_stale_decisions, store.stats.stale_refusals) == (3, 3, 3)


def test_keep_known_under_lag_decides_as_the_snapshot_does(tmp_path: Path) -> None:
    store, partition = built_store(tmp_path, max_lag_events=1, lag_policy="keep_known")
    store.snapshot.apply_heartbeat(heartbeat(partition, -1))
    store.snapshot.add_local("a", PERIOD, 600)
    store._delivered(Event("a", 600), partition, 0)  # type: ignore[arg-type]
    store._delivered(Event("a", 0), partition, 1)  # type: ignore[arg-type]
    decision = store.check("a", PERIOD, 500)
    assert not decision.allowed and decision.reason != STALE_REASON, "known over by its own spend"
    assert store.is_stale("a") and store.check("a", PERIOD, 10**6).allowed, "stale, yet under a larger limit"
    assert store.stats.lag_stale_decisions >= 1 and store.stats.stale_refusals == 0


def test_lag_off_means_only_silence_counts(tmp_path: Path) -> None:
    store, partition = built_store(tmp_path, max_lag_events=None, lag_policy="fail_closed")
    store.snapshot.apply_heartbeat(heartbeat(partition, -1))
    for offset in range(10_000):
        store._delivered(Event("a", 1), partition, offset)  # type: ignore[arg-type]
    assert not store.is_stale("a") and store.check("a", PERIOD, 10**9).allowed
