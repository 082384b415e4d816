"""The quota rules at the call (``producer.rule_gate.RuleGate``): reservations, warn rules, notices,
threshold crossings and the expiry of ended rate windows from the snapshot."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from producer.rule_gate import KEEP_ENDED_S, Reserve, RuleGate
from producer.snapshot import QuotaSnapshot
from schemas.notices import QuotaNotice
from schemas.policy import QuotaRule, counter_key
from schemas.prices import ModelPrice, PriceTable
from schemas.rulebook import RuleBook

T0 = datetime(2026, 1, 1, tzinfo=UTC)
NOW = datetime(2026, 3, 14, 12, 0, 30, tzinfo=UTC)
TENANT = "acme"


def rule(name: str = "daily", limit: int = 100, tenant: str | None = TENANT, **fields: Any) -> QuotaRule:
    fields.setdefault("window", "day")
    return QuotaRule(name=name, tenant_id=tenant, limit=limit, effective_from=T0, updated_at=T0, **fields)


def gate(*rules: QuotaRule, prices: PriceTable | None = None) -> RuleGate:
    book = RuleBook(prices)
    for r in rules:
        book.set(r)
    return RuleGate(book, QuotaSnapshot())


def call(total: int, model: str | None = "gpt-4o") -> Reserve:
    return Reserve(model, 0, total, total)


def counter(r: QuotaRule, value: str = "2026-03-14") -> str:
    return counter_key(r.name, r.basis, value)


def notice(r: QuotaRule, state: str, used: int, limit: int, value: str = "2026-03-14") -> QuotaNotice:
    return QuotaNotice(tenant_id=TENANT, period_key=counter(r, value), state=state, used_tokens=used,  # type: ignore[arg-type]
                       limit_tokens=limit, usage_partition=0, usage_offset=5, aggregator_id="agg", emitted_at=NOW)


def test_no_rule_allows() -> None:
    g = gate()
    verdict = g.admit(TENANT, call(10**9), {}, NOW)
    assert verdict.allowed and verdict.holds == ()
    assert not g.applies(TENANT)


def test_own_reservation_counted_exactly_limit_admits_one_more_refuses() -> None:
    r = rule(limit=100)
    g = gate(r)
    g.snapshot.add_local(TENANT, counter(r), 60)
    first = g.admit(TENANT, call(40), {}, NOW)  # 60 + 0 + 40 == 100
    assert first.allowed and len(first.holds) == 1
    second = g.admit(TENANT, call(1), {}, NOW)  # 60 + 40 in flight + 1 > 100
    assert not second.allowed and second.reason == "rule_exceeded"
    (view,) = second.refused
    assert (view.name, view.used, view.limit, view.remaining) == ("daily", 100, 100, 0)
    assert second.holds == ()
    g.release(first.holds)
    g.release(first.holds)  # idempotent
    assert g.admit(TENANT, call(40), {}, NOW).allowed
    assert not g.admit(TENANT, call(1), {}, NOW).allowed  # 40 in flight again


def test_reservation_larger_than_the_limit_refused_even_when_unused() -> None:
    g = gate(rule(limit=100))
    assert not g.admit(TENANT, call(101), {}, NOW).allowed
    assert g.admit(TENANT, call(100), {}, NOW).allowed


def test_used_at_the_limit_refuses_even_a_zero_reservation() -> None:
    r = rule(limit=100)
    g = gate(r)
    g.snapshot.add_local(TENANT, counter(r), 100)
    assert not g.admit(TENANT, call(0), {}, NOW).allowed


def test_refusal_holds_nothing_in_any_rule() -> None:
    small, big = rule("small", 10), rule("big", 1000)
    g = gate(small, big)
    verdict = g.admit(TENANT, call(11), {}, NOW)
    assert not verdict.allowed
    assert [v.name for v in verdict.refused] == ["small"]
    assert {v.name for v in verdict.views} == {"small", "big"}
    assert {v.name: v.used for v in g.views(TENANT, "gpt-4o", {}, NOW)} == {"small": 0, "big": 0}
    allowed = g.admit(TENANT, call(10), {}, NOW)
    assert allowed.allowed and len(allowed.holds) == 2
    assert {v.name: v.used for v in g.views(TENANT, "gpt-4o", {}, NOW)} == {"small": 10, "big": 10}


def test_warn_rules_never_refuse() -> None:
    r = rule(limit=10, action="warn")
    g = gate(r)
    g.snapshot.add_local(TENANT, counter(r), 500)
    g.snapshot.apply_notice(notice(r, "exceeded", 500, 10))
    verdict = g.admit(TENANT, call(100), {}, NOW, views=True)
    assert verdict.allowed
    assert [v.blocks for v in verdict.views] == [False]


def test_exceeded_notice_with_the_rules_limit_refuses_though_local_used_is_lower() -> None:
    r = rule(limit=100)
    g = gate(r)
    g.snapshot.apply_notice(notice(r, "exceeded", 10, 100))
    verdict = g.admit(TENANT, call(1), {}, NOW)
    assert not verdict.allowed
    assert verdict.refused[0].used == 100


def test_notice_with_another_limit_is_judged_by_numbers() -> None:
    r = rule(limit=100)  # raised since the notice: judged by used and the rule's limit
    g = gate(r)
    g.snapshot.apply_notice(notice(r, "exceeded", 60, 50))
    assert g.admit(TENANT, call(40), {}, NOW).allowed
    assert not g.admit(TENANT, call(1), {}, NOW).allowed


def test_notice_used_plus_local_spend() -> None:
    r = rule(limit=100)
    g = gate(r)
    g.snapshot.apply_notice(notice(r, "ok", 50, 100))
    g.snapshot.add_local(TENANT, counter(r), 30)
    assert g.admit(TENANT, call(20), {}, NOW).allowed
    assert not g.admit(TENANT, call(1), {}, NOW).allowed


def test_retry_after_is_the_windows_end() -> None:
    r = rule(limit=0)
    verdict = gate(r).admit(TENANT, call(1), {}, NOW)
    assert verdict.refused[0].retry_after_s == pytest.approx(12 * 3600 - 30)
    rate = rule("burst", 0, window="rate", window_seconds=60, measure="requests")
    verdict = gate(rate).admit(TENANT, call(1), {}, NOW)
    assert verdict.refused[0].retry_after_s == pytest.approx(30)


def test_only_matching_rules_judge() -> None:
    r = rule(limit=0, model="gpt-4o", attributes={"team": "a"})
    g = gate(r)
    assert g.admit(TENANT, call(1, "other"), {"team": "a"}, NOW).allowed
    assert g.admit(TENANT, call(1), {"team": "b"}, NOW).allowed
    assert not g.admit(TENANT, call(1), {"team": "a"}, NOW).allowed
    assert g.admit("globex", call(1), {"team": "a"}, NOW).allowed


def test_unpriced_call_refused_by_a_refusing_cost_rule() -> None:
    r = rule("budget", 10**9, measure="cost", currency="EUR", unknown_model="refuse")
    verdict = gate(r).admit(TENANT, call(10), {}, NOW)
    assert not verdict.allowed and verdict.reason == "unpriced_model"
    prices = PriceTable()
    prices.set(ModelPrice(model="gpt-4o", currency="EUR", input_per_mtok=1_000_000, output_per_mtok=2_000_000,
                          effective_from=T0, updated_at=T0))
    g = gate(r, prices=prices)
    verdict = g.admit(TENANT, call(10), {}, NOW)
    assert verdict.allowed and [h.tokens for h in verdict.holds] == [20]


def test_release_returns_reservations() -> None:
    r = rule(limit=100)
    g = gate(r)
    holds = [g.admit(TENANT, call(25), {}, NOW).holds for _ in range(4)]
    assert all(holds)
    assert not g.admit(TENANT, call(1), {}, NOW).allowed
    for h in holds:
        g.release(h)
    assert g.views(TENANT, "gpt-4o", {}, NOW)[0].used == 0
    assert g.admit(TENANT, call(100), {}, NOW).allowed


# --- spending and thresholds -----------------------------------------------------------------


def test_spend_counts_locally_and_reports_each_threshold_once() -> None:
    r = rule(limit=100, thresholds=(0.5, 0.8))
    g = gate(r)

    def spend(tokens: int) -> list[str]:
        spent, crossed = g.spend(TENANT, call(tokens), {}, NOW)
        assert spent == [(counter(r), tokens)]
        return [f"{v.name}@{v.level}" for v in crossed]

    assert spend(40) == []
    assert spend(10) == ["daily@1"]  # 50: the 50% threshold
    assert spend(5) == []
    assert spend(30) == ["daily@2"]  # 85: the 80% threshold
    assert spend(10) == []
    assert spend(15) == ["daily@2"]  # 110: the limit
    assert spend(1) == []
    assert g.snapshot.used(TENANT, counter(r)) == 111


def test_spend_crossing_two_thresholds_at_once_reports_once() -> None:
    r = rule(limit=100, thresholds=(0.5, 0.8))
    g = gate(r)
    _, crossed = g.spend(TENANT, call(90), {}, NOW)
    assert len(crossed) == 1 and crossed[0].level == 2
    _, crossed = g.spend(TENANT, call(5), {}, NOW)
    assert crossed == []


def test_spend_of_a_warn_rule_reports_its_limit() -> None:
    r = rule(limit=10, action="warn")
    g = gate(r)
    _, crossed = g.spend(TENANT, call(10), {}, NOW)
    assert [v.blocks for v in crossed] == [False]


# --- rate windows leave the snapshot -------------------------------------------------------


def test_expire_drops_ended_rate_counters_from_the_snapshot() -> None:
    rate = rule("burst", 5, window="rate", window_seconds=60, measure="requests")
    daily = rule("daily", 1000)
    g = gate(rate, daily)
    g.spend(TENANT, call(1), {}, NOW)
    rate_counter = counter(rate, "60s@1773489600")
    assert g.snapshot.holds(TENANT, rate_counter) and g.snapshot.holds(TENANT, counter(daily))
    end = datetime.fromtimestamp(1773489660, UTC)
    g.admit(TENANT, call(1), {}, end + timedelta(seconds=KEEP_ENDED_S))  # ended exactly KEEP_ENDED_S ago: kept
    assert g.snapshot.holds(TENANT, rate_counter)
    g.admit(TENANT, call(1), {}, end + timedelta(seconds=KEEP_ENDED_S + 1))
    assert not g.snapshot.holds(TENANT, rate_counter)
    assert g.snapshot.holds(TENANT, counter(daily))
    assert g._ends == [] and g._tracked == set()


def test_expire_keeps_the_current_rate_window() -> None:
    rate = rule("burst", 2, window="rate", window_seconds=60, measure="requests")
    g = gate(rate)
    g.spend(TENANT, call(1), {}, NOW)
    g.spend(TENANT, call(1), {}, NOW)
    assert not g.admit(TENANT, call(1), {}, NOW).allowed
    later = NOW + timedelta(seconds=200)
    assert g.admit(TENANT, call(1), {}, later).allowed  # a new window, and the old one dropped
    assert not g.snapshot.holds(TENANT, counter(rate, "60s@1773489600"))


def test_expire_drops_rate_counters_known_only_from_notices() -> None:
    rate = rule("burst", 5, window="rate", window_seconds=60, measure="requests")
    g = gate(rate)
    g.snapshot.apply_notice(notice(rate, "exceeded", 5, 5, "60s@1773489600"))
    assert not g.admit(TENANT, call(1), {}, NOW).allowed
    g.admit(TENANT, call(1), {}, NOW + timedelta(seconds=3600))
    assert not g.snapshot.holds(TENANT, counter(rate, "60s@1773489600"))
