"""Refusals that help the caller (issue 11, item 4): a refused call's ``QuotaExceededError`` and alert
payload say which limit governs and where it came from, the period and its kind, used/limit, the
remaining headroom and when the window ends (``retry_after_s``); ``TokenGuardMiddleware.headroom``
gives the same figures before a call. Calls go through real ``Agent`` objects and the scripted client;
the window arithmetic (``schemas.periods.window_end``) is tested on its own."""

from __future__ import annotations

import dataclasses
import functools
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from agent_framework import Agent

from producer import KafkaQuotaStore, ProducerConfig, TokenGuardMiddleware, tenant_scope
from producer.errors import QuotaExceededError
from producer.scripted import ScriptedChatClient
from producer.store import Headroom
from producer.token_tracker import InMemoryQuotaStore, day_key, month_key, seed_week_key, week_key
from schemas.notices import QuotaNotice
from schemas.periods import key_function_kind, seconds_until_end, window_end
from schemas.rules import TenantLimit
from tests.helpers import run_agent

BERLIN = ZoneInfo("Europe/Berlin")
SEED_KEYS = {"user_id", "period_key", "used_tokens", "quota_tokens", "reason"}
NEW_KEYS = {"limit_source", "period_kind", "remaining_tokens", "retry_after_s"}

# --------------------------------------------------------------------------------------------
# Window end of a period key: pure arithmetic
# --------------------------------------------------------------------------------------------


def test_month_end_including_the_year_boundary() -> None:
    assert window_end("2026-04") == datetime(2026, 5, 1, tzinfo=UTC)
    assert window_end("2026-02") == datetime(2026, 3, 1, tzinfo=UTC)
    assert window_end("2026-12") == datetime(2027, 1, 1, tzinfo=UTC)


def test_day_end_including_month_and_year_boundaries() -> None:
    assert window_end("2026-04-14") == datetime(2026, 4, 15, tzinfo=UTC)
    assert window_end("2026-04-30") == datetime(2026, 5, 1, tzinfo=UTC)
    assert window_end("2028-02-28") == datetime(2028, 2, 29, tzinfo=UTC)
    assert window_end("2026-12-31") == datetime(2027, 1, 1, tzinfo=UTC)


def test_iso_week_end_is_the_next_monday_even_across_the_year() -> None:
    assert window_end("2026-W16") == datetime(2026, 4, 20, tzinfo=UTC)  # 2026-04-14 is in W16
    assert window_end("2026-W53") == datetime(2027, 1, 4, tzinfo=UTC)  # 2026 has 53 ISO weeks
    assert window_end("2025-W01") == datetime(2025, 1, 6, tzinfo=UTC)  # W01 began on 2024-12-30
    assert window_end("2025-W53") is None  # 2025 has 52


def test_seed_week_ends_on_monday_or_on_new_year() -> None:
    assert window_end("2026-W00", kind="seed_week") == datetime(2026, 1, 5, tzinfo=UTC)
    assert window_end("2026-W15", kind="seed_week") == datetime(2026, 4, 20, tzinfo=UTC)
    assert window_end("2026-W52", kind="seed_week") == datetime(2027, 1, 1, tzinfo=UTC)
    now = datetime(2026, 12, 31, 12, tzinfo=UTC)
    assert seed_week_key(now=now) == "2026-W52"
    assert seconds_until_end(seed_week_key(now=now), kind="seed_week", now=now) == 12 * 3600


def test_every_key_function_changes_its_key_exactly_at_the_window_end() -> None:
    for fn, kind in ((month_key, "month"), (day_key, "day"), (week_key, "week"), (seed_week_key, "seed_week")):
        for tz in (UTC, BERLIN, ZoneInfo("America/New_York")):
            for start in (datetime(2026, 12, 28, 15, tzinfo=UTC), datetime(2026, 3, 28, 23, 30, tzinfo=UTC)):
                key = fn(tz=tz, now=start)
                end = window_end(key, kind=kind, tz=tz)
                assert end is not None
                assert fn(tz=tz, now=end - timedelta(seconds=1)) == key
                assert fn(tz=tz, now=end) != key


def test_a_non_utc_zone_ends_at_local_midnight() -> None:
    end = window_end("2026-03", tz=BERLIN)
    assert end is not None and end.astimezone(UTC) == datetime(2026, 3, 31, 22, tzinfo=UTC)
    # 2026-03-29 in Berlin is 23 hours long (clocks go forward): counted in real seconds.
    start = datetime(2026, 3, 29, tzinfo=BERLIN)
    assert seconds_until_end("2026-03-29", tz=BERLIN, now=start) == 23 * 3600
    assert seconds_until_end("2026-10-25", tz=BERLIN, now=datetime(2026, 10, 25, tzinfo=BERLIN)) == 25 * 3600


def test_unknown_or_impossible_keys_have_no_window_end() -> None:
    for key in ("acme-2026-04", "2026-13", "2026-04-31", "2026-W54", "", "2026-00"):
        assert window_end(key) is None
    assert window_end("2026-04", kind="day") is None
    assert seconds_until_end("2026-04", now=datetime(2027, 1, 1, tzinfo=UTC)) == 0.0, "a past window: 0, never negative"


