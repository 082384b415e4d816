from __future__ import annotations

import itertools
from datetime import UTC, datetime

from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator.dedup import DedupWindow
from aggregator.state import Limits, Outcome, TotalsState, classify
from schemas.limits import QuotaLimit
from schemas.totals import TotalsRecord
from schemas.usage import UsageEvent

NOW = datetime(2026, 4, 14, tzinfo=UTC)
_ids = itertools.count()


def event(tenant: str, tokens: int, *, quota: int = 100, period: str = "p", event_id: str | None = None) -> UsageEvent:
    return UsageEvent(
        event_id=event_id or f"evt{next(_ids):08d}", tenant_id=tenant, period_key=period, total_tokens=tokens,
        quota_tokens=quota, event_time=NOW, instance_id="i",
    )


def test_classify() -> None:
    assert classify(79, 100, 0.8) == "ok"
    assert classify(80, 100, 0.8) == "warning"
    assert classify(100, 100, 0.8) == "exceeded"
    assert classify(0, 0, 0.8) == "exceeded"


def test_apply_sums_and_reports_each_state_change_once() -> None:
    state = TotalsState(Limits())
    for offset, tokens in enumerate([50, 35, 10, 20]):
        assert state.apply(0, offset, event("acme", tokens)) is Outcome.APPLIED
    dirty, notify = state.take_changes()
    assert [(k, t.used, t.state) for k, t in dirty] == [(("acme", "p"), 115, "exceeded")]
    assert [(k, reason) for k, _, reason in notify] == [(("acme", "p"), "state_changed")]
    assert state.take_changes() == ([], [])


def test_replayed_offsets_are_skipped() -> None:
    state = TotalsState(Limits())
    first, second = event("acme", 10), event("acme", 10)
    state.apply(0, 0, first)
    state.apply(0, 1, second)
    assert state.apply(0, 1, second) is Outcome.REPLAY
    assert state.apply(0, 0, first) is Outcome.REPLAY
    assert state.totals[("acme", "p")].used == 20


def test_same_event_id_at_a_new_offset_is_a_duplicate() -> None:
    state = TotalsState(Limits())
    original = event("acme", 10)
    assert state.apply(0, 0, original) is Outcome.APPLIED
    assert state.apply(0, 5, original) is Outcome.DUPLICATE
    assert state.totals[("acme", "p")].used == 10


def test_restore_then_skip_what_the_changelog_holds() -> None:
    events = [event("acme", 7) for _ in range(7)]
    first = TotalsState(Limits())
    for offset in range(5):
        first.apply(0, offset, events[offset])
    record = first.to_record(("acme", "p"), first.totals[("acme", "p")], NOW)
    second = TotalsState(Limits())
    second.restore(record)
    # The consumer re-reads from an older committed offset after a crash.
    outcomes = [second.apply(0, offset, events[offset]) for offset in range(3, 7)]
    assert outcomes == [Outcome.REPLAY, Outcome.REPLAY, Outcome.APPLIED, Outcome.APPLIED]
    assert second.totals[("acme", "p")].used == 7 * 7


def test_remembered_ids_drop_duplicates_after_a_restart() -> None:
    original = event("acme", 10)
    state = TotalsState(Limits())
    state.remember(0, [original])
    assert state.apply(0, 9, original) is Outcome.DUPLICATE


def test_dedup_is_per_tenant_and_other_content_is_a_conflict() -> None:
    state = TotalsState(Limits())
    victim = event("acme", 10)
    assert state.apply(0, 0, victim.model_copy(update={"tenant_id": "evil", "total_tokens": 99})) is Outcome.APPLIED
    assert state.apply(0, 1, victim) is Outcome.APPLIED  # another tenant's reuse of the id changes nothing
    assert state.apply(0, 2, victim.model_copy(update={"total_tokens": 11})) is Outcome.CONFLICT
    assert state.apply(0, 3, victim) is Outcome.DUPLICATE
    assert state.totals[("acme", "p")].used == 10 and state.totals[("evil", "p")].used == 99


def test_limit_precedence() -> None:
    limits = Limits()
    assert limits.rule("acme", "2026-04", 100) == (100, 0.8)
    limits.default_limit = 500
    assert limits.rule("acme", "2026-04", 100) == (500, 0.8)
    limits.set(QuotaLimit(tenant_id=None, limit_tokens=300, updated_at=NOW))
    assert limits.rule("acme", "2026-04", 100) == (300, 0.8)
    limits.set(QuotaLimit(tenant_id="acme", limit_tokens=20, warning_ratio=0.5, updated_at=NOW))
    assert limits.rule("acme", "2026-04", 100) == (20, 0.5)
    assert limits.rule("globex", "2026-04", 100) == (300, 0.8)
    limits.delete("acme")
    assert limits.rule("acme", "2026-04", 100) == (300, 0.8)


