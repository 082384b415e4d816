"""The middleware's own rules, through real Agent objects over the scripted client (no broker)."""

from __future__ import annotations

import asyncio

import pytest
from agent_framework import Agent

from producer import InMemoryQuotaStore, QuotaExceededError, TokenGuardMiddleware
from producer.scripted import ScriptedChatClient
from tests.helpers import admitted_of, cost_of_one_call, eventually, run_agent


def overlapping() -> Agent:
    """40-word replies (max_tokens 60) after 50 ms: concurrent calls overlap."""
    return Agent(ScriptedChatClient(reply_words=40, latency_s=0.05), default_options={"max_tokens": 60})


async def test_concurrent_calls_cannot_all_pass_one_check() -> None:
    cost = await cost_of_one_call(overlapping())
    guard = TokenGuardMiddleware(quota_store=InMemoryQuotaStore(), quota_tokens=10 * cost)
    admitted = await admitted_of(overlapping(), guard)
    assert admitted <= 10
    assert guard.stats.blocked == 100 - admitted


async def test_without_reservations_the_seed_race_admits_them_all() -> None:
    cost = await cost_of_one_call(overlapping())
    guard = TokenGuardMiddleware(quota_store=InMemoryQuotaStore(), quota_tokens=10 * cost, reserve_in_flight=False)
    assert await admitted_of(overlapping(), guard) == 100


async def test_in_flight_bound_caps_concurrent_calls_of_a_tenant() -> None:
    guard = TokenGuardMiddleware(quota_store=InMemoryQuotaStore(), quota_tokens=10**9, max_in_flight_per_tenant=7)
    alerts: list[dict] = []
    guard.on_quota_exceeded = alerts.append
    assert await admitted_of(overlapping(), guard) == 7
    assert {a["reason"] for a in alerts} == {"too_many_calls_in_flight"}


async def test_reservations_are_released_when_calls_fail() -> None:
    class Failing(ScriptedChatClient):
        def _inner_get_response(self, **kwargs):  # type: ignore[no-untyped-def, override]
            raise RuntimeError("provider down")

    guard = TokenGuardMiddleware(quota_store=InMemoryQuotaStore(), quota_tokens=2_000, default_max_tokens=1_500)
    for _ in range(3):
        with pytest.raises(RuntimeError, match="provider down"):
            await Agent(Failing()).run("Hello!", middleware=[guard])
    assert guard._in_flight.tokens(("anonymous", guard.period_key_fn())) == 0
    await Agent(ScriptedChatClient()).run("Hello!", middleware=[guard])  # not blocked by leaked reservations


async def test_clamp_lowers_max_tokens_to_the_headroom_and_refuses_below_the_minimum() -> None:
    store = InMemoryQuotaStore()
    seen: list[int] = []

    class Recording(ScriptedChatClient):
        def _inner_get_response(self, *, messages, stream, options, **kwargs):  # type: ignore[no-untyped-def]
            seen.append(options.get("max_tokens"))
            return super()._inner_get_response(messages=messages, stream=stream, options=options, **kwargs)

    guard = TokenGuardMiddleware(quota_store=store, quota_tokens=100, clamp_max_tokens=True, min_headroom_tokens=20)
    agent = Agent(Recording(reply_words=200), default_options={"max_tokens": 4_000})
    store.add_usage("anonymous", guard.period_key_fn(), 40)
    await agent.run("Hi", middleware=[guard])
    assert seen[0] is not None and seen[0] < 60, "lowered to 100 - 40 - the input estimate"
    assert store.get_usage("anonymous", guard.period_key_fn()) <= 100, "the clamp kept the call inside the quota"
    store.add_usage("anonymous", guard.period_key_fn(), 100 - store.get_usage("anonymous", guard.period_key_fn()) - 10)
    with pytest.raises(QuotaExceededError):
        await agent.run("Hi", middleware=[guard])
    assert len(seen) == 1


async def test_callback_errors_never_fail_a_successful_call() -> None:
    def broken(_: dict) -> None:
        raise ValueError("bug in the application's callback")

    async def broken_async(_: dict) -> None:
        raise ValueError("bug in the application's async callback")

    for callback in (broken, broken_async):
        guard = TokenGuardMiddleware(quota_store=InMemoryQuotaStore(), quota_tokens=10**6, on_usage=callback)
        result = await Agent(ScriptedChatClient()).run("Hello!", middleware=[guard])
        assert result.text and guard.stats.callback_errors == 1


async def test_a_failing_alert_callback_still_blocks_with_quota_exceeded() -> None:
    def broken(_: dict) -> None:
        raise ValueError("alerting is down")

    guard = TokenGuardMiddleware(quota_store=InMemoryQuotaStore(), quota_tokens=0, on_quota_exceeded=broken)
    with pytest.raises(QuotaExceededError):
        await Agent(ScriptedChatClient()).run("Hello!", middleware=[guard])
    assert guard.stats.callback_errors == 1


