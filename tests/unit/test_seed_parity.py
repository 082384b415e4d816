"""Every scenario of the seed's README, through our package with only the import line changed.

The seed's imports were ``from token_guard_middleware import TokenGuardMiddleware`` and
``from token_guard_middleware.token_tracker import ...``; here they are ``producer`` and
``producer.token_tracker``. Calls go through real ``Agent`` objects and a real chat client class.
"""

from __future__ import annotations

import re
from datetime import datetime

import pytest
from agent_framework import Agent

from producer import TokenGuardMiddleware
from producer.scripted import ScriptedChatClient
from producer.token_tracker import (
    InMemoryQuotaStore,
    QuotaExceededError,
    QuotaStore,
    day_key,
    month_key,
    week_key,
)
from tests.helpers import run_agent

USAGE_KEYS = {
    "user_id",
    "period_key",
    "model",
    "input_tokens",
    "output_tokens",
    "total_tokens",
    "quota_tokens",
    "used_tokens_after_call",
    "timestamp_utc",
    "streaming",
}
ALERT_KEYS = {"user_id", "period_key", "used_tokens", "quota_tokens", "reason"}


async def run_stream(agent: Agent, prompt: str, middleware: TokenGuardMiddleware) -> str:
    return (await run_agent(agent, prompt, stream=True, middleware=[middleware])).text


async def test_quick_start_allows_then_blocks_with_the_alert_payload() -> None:
    records: list[dict] = []
    alerts: list[dict] = []
    middleware = TokenGuardMiddleware(
        on_usage=records.append,
        on_quota_exceeded=alerts.append,
        quota_store=InMemoryQuotaStore(),
        quota_tokens=50,
    )
    agent = Agent(ScriptedChatClient())

    first = await agent.run("Hello!", middleware=[middleware])
    assert first.text
    assert len(records) == 1 and records[0]["total_tokens"] > 50

    with pytest.raises(QuotaExceededError, match="Quota exceeded for user=anonymous"):
        await agent.run("How are you?", middleware=[middleware])
    assert alerts == [
        {
            "user_id": "anonymous",
            "period_key": month_key(),
            "used_tokens": records[0]["total_tokens"],
            "quota_tokens": 50,
            "reason": "quota_exceeded_before_call",
        }
    ]
    assert len(records) == 1, "a blocked call records no usage"


async def test_quota_exceeded_error_is_still_a_runtime_error() -> None:
    assert issubclass(QuotaExceededError, RuntimeError)


async def test_usage_record_has_the_seed_keys_and_values() -> None:
    records: list[dict] = []
    middleware = TokenGuardMiddleware(on_usage=records.append, quota_store=InMemoryQuotaStore(), quota_tokens=10_000)
    agent = Agent(ScriptedChatClient(model="gemma3:4b"))
    await agent.run("Hello!", middleware=[middleware])
    await agent.run("Again", middleware=[middleware])

    first, second = records
    assert set(first) == USAGE_KEYS
    assert first["user_id"] == "anonymous"
    assert first["period_key"] == month_key()
    assert first["model"] == "gemma3:4b"
    assert first["total_tokens"] == first["input_tokens"] + first["output_tokens"]
    assert first["quota_tokens"] == 10_000
    assert first["used_tokens_after_call"] == first["total_tokens"]
    assert second["used_tokens_after_call"] == first["total_tokens"] + second["total_tokens"]
    assert datetime.fromisoformat(first["timestamp_utc"]).tzinfo is not None
    assert first["streaming"] is False


async def test_streaming_records_usage_once_with_the_streaming_flag() -> None:
    records: list[dict] = []
    store = InMemoryQuotaStore()
    middleware = TokenGuardMiddleware(on_usage=records.append, quota_store=store, quota_tokens=10_000)
    agent = Agent(ScriptedChatClient(reply_words=30))

    text = await run_stream(agent, "Stream please", middleware)

    assert text.startswith("the quota holds")
    assert len(records) == 1
    assert set(records[0]) == USAGE_KEYS
    assert records[0]["streaming"] is True
    assert records[0]["total_tokens"] > 0
    assert store.get_usage("anonymous", month_key()) == records[0]["total_tokens"]


async def test_streaming_call_is_blocked_before_the_llm_once_over_quota() -> None:
    client = ScriptedChatClient()
    middleware = TokenGuardMiddleware(on_usage=lambda r: None, quota_store=InMemoryQuotaStore(), quota_tokens=1)
    agent = Agent(client)
    await run_stream(agent, "first", middleware)
    with pytest.raises(QuotaExceededError):
        await run_stream(agent, "second", middleware)
    assert client.calls == 1


async def test_per_user_quotas_through_user_id_getter() -> None:
    records: list[dict] = []
    current = {"user": "alice"}
    middleware = TokenGuardMiddleware(
        on_usage=records.append,
        quota_store=InMemoryQuotaStore(),
        quota_tokens=50,
        user_id_getter=lambda context: current["user"],
    )
    agent = Agent(ScriptedChatClient())
    await agent.run("Hello!", middleware=[middleware])
    with pytest.raises(QuotaExceededError, match="user=alice"):
        await agent.run("Hello!", middleware=[middleware])

    current["user"] = "bob"  # bob has his own quota
    await agent.run("Hello!", middleware=[middleware])
    assert [r["user_id"] for r in records] == ["alice", "bob"]


