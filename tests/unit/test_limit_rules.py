"""Which limit applies, one rule on both sides (``schemas.rules``); the middleware's snapshot judges a
tenant without a notice by its own limit; no event can raise a limit in the aggregator."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime

import pytest

from aggregator.state import Limits, TotalsState, lowest_quota
from producer.limits_feed import LimitsTable
from producer.snapshot import QuotaSnapshot
from schemas.errors import DecodeError
from schemas.limits import QuotaLimit
from schemas.notices import QuotaNotice
from schemas.rules import TenantLimit, applicable, read_limit_record
from schemas.totals import TotalsRecord
from schemas.usage import UsageEvent
from schemas.wire import encode, limit_key

NOW = datetime(2026, 4, 14, tzinfo=UTC)
_ids = itertools.count()
KEYS = ["2026-04", "2026-W16", "2026-04-14", "custom-bucket"]


def limit(tenant: str | None, tokens: int, period: str = "any", ratio: float | None = None) -> QuotaLimit:
    return QuotaLimit(tenant_id=tenant, limit_tokens=tokens, period=period, warning_ratio=ratio, updated_at=NOW)  # type: ignore[arg-type]


def event(tenant: str, tokens: int, *, quota: int, period: str = "2026-04") -> UsageEvent:
    return UsageEvent(
        event_id=f"evt{next(_ids):08d}", tenant_id=tenant, period_key=period, total_tokens=tokens,
        quota_tokens=quota, event_time=NOW, instance_id="i",
    )


# --- the shared precedence rule -------------------------------------------------------------


def test_own_record_then_default_each_only_for_its_period_kind() -> None:
    own, default = limit("acme", 50, "day"), limit(None, 300, "month")
    assert applicable(own, default, "2026-04-14") is own
    assert applicable(own, default, "2026-04") is default
    assert applicable(own, default, "2026-W16") is None
    assert applicable(limit("acme", 9), default, "custom-bucket") is not None  # "any" holds for custom keys
    assert applicable(own, default, "custom-bucket") is None
    assert applicable(None, None, "2026-04") is None


@pytest.mark.parametrize("own_period", ["any", "month", "week", "day", None])
@pytest.mark.parametrize("default_period", ["any", "month", "week", "day", None])
def test_the_middleware_and_the_aggregator_pick_the_same_record(own_period: str | None, default_period: str | None) -> None:
    aggregator, table = Limits(), LimitsTable()
    for record in (limit("acme", 111, own_period) if own_period else None,
                   limit(None, 222, default_period, 0.5) if default_period else None):
        if record is not None:
            aggregator.set(record)
            table.set(record.tenant_id, TenantLimit.of(record))
    for tenant, key in itertools.product(["acme", "globex"], KEYS):
        fallback = 7
        chosen = table.limit_for(tenant, key)
        assert aggregator.rule(tenant, key, fallback)[0] == (fallback if chosen is None else chosen), (tenant, key)


def test_a_limits_record_is_read_alike_by_both_sides() -> None:
    record = limit("acme", 10)
    assert read_limit_record(limit_key("acme"), encode(record)) == ("acme", record)
    assert read_limit_record(limit_key(None), None) == (None, None)
    with pytest.raises(DecodeError) as mismatch:
        read_limit_record(limit_key("globex"), encode(record))
    assert mismatch.value.reason == "key_value_mismatch"
    with pytest.raises(DecodeError) as bad_key:
        read_limit_record(b"[" * 10_000, encode(record))
    assert bad_key.value.reason == "invalid_key"
    with pytest.raises(DecodeError):
        read_limit_record(limit_key("acme"), b"not json")


# --- the middleware's snapshot ----------------------------------------------------------------


def snapshot_with(*records: QuotaLimit) -> tuple[QuotaSnapshot, LimitsTable]:
    table = LimitsTable()
    for record in records:
        table.set(record.tenant_id, TenantLimit.of(record))
    return QuotaSnapshot(table), table


def test_without_a_limits_record_the_middleware_default_governs_as_in_the_seed() -> None:
    snapshot, _ = snapshot_with()
    assert snapshot.decide("acme", "2026-04", 1_000) == (True, 0, 1_000, "quota_exceeded_before_call", False)
    snapshot.add_local("acme", "2026-04", 1_000)
    assert not snapshot.decide("acme", "2026-04", 1_000).allowed
    assert QuotaSnapshot().decide("acme", "2026-04", 1_000).limit == 1_000  # no table at all


def test_a_tenant_limit_above_the_default_governs_from_the_first_call() -> None:
    snapshot, _ = snapshot_with(limit("bigco", 1_000_000))
    assert snapshot.decide("bigco", "2026-04", 1_000).limit == 1_000_000
    snapshot.add_local("bigco", "2026-04", 5_000)
    decision = snapshot.decide("bigco", "2026-04", 1_000)
    assert decision.allowed and decision.used == 5_000 and decision.limit == 1_000_000


def test_a_tenant_limit_below_the_default_refuses_at_that_limit() -> None:
    snapshot, _ = snapshot_with(limit("small", 500))
    snapshot.add_local("small", "2026-04", 499)
    assert snapshot.decide("small", "2026-04", 1_000).allowed
    snapshot.add_local("small", "2026-04", 1)
    assert snapshot.decide("small", "2026-04", 1_000) == (False, 500, 500, "quota_exceeded_before_call", False)
    assert snapshot_with(limit("zero", 0))[0].decide("zero", "2026-04", 1_000).allowed is False


def test_the_topic_default_record_governs_tenants_without_their_own() -> None:
    snapshot, table = snapshot_with(limit(None, 2_000), limit("acme", 50, "day"))
    assert snapshot.decide("globex", "2026-04", 1_000).limit == 2_000
    assert snapshot.decide("acme", "2026-04-14", 1_000).limit == 50
    assert snapshot.decide("acme", "2026-04", 1_000).limit == 2_000  # acme's day limit: not a month key
    table.delete(None)
    assert snapshot.decide("acme", "2026-04", 1_000).limit == 1_000
    table.delete("acme")
    assert snapshot.decide("acme", "2026-04-14", 1_000).limit == 1_000


def test_a_notice_governs_over_the_limits_table() -> None:
    snapshot, _ = snapshot_with(limit("acme", 1_000_000))
    snapshot.apply_notice(QuotaNotice(
        tenant_id="acme", period_key="2026-04", state="warning", used_tokens=850, limit_tokens=1_000,
        usage_partition=0, usage_offset=3, aggregator_id="a", emitted_at=NOW,
    ))
    assert snapshot.decide("acme", "2026-04", 5).limit == 1_000
    snapshot.forget_notice("acme", "2026-04")
    assert snapshot.decide("acme", "2026-04", 5).limit == 1_000_000


def test_the_table_keeps_the_compact_form() -> None:
    _, table = snapshot_with(limit("acme", 10, "week", 0.5))
    assert table.per_tenant == {"acme": TenantLimit(10, "week", 0.5)}
    assert type(table.per_tenant["acme"]) is TenantLimit and len(table) == 1


# --- no event can raise a limit (aggregator) --------------------------------------------------


def test_lowest_quota_is_monotone() -> None:
    assert lowest_quota(None, 500) == 500
    assert lowest_quota(500, 10**12) == 500
    assert lowest_quota(500, 100) == 100


def test_an_event_with_a_huge_quota_does_not_unblock_an_exceeded_tenant() -> None:
    state = TotalsState(Limits())
    state.apply(0, 0, event("acme", 600, quota=500))
    _, notify = state.take_changes()
    assert [(t.state, t.limit) for _, t, _ in notify] == [("exceeded", 500)]
    state.apply(0, 1, event("acme", 1, quota=10**12))
    dirty, notify = state.take_changes()
    assert notify == []
    assert [(t.state, t.limit, t.event_quota) for _, t in dirty] == [("exceeded", 500, 500)]


def test_an_event_with_a_smaller_quota_lowers_the_limit() -> None:
    state = TotalsState(Limits())
    state.apply(0, 0, event("acme", 300, quota=1_000))
    state.apply(0, 1, event("acme", 10, quota=200))
    totals = state.totals[("acme", "2026-04")]
    assert (totals.limit, totals.state, totals.event_quota) == (200, "exceeded", 200)


def test_the_lowest_quota_survives_a_restore_through_the_changelog() -> None:
    state = TotalsState(Limits())
    state.apply(0, 0, event("acme", 600, quota=500))
    state.apply(0, 1, event("acme", 1, quota=10**12))
    ((key, totals),), _ = state.take_changes()
    record = TotalsRecord.model_validate_json(encode(state.to_record(key, totals, NOW)))
    assert record.event_quota_tokens == 500
    restored = TotalsState(Limits())
    restored.restore(record)
    restored.apply(0, 2, event("acme", 1, quota=10**12))
    assert restored.totals[key].event_quota == 500 and restored.totals[key].state == "exceeded"


def test_a_limits_record_or_configured_default_still_outranks_event_quotas() -> None:
    limits = Limits(default_limit=10_000)
    state = TotalsState(limits)
    state.apply(0, 0, event("acme", 600, quota=500))
    assert state.totals[("acme", "2026-04")].state == "ok"
    limits.set(limit("acme", 300))
    state.reevaluate("acme")
    assert state.totals[("acme", "2026-04")].state == "exceeded"
