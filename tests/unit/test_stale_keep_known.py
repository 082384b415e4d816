"""The default staleness policy keeps what is known (issue 11, item 6): with the aggregator silent, a
tenant known to be over stays refused, a tenant under its limit is admitted until this process's own
spend takes it over. Pure decisions: the snapshot's, then ``judge_stale``."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from producer.config import ProducerConfig, ProducerSettings
from producer.snapshot import STALE_POLICIES, STALE_REASON, QuotaSnapshot, judge_stale
from producer.store import Decision
from schemas.notices import QuotaNotice

T0 = datetime(2026, 4, 14, tzinfo=UTC)
PERIOD = "2026-04"


def notice(tenant: str, used: int, *, state: str, limit: int, offset: int = 9) -> QuotaNotice:
    return QuotaNotice(
        tenant_id=tenant, period_key=PERIOD, state=state, used_tokens=used, limit_tokens=limit,  # type: ignore[arg-type]
        usage_partition=0, usage_offset=offset, aggregator_id="agg", emitted_at=T0,
    )


class Limits:
    def __init__(self, table: dict[str, int]) -> None:
        self.table = table

    def limit_for(self, tenant_id: str, period_key: str) -> int | None:
        return self.table.get(tenant_id)


def stale(snap: QuotaSnapshot, tenant: str, policy: str = "keep_known", default_limit: int = 500) -> Decision:
    return judge_stale(policy, snap.decide(tenant, PERIOD, default_limit))  # type: ignore[arg-type]


def test_keep_known_is_the_default_everywhere() -> None:
    assert ProducerConfig().stale_policy == "keep_known"
    assert ProducerSettings.read({}).config().stale_policy == "keep_known"
    for policy in ("keep_known", "local_only", "fail_open", "fail_closed"):
        assert policy in STALE_POLICIES
        assert ProducerSettings.read({"TOKENGUARD_STALE_POLICY": policy}).config().stale_policy == policy
    with pytest.raises(ValueError, match="TOKENGUARD_STALE_POLICY"):
        ProducerSettings.read({"TOKENGUARD_STALE_POLICY": "keep_guessing"})
    with pytest.raises(ValueError, match="stale_policy"):
        ProducerConfig(stale_policy="keep_guessing")  # type: ignore[arg-type]


def test_exceeded_tenant_stays_refused_when_stale() -> None:
    snap = QuotaSnapshot()
    snap.apply_notice(notice("hot", 1_200, state="exceeded", limit=1_000))
    decision = stale(snap, "hot")
    assert not decision.allowed and (decision.used, decision.limit) == (1_200, 1_000)
    assert decision.reason == "quota_exceeded_before_call", "known to be over: the exceeded reason, not 'stale'"
    assert not decision.final


def test_exceeded_state_refuses_even_when_the_notice_figures_are_under() -> None:
    # The aggregator's verdict counts, not only the figures it carried (e.g. a rule the snapshot does not see).
    snap = QuotaSnapshot()
    snap.apply_notice(notice("hot", 10, state="exceeded", limit=1_000))
    assert not stale(snap, "hot").allowed


def test_ok_tenant_under_its_limit_is_admitted_when_stale() -> None:
    snap = QuotaSnapshot()
    snap.apply_notice(notice("warm", 700, state="warning", limit=1_000))
    decision = stale(snap, "warm")
    assert decision.allowed and (decision.used, decision.limit) == (700, 1_000)
    assert stale(snap, "cold").allowed, "a tenant without a notice: judged by its limit and local spend"


def test_local_spend_crossing_the_limit_while_stale_is_refused() -> None:
    snap = QuotaSnapshot()
    snap.apply_notice(notice("warm", 700, state="warning", limit=1_000))
    snap.add_local("warm", PERIOD, 200)
    snap.acknowledged("warm", PERIOD, 200, partition=0, offset=10)  # above the notice's offset: still counted
    assert stale(snap, "warm").allowed
    snap.add_local("warm", PERIOD, 100)  # 700 + 300 = the limit
    decision = stale(snap, "warm")
    assert not decision.allowed and decision.used == 1_000


def test_the_governing_limit_without_a_notice() -> None:
    snap = QuotaSnapshot(Limits({"big": 10_000}))
    snap.add_local("big", PERIOD, 600)
    snap.add_local("small", PERIOD, 600)
    assert stale(snap, "big", default_limit=500).allowed, "the limits table's limit governs, not quota_tokens"
    assert not stale(snap, "small", default_limit=500).allowed, "no limits record: quota_tokens governs"
    snap.add_local("big", PERIOD, 9_400)
    assert not stale(snap, "big", default_limit=500).allowed


def test_local_only_is_the_same_policy() -> None:
    snap = QuotaSnapshot()
    snap.apply_notice(notice("hot", 1_200, state="exceeded", limit=1_000))
    snap.add_local("cold", PERIOD, 100)
    for tenant in ("hot", "cold", "new"):
        assert stale(snap, tenant, "local_only") == stale(snap, tenant, "keep_known")


def test_fail_open_and_fail_closed_stay_explicit_choices() -> None:
    snap = QuotaSnapshot()
    snap.apply_notice(notice("hot", 1_200, state="exceeded", limit=1_000))
    opened = stale(snap, "hot", "fail_open")
    assert opened.allowed and opened.final, "fail_open admits even a tenant known to be over"
    closed = stale(snap, "cold", "fail_closed")
    assert not closed.allowed and closed.reason == STALE_REASON and closed.final
    with pytest.raises(ValueError, match="stale_policy"):
        judge_stale("sometimes", Decision(True, 0, 1))  # type: ignore[arg-type]