def test_limit_for_one_period_kind_only() -> None:
    limits = Limits()
    limits.set(QuotaLimit(tenant_id="acme", limit_tokens=50, period="day", updated_at=NOW))
    assert limits.rule("acme", "2026-04-14", 1000) == (50, 0.8)
    assert limits.rule("acme", "2026-04", 1000) == (1000, 0.8)


def test_raised_limit_unblocks_and_lowered_limit_blocks() -> None:
    limits = Limits()
    state = TotalsState(limits)
    state.apply(0, 0, event("acme", 150, quota=100))
    state.take_changes()
    limits.set(QuotaLimit(tenant_id="acme", limit_tokens=1000, updated_at=NOW))
    state.reevaluate("acme")
    _, notify = state.take_changes()
    assert [(t.state, t.limit, reason) for _, t, reason in notify] == [("ok", 1000, "limit_changed")]
    limits.set(QuotaLimit(tenant_id="acme", limit_tokens=100, updated_at=NOW))
    state.reevaluate(None)
    _, notify = state.take_changes()
    assert [(t.state, t.limit) for _, t, _ in notify] == [("exceeded", 100)]


def test_drop_partitions_forgets_only_those() -> None:
    state = TotalsState(Limits())
    state.apply(0, 0, event("a", 1))
    state.apply(1, 0, event("b", 1))
    state.drop_partitions({0})
    assert list(state.totals) == [("b", "p")]


def test_dedup_window_is_bounded() -> None:
    window = DedupWindow(3)
    for event_id in "abcd":
        window.add(("t", event_id))
    assert ("t", "a") not in window and all(("t", x) in window for x in "bcd") and len(window) == 3


# A usage log: (tenant, tokens) per offset, some entries re-publishing an earlier event (same id).
log_entries = st.lists(
    st.tuples(st.sampled_from(["a", "b", "c"]), st.integers(0, 500), st.integers(0, 40)), min_size=1, max_size=60
)


@settings(max_examples=200, deadline=None)
@given(entries=log_entries, crash_points=st.lists(st.integers(0, 60), max_size=5), data=st.data())
def test_any_delivery_with_duplicates_and_crash_replays_gives_one_clean_pass(
    entries: list[tuple[str, int, int]], crash_points: list[int], data: st.DataObject
) -> None:
    """Build a partition log where some records duplicate earlier events; deliver it with crashes
    that restore from the last flushed changelog and re-read from the last committed offset."""
    log: list[UsageEvent] = []
    for tenant, tokens, back in entries:
        if back and back <= len(log):
            log.append(log[-back])  # a re-published event: same id, new offset
        else:
            log.append(event(tenant, tokens))
    clean: dict[tuple[str, str], int] = {}
    seen: set[str] = set()
    for e in log:
        if e.event_id not in seen:
            seen.add(e.event_id)
            clean[(e.tenant_id, e.period_key)] = clean.get((e.tenant_id, e.period_key), 0) + e.total_tokens

    changelog: dict[tuple[str, str], object] = {}
    committed = 0
    state = TotalsState(Limits(default_limit=10**9))
    position = 0
    crashes = sorted(set(crash_points))
    while position < len(log):
        state.apply(0, position, log[position])
        position += 1
        if data.draw(st.booleans(), label="flush here"):
            dirty, _ = state.take_changes()
            for key, totals in dirty:
                changelog[key] = state.to_record(key, totals, NOW)
            # Commit lags the changelog by a random amount (a crash between steps 3 and 4).
            committed = data.draw(st.integers(committed, position), label="commit")
        if crashes and position >= crashes[0]:
            crashes.pop(0)
            state = TotalsState(Limits(default_limit=10**9))
            for record in changelog.values():
                state.restore(record)  # type: ignore[arg-type]
            state.remember(0, (e for e in log[max(0, committed - state.dedup_window) : committed]))
            position = committed
    assert {key: totals.used for key, totals in state.totals.items() if totals.events} == clean


def test_changelog_fast_encoding_decodes_to_the_record_model() -> None:
    from schemas.wire import decode_totals, encode, encode_fields

    state = TotalsState(Limits())
    state.apply(3, 41, event("acme", 70))
    key, totals = ("acme", "p"), state.totals[("acme", "p")]
    assert set(state.record_fields(key, totals, NOW)) == set(TotalsRecord.model_fields)
    fast = decode_totals(encode_fields(state.record_fields(key, totals, NOW)))
    assert fast == decode_totals(encode(state.to_record(key, totals, NOW)))
    assert (fast.used_tokens, fast.usage_partition, fast.applied_offset, fast.state) == (70, 3, 41, "ok")
