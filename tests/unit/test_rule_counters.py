"""The aggregator's state with quota rules (``aggregator.state``): every event counted once in its
tenant-period and once in the counter of every rule it matches, each key with its own replay
guard; rate-window counters expire; the verifier's ``Recompute`` counts the same."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator.state import Limits, Outcome, Totals, TotalsState
from aggregator.verify import Recompute
from schemas.policy import QuotaRule, counter_key
from schemas.usage import UsageEvent
from schemas.wire import encode, usage_key
from transport.partitioning import partition_for

T0 = datetime(2026, 1, 1, tzinfo=UTC)
NOW = datetime(2026, 3, 14, 12, 0, 30, tzinfo=UTC)
_ids = itertools.count()


def rule(name: str, tenant: str | None = None, limit: int = 1000, **fields: Any) -> QuotaRule:
    return QuotaRule(name=name, tenant_id=tenant, limit=limit, effective_from=fields.pop("effective_from", T0),
                     updated_at=T0, **fields)


def event(tenant: str = "acme", tokens: int = 10, *, when: datetime = NOW, event_id: str | None = None,
          **fields: Any) -> UsageEvent:
    return UsageEvent(event_id=event_id or f"evt{next(_ids):08d}", tenant_id=tenant, period_key="2026-03",
                      total_tokens=tokens, quota_tokens=10**6, event_time=when, instance_id="i", **fields)


DAILY = rule("daily", None, 100, window="day")
BURST = rule("burst", None, 3, window="rate", window_seconds=60, measure="requests")
GPT = rule("gpt", "acme", 50, model="gpt-4o", window="month", thresholds=(0.5,))


def state_with(*rules: QuotaRule) -> TotalsState:
    limits = Limits()
    for r in rules:
        limits.rules.set(r)
    return TotalsState(limits)


def key_of(r: QuotaRule, value: str, tenant: str = "acme") -> tuple[str, str]:
    return (tenant, counter_key(r.name, r.basis, value))


DAY = key_of(DAILY, "2026-03-14")
RATE = key_of(BURST, "60s@1773489600")
MONTH = key_of(GPT, "2026-03")
PERIOD = ("acme", "2026-03")


def used(state: TotalsState) -> dict[tuple[str, str], tuple[int, int]]:
    return {key: (t.used, t.events) for key, t in state.totals.items()}


def test_rate_key_is_the_minute_of_now() -> None:
    assert NOW.timestamp() // 60 * 60 == 1773489600


def test_event_counted_once_in_each_key() -> None:
    state = state_with(DAILY, BURST, GPT)
    assert state.apply(0, 0, event(tokens=10, model="gpt-4o")) is Outcome.APPLIED
    assert state.apply(0, 1, event(tokens=5, model="other")) is Outcome.APPLIED
    assert used(state) == {PERIOD: (15, 2), DAY: (15, 2), RATE: (2, 2), MONTH: (10, 1)}
    assert all(t.applied_offset == (0 if key == MONTH else 1) for key, t in state.totals.items())
    dirty, _ = state.take_changes()
    assert {key for key, _ in dirty} == {PERIOD, DAY, RATE, MONTH}


def test_no_rules_only_the_tenant_period() -> None:
    state = state_with(GPT)  # acme's only
    state.apply(0, 0, event("globex", 10, model="gpt-4o"))
    assert used(state) == {("globex", "2026-03"): (10, 1)}


def test_duplicate_and_conflict_dropped_from_every_key() -> None:
    state = state_with(DAILY, BURST)
    first = event(tokens=10, event_id="evt-same-1")
    assert state.apply(0, 0, first) is Outcome.APPLIED
    assert state.apply(0, 1, first) is Outcome.DUPLICATE
    assert state.apply(0, 2, event(tokens=99, event_id="evt-same-1")) is Outcome.CONFLICT
    assert used(state) == {PERIOD: (10, 1), DAY: (10, 1), RATE: (1, 1)}


def test_full_replay_is_skipped_in_every_key() -> None:
    state = state_with(DAILY, BURST)
    e = event(tokens=10)
    state.apply(0, 7, e)
    assert state.apply(0, 7, e) is Outcome.REPLAY
    assert state.apply(0, 6, event(tokens=3)) is Outcome.REPLAY
    assert used(state) == {PERIOD: (10, 1), DAY: (10, 1), RATE: (1, 1)}


def restored(state: TotalsState, key: tuple[str, str], used_tokens: int, events: int, offset: int,
             partition: int = 0) -> None:
    totals = Totals(partition=partition, used=used_tokens, events=events, applied_offset=offset)
    state.restore(state.to_record(key, totals, NOW))


def test_partial_replay_adds_the_event_only_where_missing() -> None:
    """A crash between two changelog writes: the tenant-period key was written through offset 5,
    the daily counter only through 4, the rate counter not at all."""
    state = state_with(DAILY, BURST)
    restored(state, PERIOD, 110, 6, 5)
    restored(state, DAY, 100, 5, 4)
    e = event(tokens=10)
    assert state.apply(0, 5, e) is Outcome.APPLIED
    assert used(state) == {PERIOD: (110, 6), DAY: (110, 6), RATE: (1, 1)}
    assert state.totals[PERIOD].applied_offset == 5
    assert state.totals[DAY].applied_offset == 5
    assert state.apply(0, 5, e) is Outcome.REPLAY  # now in every key
    assert state.apply(0, 6, e) is Outcome.DUPLICATE
    assert used(state) == {PERIOD: (110, 6), DAY: (110, 6), RATE: (1, 1)}


def test_partial_replay_the_other_way_round() -> None:
    state = state_with(DAILY)
    restored(state, DAY, 10, 1, 3)
    assert state.apply(0, 3, event(tokens=10)) is Outcome.APPLIED
    assert used(state) == {PERIOD: (10, 1), DAY: (10, 1)}
    assert state.totals[PERIOD].event_quota == 10**6


def test_rule_counter_judged_by_its_rule() -> None:
    state = state_with(GPT)
    state.apply(0, 0, event(tokens=24, model="gpt-4o"))
    assert state.totals[MONTH].state == "ok"
    state.apply(0, 1, event(tokens=1, model="gpt-4o"))
    assert (state.totals[MONTH].state, state.totals[MONTH].limit) == ("warning", 50)
    state.apply(0, 2, event(tokens=25, model="gpt-4o"))
    assert state.totals[MONTH].state == "exceeded"
    _, notify = state.take_changes()
    assert {(key, reason) for key, _, reason in notify} == {(MONTH, "state_changed")}


def test_limits_rule_for_counter_keys() -> None:
    limits = Limits()
    limits.rules.set(GPT)
    limits.rules.set(DAILY)
    assert limits.rule("acme", MONTH[1], None) == (50, 0.5)
    assert limits.rule("acme", DAY[1], None) == (100, 1.0)
    # a limit or threshold change keeps the basis
    limits.rules.set(rule("gpt", "acme", 70, model="gpt-4o", window="month", thresholds=(0.8,)))
    assert limits.rule("acme", MONTH[1], None) == (70, 0.8)
    # a change of what is counted: the old counter has no rule any more
    limits.rules.set(rule("gpt", "acme", 70, model="gpt-4o-mini", window="month"))
    assert limits.rule("acme", MONTH[1], None) is None
    limits.rules.delete(None, "daily")
    assert limits.rule("acme", DAY[1], None) is None
    for hostile in ["rule:", "rule:x", "rule:daily~zzzzzz:2026", "rule:gpt~" + GPT.basis]:
        assert limits.rule("acme", hostile, None) is None


def test_removed_rule_keeps_the_counters_last_judgement() -> None:
    state = state_with(GPT)
    state.apply(0, 0, event(tokens=60, model="gpt-4o"))
    assert state.totals[MONTH].state == "exceeded"
    state.limits.rules.delete("acme", "gpt")
    state.reevaluate("acme")
    assert state.totals[MONTH].state == "exceeded"


# --- rate windows expire ---------------------------------------------------------------------


def test_expire_drops_only_ended_windows() -> None:
    """Rate windows end exactly; a calendar window is dropped once it has ended in every zone
    (its UTC end plus 14 hours) and ``keep_s`` passed; the tenant-period key is never expired."""
    state = state_with(DAILY, BURST)
    state.apply(0, 0, event())
    later = NOW + timedelta(seconds=60)  # the next minute
    state.apply(0, 1, event(when=later))
    next_rate = key_of(BURST, "60s@1773489660")
    end = 1773489660.0
    assert state.expire(end + 30, 30) == 0  # ended exactly keep_s ago: kept
    state.take_changes()
    assert state.expire(end + 30.001, 30) == 1
    assert RATE not in state.totals and next_rate in state.totals and DAY in state.totals and PERIOD in state.totals
    assert state.take_expired() == [(RATE, 0)]
    assert state.take_expired() == []
    assert state.expire(end + 10_000, 30) == 1
    assert state.take_expired() == [(next_rate, 0)]
    assert set(state.totals) == {PERIOD, DAY}
    assert state.expire(end + 10**9, 0) == 1
    assert state.take_expired() == [(DAY, 0)] and set(state.totals) == {PERIOD}


def test_expire_forgets_pending_changes_of_the_expired() -> None:
    state = state_with(BURST)
    state.apply(3, 0, event())
    assert state.expire(NOW.timestamp() + 10_000, 60) == 1
    dirty, notify = state.take_changes()
    assert RATE not in {key for key, _ in dirty}
    assert RATE not in {key for key, _, _ in notify}
    assert state.take_expired() == [(RATE, 3)]


def test_restored_rate_counters_expire_too() -> None:
    state = state_with()  # the rule is gone: the counter still expires by its value
    restored(state, RATE, 2, 2, 9, partition=4)
    restored(state, DAY, 2, 2, 9, partition=4)
    assert state.expire(1773489660 + 61, 60) == 1
    assert state.take_expired() == [(RATE, 4)]


def test_drop_partitions_forgets_rate_index_entries() -> None:
    state = state_with(BURST)
    state.apply(1, 0, event("acme"))
    state.apply(2, 0, event("globex"))
    assert state.expire(NOW.timestamp() - 1, 0) == 0
    state.drop_partitions({1})
    assert state._counter_ends == {key_of(BURST, "60s@1773489600", "globex"): 1773489660.0}
    assert state.expire(NOW.timestamp() + 10_000, 0) == 1
    assert state.take_expired() == [(key_of(BURST, "60s@1773489600", "globex"), 2)]


def test_drop_partitions_drops_pending_expired_of_those_partitions() -> None:
    state = state_with(BURST)
    state.apply(1, 0, event("acme"))
    state.apply(2, 0, event("globex"))
    assert state.expire(NOW.timestamp() + 10_000, 0) == 2
    state.drop_partitions({1})
    assert state.take_expired() == [(key_of(BURST, "60s@1773489600", "globex"), 2)]


# --- hostile event times ---------------------------------------------------------------------


@pytest.mark.parametrize("r", [rule("m", None, window="month"), rule("y", None, window="year"),
                               rule("d", None, window="day", timezone="Australia/Lord_Howe")])
def test_far_future_event_never_raises(r: QuotaRule) -> None:
    state = state_with(r)
    state.apply(0, 0, event(when=datetime(9999, 12, 31, 23, tzinfo=UTC)))
    assert state.totals[PERIOD].used == 10


# --- the verifier counts the same --------------------------------------------------------------


class Record(NamedTuple):
    partition: int
    key: bytes
    value: bytes
    headers: list[tuple[str, bytes | None]]


PARTITIONS = 4


def record(e: UsageEvent) -> Record:
    key = usage_key(e.tenant_id)
    return Record(partition_for(key, PARTITIONS), key, encode(e), [])


@settings(max_examples=60, deadline=None)
@given(
    picks=st.lists(
        st.tuples(st.sampled_from(["acme", "globex"]), st.integers(0, 500), st.sampled_from(["gpt-4o", "x", None]),
                  st.integers(0, 3 * 86400), st.integers(0, 9)),
        min_size=1, max_size=40),
)
def test_recompute_with_rules_equals_the_state(picks: list[tuple[str, int, str | None, int, int]]) -> None:
    rules = [DAILY, BURST, GPT, rule("io", "globex", measure="output_tokens", window="week", timezone="Europe/Paris"),
             rule("w", None, measure="weighted_tokens", input_weight=0.5, output_weight=2.125, window="hour",
                  timezone="America/New_York")]
    state = state_with(*rules)
    recompute = Recompute(PARTITIONS, state.limits.rules)
    offsets: dict[int, int] = {}
    events = []
    for tenant, tokens, model, seconds, repeat in picks:
        if repeat == 0 and events:
            e = events[-1]  # a duplicate at a new offset
        else:
            split = tokens // 3 if repeat % 2 else None
            e = event(tenant, tokens, model=model, when=NOW + timedelta(seconds=seconds), input_tokens=split)
        events.append(e)
        rec = record(e)
        offset = offsets[rec.partition] = offsets.get(rec.partition, -1) + 1
        state.apply(rec.partition, offset, e)
        recompute.add(rec)
    expected = {key: (t.used, t.events) for key, t in recompute.totals().items()}
    assert expected == used(state)
    assert all(recompute.partition_of[key] == state.totals[key].partition for key in expected)
