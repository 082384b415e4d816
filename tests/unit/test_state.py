from __future__ import annotations

from datetime import datetime, timezone

from aggregator.state import Limits, TotalsState, classify
from schemas.usage import UsageEvent

NOW = datetime(2026, 4, 14, tzinfo=timezone.utc)


def event(tenant: str, tokens: int, *, quota: int = 100, period: str = "p") -> UsageEvent:
    return UsageEvent(
        event_id=f"e{tenant}{tokens}xxxxxxxx", tenant_id=tenant, period_key=period, total_tokens=tokens,
        quota_tokens=quota, event_time=NOW, instance_id="i",
    )


def test_classify() -> None:
    assert classify(79, 100, 0.8) == "ok"
    assert classify(80, 100, 0.8) == "warning"
    assert classify(100, 100, 0.8) == "exceeded"
    assert classify(0, 0, 0.8) == "exceeded"


def test_apply_sums_and_reports_state_changes_once() -> None:
    state = TotalsState(Limits())
    for offset, tokens in enumerate([50, 35, 10, 20]):
        assert state.apply(0, offset, event("acme", tokens))
    dirty, changed = state.take_changes()
    assert [(k, t.used, t.state) for k, t in dirty] == [(("acme", "p"), 115, "exceeded")]
    assert [k for k, _ in changed] == [("acme", "p")]
    assert state.take_changes() == ([], [])


def test_replayed_offsets_are_skipped() -> None:
    state = TotalsState(Limits())
    state.apply(0, 0, event("acme", 10))
    state.apply(0, 1, event("acme", 10))
    assert not state.apply(0, 1, event("acme", 10))
    assert not state.apply(0, 0, event("acme", 10))
    assert state.totals[("acme", "p")].used == 20


def test_restore_then_skip_what_the_changelog_holds() -> None:
    first = TotalsState(Limits())
    for offset in range(5):
        first.apply(0, offset, event("acme", 7))
    record = first.to_record(("acme", "p"), first.totals[("acme", "p")], NOW)
    second = TotalsState(Limits())
    second.restore(record)
    # The consumer re-reads from an older committed offset after a crash.
    applied = [second.apply(0, offset, event("acme", 7)) for offset in range(3, 7)]
    assert applied == [False, False, True, True]
    assert second.totals[("acme", "p")].used == 7 * 7


def test_limit_precedence() -> None:
    limits = Limits()
    assert limits.limit_for("acme", 100) == 100
    limits.default_limit = 500
    assert limits.limit_for("acme", 100) == 500
    limits.per_tenant["acme"] = 20
    assert limits.limit_for("acme", 100) == 20


def test_drop_partitions_forgets_only_those() -> None:
    state = TotalsState(Limits())
    state.apply(0, 0, event("a", 1))
    state.apply(1, 0, event("b", 1))
    state.drop_partitions({0})
    assert list(state.totals) == [("b", "p")]