def test_key_function_kind_sees_through_partial_and_refuses_custom_functions() -> None:
    assert key_function_kind(month_key) == ("month", UTC)
    assert key_function_kind(functools.partial(day_key, tz=BERLIN)) == ("day", BERLIN)
    assert key_function_kind(functools.partial(week_key)) == ("week", UTC)
    assert key_function_kind(lambda: "2026-04") is None
    assert key_function_kind(functools.partial(day_key, now=datetime(2026, 1, 1, tzinfo=UTC))) is None


# --------------------------------------------------------------------------------------------
# Through real agents
# --------------------------------------------------------------------------------------------


async def cost(agent: Agent) -> int:
    records: list[dict[str, Any]] = []
    probe = TokenGuardMiddleware(quota_store=InMemoryQuotaStore(), quota_tokens=10**9, on_usage=records.append)
    await run_agent(agent, middleware=[probe])
    return int(records[0]["total_tokens"])


async def refused(agent: Agent, guard: TokenGuardMiddleware) -> QuotaExceededError:
    with pytest.raises(QuotaExceededError) as caught:
        await run_agent(agent, middleware=[guard])
    return caught.value


def expected_retry(key: str, kind: str, tz: Any = UTC) -> float:
    seconds = seconds_until_end(key, kind=kind, tz=tz)
    assert seconds is not None
    return seconds


async def test_refusal_carries_the_new_fields_and_keeps_the_seed_keys() -> None:
    agent = Agent(ScriptedChatClient())
    spent = await cost(agent)
    alerts: list[dict[str, Any]] = []
    period_fn = functools.partial(day_key, tz=BERLIN)
    guard = TokenGuardMiddleware(
        quota_store=InMemoryQuotaStore(), quota_tokens=spent + 10, period_key_fn=period_fn,
        on_quota_exceeded=alerts.append, alert_details=True, clamp_max_tokens=True, min_headroom_tokens=16,
    )
    await run_agent(agent, middleware=[guard])
    error = await refused(agent, guard)
    key = period_fn()
    retry = expected_retry(key, "day", BERLIN)

    assert isinstance(error, RuntimeError) and type(error) is QuotaExceededError
    assert str(error) == f"Quota exceeded for user=anonymous. Used={spent}, quota={spent + 10}"
    assert (error.tenant_id, error.period_key, error.period_kind) == ("anonymous", key, "day")
    # Refused with 10 tokens left: fewer than the call's input plus min_headroom_tokens.
    assert (error.used, error.limit, error.remaining) == (spent, spent + 10, 10)
    assert error.source == "middleware_default" and error.reason == "headroom_below_minimum"
    assert error.retry_after_s == pytest.approx(retry, abs=5)
    assert 0 < error.retry_after_s <= 25 * 3600

    [alert] = alerts
    assert set(alert) == SEED_KEYS | NEW_KEYS
    assert {k: alert[k] for k in SEED_KEYS} == {
        "user_id": "anonymous", "period_key": key, "used_tokens": spent, "quota_tokens": spent + 10,
        "reason": "headroom_below_minimum",
    }
    assert alert["limit_source"] == "middleware_default" and alert["period_kind"] == "day"
    assert alert["remaining_tokens"] == 10 and alert["retry_after_s"] == error.retry_after_s
    assert error.alert == alert


async def test_without_alert_details_the_payload_is_exactly_the_seeds() -> None:
    agent = Agent(ScriptedChatClient())
    alerts: list[dict[str, Any]] = []
    guard = TokenGuardMiddleware(quota_store=InMemoryQuotaStore(), quota_tokens=10, on_quota_exceeded=alerts.append)
    await run_agent(agent, middleware=[guard])
    error = await refused(agent, guard)
    assert set(alerts[0]) == SEED_KEYS
    assert error.alert is not None and set(error.alert) == SEED_KEYS | NEW_KEYS
    assert error.period_kind == "month" and error.remaining == 0 and error.used is not None and error.used > 10
    assert error.retry_after_s == pytest.approx(expected_retry(month_key(), "month"), abs=5)


async def test_a_custom_period_function_of_unknown_kind_has_no_retry_after() -> None:
    agent = Agent(ScriptedChatClient())
    alerts: list[dict[str, Any]] = []
    guard = TokenGuardMiddleware(
        quota_store=InMemoryQuotaStore(), quota_tokens=10, period_key_fn=lambda: "project-x",
        on_quota_exceeded=alerts.append, alert_details=True,
    )
    await run_agent(agent, middleware=[guard])
    error = await refused(agent, guard)
    assert error.retry_after_s is None and error.period_kind is None and error.period_key == "project-x"
    assert alerts[0]["retry_after_s"] is None and alerts[0]["period_kind"] is None
    # A custom function whose keys look like months: read as months, in UTC.
    guard.period_key_fn = lambda: month_key()
    await run_agent(agent, middleware=[guard])
    error = await refused(agent, guard)
    assert error.period_kind == "month"
    assert error.retry_after_s == pytest.approx(expected_retry(month_key(), "month"), abs=5)