async def test_user_id_from_context_metadata_as_the_seed_readme_shows() -> None:
    """The README's getter reads ``context.metadata``; an earlier chat middleware can set it."""
    from agent_framework import ChatContext, ChatMiddleware

    class TagUser(ChatMiddleware):
        async def process(self, context: ChatContext, call_next) -> None:  # type: ignore[no-untyped-def]
            context.metadata["user_id"] = "carol"
            await call_next()

    records: list[dict] = []
    middleware = TokenGuardMiddleware(
        on_usage=records.append,
        quota_store=InMemoryQuotaStore(),
        quota_tokens=1_000,
        user_id_getter=lambda context: context.metadata.get("user_id", "anonymous"),
    )
    await Agent(ScriptedChatClient()).run("Hello!", middleware=[TagUser(), middleware])
    assert records[0]["user_id"] == "carol"


@pytest.mark.parametrize(
    ("period_key_fn", "pattern"),
    [
        (month_key, r"^\d{4}-\d{2}$"),
        (day_key, r"^\d{4}-\d{2}-\d{2}$"),
        (week_key, r"^\d{4}-W\d{2}$"),
    ],
)
async def test_builtin_period_keys(period_key_fn, pattern: str) -> None:  # type: ignore[no-untyped-def]
    records: list[dict] = []
    middleware = TokenGuardMiddleware(
        on_usage=records.append, quota_store=InMemoryQuotaStore(), quota_tokens=1_000, period_key_fn=period_key_fn
    )
    await Agent(ScriptedChatClient()).run("Hello!", middleware=[middleware])
    assert re.match(pattern, records[0]["period_key"])
    assert records[0]["period_key"] == period_key_fn()


async def test_custom_period_key_fn_separates_quotas() -> None:
    period = {"key": "alice-2026-04-14"}
    store = InMemoryQuotaStore()
    middleware = TokenGuardMiddleware(
        on_usage=lambda r: None, quota_store=store, quota_tokens=50, period_key_fn=lambda: period["key"]
    )
    agent = Agent(ScriptedChatClient())
    await agent.run("Hello!", middleware=[middleware])
    with pytest.raises(QuotaExceededError):
        await agent.run("Hello!", middleware=[middleware])
    period["key"] = "alice-2026-04-15"  # a new period starts at zero
    await agent.run("Hello!", middleware=[middleware])
    assert store.get_usage("anonymous", "alice-2026-04-14") > 50
    assert store.get_usage("anonymous", "alice-2026-04-15") > 0


async def test_custom_quota_store_like_the_readme_redis_example() -> None:
    class DictBackedStore:  # the README's RedisQuotaStore, with a dict for Redis
        def __init__(self) -> None:
            self.redis: dict[str, int] = {}

        def get_usage(self, user_id: str, period_key: str) -> int:
            return int(self.redis.get(f"{user_id}:{period_key}") or 0)

        def add_usage(self, user_id: str, period_key: str, tokens: int) -> None:
            key = f"{user_id}:{period_key}"
            self.redis[key] = self.redis.get(key, 0) + tokens

    store = DictBackedStore()
    _typed: QuotaStore = store
    records: list[dict] = []
    middleware = TokenGuardMiddleware(on_usage=records.append, quota_store=_typed, quota_tokens=10_000)
    await Agent(ScriptedChatClient()).run("Hello!", middleware=[middleware])
    assert store.redis == {f"anonymous:{month_key()}": records[0]["total_tokens"]}


async def test_async_callbacks_are_awaited() -> None:
    seen: list[str] = []

    async def save_usage(record: dict) -> None:
        seen.append(f"usage:{record['total_tokens']}")

    async def quota_alert(payload: dict) -> None:
        assert set(payload) == ALERT_KEYS
        seen.append(f"alert:{payload['reason']}")

    middleware = TokenGuardMiddleware(
        on_usage=save_usage, on_quota_exceeded=quota_alert, quota_store=InMemoryQuotaStore(), quota_tokens=50
    )
    agent = Agent(ScriptedChatClient())
    await agent.run("Hello!", middleware=[middleware])
    with pytest.raises(QuotaExceededError):
        await agent.run("Hello!", middleware=[middleware])
    assert seen[0].startswith("usage:") and seen[1] == "alert:quota_exceeded_before_call"


async def test_middleware_passed_at_agent_construction_works_too() -> None:
    records: list[dict] = []
    middleware = TokenGuardMiddleware(on_usage=records.append, quota_store=InMemoryQuotaStore(), quota_tokens=10_000)
    agent = Agent(ScriptedChatClient(), middleware=[middleware])
    await agent.run("Hello!")
    assert len(records) == 1


def test_misuse_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="quota_tokens"):
        TokenGuardMiddleware(quota_store=InMemoryQuotaStore(), quota_tokens=-1)
    with pytest.raises(TypeError, match="quota_store"):
        TokenGuardMiddleware(quota_store=object(), quota_tokens=10)  # type: ignore[arg-type]