async def test_warning_fires_once_when_usage_reaches_the_ratio() -> None:
    warnings: list[dict] = []
    cost = await cost_of_one_call(overlapping())
    guard = TokenGuardMiddleware(
        quota_store=InMemoryQuotaStore(), quota_tokens=4 * cost, on_quota_warning=warnings.append, warning_ratio=0.5
    )
    agent = Agent(ScriptedChatClient(reply_words=40), default_options={"max_tokens": 60})
    for _ in range(3):
        await agent.run("Hello!", middleware=[guard])
    assert len(warnings) == 1
    assert warnings[0]["reason"] == "quota_warning" and warnings[0]["used_tokens"] == 2 * cost


async def test_a_response_without_usage_records_a_flagged_estimate() -> None:
    from agent_framework import ChatResponse, Message

    class Silent(ScriptedChatClient):
        async def _respond(self, text, usage):  # type: ignore[no-untyped-def, override]
            return ChatResponse(messages=[Message(role="assistant", contents=[text])], model=self.model)

    store = InMemoryQuotaStore()
    guard = TokenGuardMiddleware(quota_store=store, quota_tokens=10**6)
    await Agent(Silent(reply_words=40)).run("Hello!", middleware=[guard])
    assert guard.stats.estimated == 1
    assert store.get_usage("anonymous", guard.period_key_fn()) > 0


async def test_a_hanging_async_callback_is_cut_off_and_the_call_still_records_its_usage(
    caplog: pytest.LogCaptureFixture,
) -> None:
    hung = asyncio.Event()

    async def hanging_webhook(record: dict) -> None:
        hung.set()
        await asyncio.Event().wait()  # a webhook that never answers

    store = InMemoryQuotaStore()
    guard = TokenGuardMiddleware(on_usage=hanging_webhook, quota_store=store, quota_tokens=10**6, callback_timeout_s=0.2)
    loop = asyncio.get_running_loop()
    for stream in (False, True):
        started = loop.time()
        text = (await run_agent(Agent(ScriptedChatClient()), stream=stream, middleware=[guard])).text
        elapsed = loop.time() - started
        assert text and hung.is_set()
        assert elapsed < 0.2 + 0.8, f"the call took {elapsed:.2f}s with a 0.2s callback timeout"
    assert guard.stats.callback_timeouts == 2 and guard.stats.callback_errors == 0
    assert store.get_usage("anonymous", guard.period_key_fn()) > 0, "the usage is recorded all the same"
    messages = [r.getMessage() for r in caplog.records if "did not finish" in r.getMessage()]
    assert len(messages) == 2 and "hanging_webhook" in messages[0]
    assert "anonymous" not in " ".join(messages), "the log names the callback, never the usage it was given"
    await eventually(lambda: not guard._abandoned, 5, "cancelled callbacks finish")


async def test_a_callback_that_ignores_cancellation_still_cannot_hold_a_refused_call() -> None:
    release = asyncio.Event()

    async def stubborn_alert(payload: dict) -> None:
        while not release.is_set():
            try:
                await release.wait()
            except asyncio.CancelledError:
                continue  # swallows every cancellation until released

    guard = TokenGuardMiddleware(
        quota_store=InMemoryQuotaStore(), quota_tokens=0, on_quota_exceeded=stubborn_alert, callback_timeout_s=0.2
    )
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(QuotaExceededError):
        await Agent(ScriptedChatClient()).run("Hello!", middleware=[guard])
    assert loop.time() - started < 1.0
    assert guard.stats.callback_timeouts == 1 and guard.stats.blocked == 1
    assert len(guard._abandoned) == 1, "kept referenced while it runs on"
    release.set()
    await eventually(lambda: not guard._abandoned, 5, "the stubborn callback ends once released")


async def test_callbacks_within_the_timeout_are_awaited_to_their_end() -> None:
    done: list[str] = []

    async def slow_but_fine(record: dict) -> None:
        await asyncio.sleep(0.05)
        done.append(record["user_id"])

    guard = TokenGuardMiddleware(quota_store=InMemoryQuotaStore(), quota_tokens=10**6, on_usage=slow_but_fine)
    await Agent(ScriptedChatClient()).run("Hello!", middleware=[guard])
    assert done == ["anonymous"], "awaited before the call returned, as in the seed"
    assert guard.stats.callback_timeouts == 0


def test_callback_timeout_must_be_positive_or_none() -> None:
    for bad in (0, -1.0):
        with pytest.raises(ValueError, match="callback_timeout_s"):
            TokenGuardMiddleware(quota_store=InMemoryQuotaStore(), quota_tokens=1, callback_timeout_s=bad)
    assert TokenGuardMiddleware(quota_store=InMemoryQuotaStore(), quota_tokens=1, callback_timeout_s=None).callback_timeout_s is None