async def test_headroom_before_and_after_spending_with_the_seed_store() -> None:
    agent = Agent(ScriptedChatClient())
    spent = await cost(agent)
    guard = TokenGuardMiddleware(
        quota_store=InMemoryQuotaStore(), quota_tokens=3 * spent, period_key_fn=week_key, warning_ratio=0.5
    )
    with tenant_scope("acme"):
        before = guard.headroom()
        await run_agent(agent, middleware=[guard])
        middle = guard.headroom()
        await run_agent(agent, middleware=[guard])
        await run_agent(agent, middleware=[guard])
        after = guard.headroom()
        error = await refused(agent, guard)
    retry = expected_retry(week_key(), "week")
    assert isinstance(before, Headroom)
    assert dataclasses.replace(before, retry_after_s=None) == Headroom(
        tenant_id="acme", period_key=week_key(), period_kind="week", used=0, limit=3 * spent,
        remaining=3 * spent, state="ok", source="middleware_default", retry_after_s=None,
    )
    assert before.retry_after_s == pytest.approx(retry, abs=5)
    assert (middle.used, middle.remaining, middle.state) == (spent, 2 * spent, "ok")
    assert (after.used, after.remaining, after.state) == (3 * spent, 0, "exceeded")
    assert (error.used, error.remaining, error.limit) == (after.used, after.remaining, after.limit)
    assert guard.headroom("other").used == 0 and guard.headroom("acme", "1999-01").used == 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        after.used = 0  # type: ignore[misc]


async def test_headroom_warning_state() -> None:
    agent = Agent(ScriptedChatClient())
    spent = await cost(agent)
    guard = TokenGuardMiddleware(quota_store=InMemoryQuotaStore(), quota_tokens=spent * 3 // 2, warning_ratio=0.5)
    await run_agent(agent, middleware=[guard])
    assert guard.headroom().state == "warning"


# --------------------------------------------------------------------------------------------
# Which limit governs: a started Kafka store (no aggregator runs: never heard from, so the default
# policy keep_known decides by what is known); limits and notices put in its tables directly
# --------------------------------------------------------------------------------------------


def notice(tenant: str, period: str, used: int, limit: int, state: str) -> QuotaNotice:
    return QuotaNotice(
        tenant_id=tenant, period_key=period, state=state, used_tokens=used, limit_tokens=limit,  # type: ignore[arg-type]
        usage_partition=0, usage_offset=5, aggregator_id="agg", emitted_at=datetime.now(UTC),
    )


async def test_source_is_the_limits_topic_then_the_notice(producer_config: ProducerConfig) -> None:
    async with KafkaQuotaStore(producer_config) as store:
        await source_checks(store)


async def source_checks(store: KafkaQuotaStore) -> None:
    alerts: list[dict[str, Any]] = []
    guard = TokenGuardMiddleware(
        quota_store=store, quota_tokens=10**6, on_quota_exceeded=alerts.append, alert_details=True
    )
    agent = Agent(ScriptedChatClient())
    period = month_key()

    assert guard.headroom("bigco").source == "middleware_default"
    store.limits.table.set("bigco", TenantLimit(100, "month"))
    store.snapshot.add_local("bigco", period, 60)
    room = guard.headroom("bigco")
    assert (room.source, room.used, room.limit, room.remaining, room.state) == ("limits_topic", 60, 100, 40, "ok")
    store.snapshot.add_local("bigco", period, 40)
    with tenant_scope("bigco"):
        error = await refused(agent, guard)
    assert (error.source, error.used, error.limit, error.remaining) == ("limits_topic", 100, 100, 0)
    assert alerts[-1]["limit_source"] == "limits_topic"
    assert error.retry_after_s == pytest.approx(expected_retry(period, "month"), abs=5)

    store.limits.table.delete("bigco")
    store.limits.table.set(None, TenantLimit(500, "any"))
    assert (guard.headroom("bigco").source, guard.headroom("bigco").limit) == ("limits_topic", 500)
    store.limits.table.set(None, TenantLimit(500, "day"))
    assert guard.headroom("bigco").source == "middleware_default", "a day default does not govern month keys"

    store.snapshot.apply_notice(notice("bigco", period, 900, 800, "exceeded"))
    room = guard.headroom("bigco")
    assert (room.source, room.used, room.limit, room.remaining, room.state) == ("notice", 1_000, 800, 0, "exceeded")
    with tenant_scope("bigco"):
        error = await refused(agent, guard)
    assert (error.source, error.used, error.limit, error.remaining) == ("notice", 1_000, 800, 0)
    assert alerts[-1]["limit_source"] == "notice" and alerts[-1]["used_tokens"] == 1_000
    # Two refusals, the second fresh (the notice proves partition 0's aggregator alive): of the
    # decisions made stale only the first counts; headroom(), a read, counts none.
    assert store.stats.stale_decisions == 1
