"""Every instance knows a tenant's limit from its first call (issue 11, item 2), on a real broker.

The middleware is built with ``quota_tokens=1_000``; the limits topic says otherwise for some
tenants. The stores judge with ``stale_policy="local_only"``, so a missing aggregator heartbeat
never admits a call: what is admitted is what the snapshot decided.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from typing import Any, Literal

import pytest
from agent_framework import Agent

from aggregator.config import AggregatorConfig
from aggregator.limits import delete_limit, write_limit
from producer import KafkaQuotaStore, ProducerConfig, QuotaExceededError, TokenGuardMiddleware
from producer.periods import day_key, month_key
from producer.scripted import ScriptedChatClient
from schemas.limits import QuotaLimit
from schemas.wire import encode, limit_key
from tests.helpers import admitted_of, run_agent, run_python, running_aggregator, send_raw
from transport.admin import ensure_topics
from transport.connection import KafkaConnection

pytestmark = pytest.mark.integration

DEFAULT = 1_000  # the middleware's own quota_tokens in every test here


def local_only(config: ProducerConfig) -> ProducerConfig:
    return replace(config, stale_policy="local_only")


async def set_limit(config: ProducerConfig, tenant: str | None, tokens: int,
                    period: Literal["any", "month", "week", "day"] = "any") -> None:
    limit = QuotaLimit(tenant_id=tenant, limit_tokens=tokens, period=period, updated_at=datetime.now(UTC))
    await write_limit(config.connection, config.topics, limit)


class Guarded:
    """A middleware for one tenant on ``store``, remembering what it recorded and refused."""

    def __init__(self, store: KafkaQuotaStore, tenant: str, **kwargs: Any) -> None:
        self.spent = 0
        self.alerts: list[dict[str, Any]] = []
        self.guard = TokenGuardMiddleware(
            quota_store=store, quota_tokens=DEFAULT, user_id_getter=lambda _: tenant,
            on_usage=self._used, on_quota_exceeded=self.alerts.append, **kwargs,
        )

    def _used(self, record: dict[str, Any]) -> None:
        self.spent += int(record["total_tokens"])

    async def spend_until_refused(self, agent: Agent, *, most: int = 200) -> int:
        """Call until a call is refused; return the tokens spent before it. Fails if none is."""
        for _ in range(most):
            try:
                await run_agent(agent, middleware=[self.guard])
            except QuotaExceededError:
                return self.spent
        raise AssertionError(f"no call refused after {most} calls ({self.spent} tokens)")

    async def spend_at_least(self, agent: Agent, tokens: int) -> None:
        """Call until ``tokens`` are spent; every call must be admitted."""
        while self.spent < tokens:
            await run_agent(agent, middleware=[self.guard])


async def topics(config: ProducerConfig) -> None:
    await ensure_topics(config.connection, config.topics)


async def test_a_limit_above_the_default_governs_from_the_first_call(
    producer_config: ProducerConfig, aggregator_config: AggregatorConfig, connection: KafkaConnection
) -> None:
    """The issue's new user: ``tokenguard limits set bigco --tokens 1000000``, a middleware built with
    ``quota_tokens=1_000``. bigco is not refused after 1,000 tokens: not by its own spend, not by
    its reservations while calls are in flight, not by ``max_tokens`` clamping."""
    await topics(producer_config)
    code, _, err = await run_python(
        "-m", "aggregator.cli", "limits", "set", "bigco", "--tokens", "1000000",
        env={"KAFKA_BOOTSTRAP_SERVERS": connection.bootstrap_servers, "TOKENGUARD_TOPIC_PREFIX": producer_config.topics.prefix},
    )
    assert code == 0, err
    async with running_aggregator(aggregator_config), KafkaQuotaStore(local_only(producer_config)) as store:
        period = month_key()
        # Read to its end by start(): known before the first call, no waiting.
        assert store.limits.table.limit_for("bigco", period) == 1_000_000
        agent = Agent(ScriptedChatClient(reply_words=40))
        bigco = Guarded(store, "bigco", clamp_max_tokens=True)
        await bigco.spend_at_least(agent, 5 * DEFAULT)
        assert bigco.alerts == [] and bigco.guard.stats.max_tokens_clamped == bigco.guard.stats.calls
        assert store.snapshot.notice("bigco", period) is None  # governed by the limits table, not a notice
        # Concurrent calls each reserve input + 1,024 output tokens (no clamping here: a clamped
        # call reserves its whole headroom): twenty fit under bigco's limit, one under the default.
        slow = Agent(ScriptedChatClient(reply_words=5, latency_s=0.2))
        assert await admitted_of(slow, Guarded(store, "bigco").guard, calls=20) == 20
        plain = Guarded(store, "plainco")
        assert await admitted_of(slow, plain.guard, calls=20) == 1
        # A tenant without a record keeps the seed's behaviour: refused at the middleware's default.
        spent = await Guarded(store, "seedco").spend_until_refused(agent)
        assert DEFAULT <= spent < 2 * DEFAULT


async def test_a_limit_below_the_default_refuses_at_it_before_any_notice(producer_config: ProducerConfig) -> None:
    """No aggregator runs, so no notice exists: only the limits table can say 500."""
    await topics(producer_config)
    await set_limit(producer_config, "small", 500)
    async with KafkaQuotaStore(local_only(producer_config)) as store:
        agent = Agent(ScriptedChatClient(reply_words=40))
        small = Guarded(store, "small")
        spent = await small.spend_until_refused(agent)
        assert 500 <= spent < DEFAULT
        assert small.alerts[-1]["quota_tokens"] == 500 and small.alerts[-1]["used_tokens"] == spent
        assert store.snapshot.notice("small", month_key()) is None
        with pytest.raises(QuotaExceededError, match="quota=500"):
            await run_agent(agent, middleware=[small.guard])


async def test_the_topic_default_record_governs_tenants_without_their_own(producer_config: ProducerConfig) -> None:
    await topics(producer_config)
    await set_limit(producer_config, None, 300)
    await set_limit(producer_config, "own", 2_000)
    async with KafkaQuotaStore(local_only(producer_config)) as store:
        agent = Agent(ScriptedChatClient(reply_words=40))
        assert 300 <= await Guarded(store, "anyone").spend_until_refused(agent) < DEFAULT
        assert 2_000 <= await Guarded(store, "own").spend_until_refused(agent) < 3_000


async def test_a_limit_set_while_running_applies_within_a_bounded_time(producer_config: ProducerConfig) -> None:
    await topics(producer_config)
    async with KafkaQuotaStore(local_only(producer_config)) as store:
        agent = Agent(ScriptedChatClient(reply_words=40))
        late = Guarded(store, "late")
        period = month_key()
        await late.spend_at_least(agent, 600)  # under the default of 1,000
        await set_limit(producer_config, "late", 500)
        await store.limits.wait_until(lambda table: table.limit_for("late", period) == 500, timeout=10)
        with pytest.raises(QuotaExceededError, match="quota=500"):
            await run_agent(agent, middleware=[late.guard])
        await set_limit(producer_config, "late", 5_000)
        await store.limits.wait_until(lambda table: table.limit_for("late", period) == 5_000, timeout=10)
        await late.spend_at_least(agent, 1_500)  # past the default: the raised limit governs
        await delete_limit(producer_config.connection, producer_config.topics, "late")
        await store.limits.wait_until(lambda table: table.limit_for("late", period) is None, timeout=10)
        with pytest.raises(QuotaExceededError, match=f"quota={DEFAULT}"):
            await run_agent(agent, middleware=[late.guard])  # back to the middleware's own default


async def test_a_day_limit_applies_only_to_day_keys(producer_config: ProducerConfig) -> None:
    await topics(producer_config)
    await set_limit(producer_config, "daily", 500, period="day")
    async with KafkaQuotaStore(local_only(producer_config)) as store:
        agent = Agent(ScriptedChatClient(reply_words=40))
        by_day = Guarded(store, "daily", period_key_fn=day_key)
        assert 500 <= await by_day.spend_until_refused(agent) < DEFAULT
        assert by_day.alerts[-1]["quota_tokens"] == 500
        by_month = Guarded(store, "daily", period_key_fn=month_key)
        assert DEFAULT <= await by_month.spend_until_refused(agent) < 2 * DEFAULT
        assert by_month.alerts[-1]["quota_tokens"] == DEFAULT


async def test_records_that_are_not_limits_are_skipped_and_counted(producer_config: ProducerConfig) -> None:
    """Anyone who can write the topic can write anything to it: the instance skips what is not a
    limit of ours, exactly as the aggregator's feed does, and applies the records around it."""
    await topics(producer_config)
    forged = QuotaLimit(tenant_id="victim", limit_tokens=0, updated_at=datetime.now(UTC))
    await send_raw(producer_config.connection, producer_config.topics.limits, [
        (b"[" * 10_000, encode(forged)),  # not a limits key
        (limit_key("other"), encode(forged)),  # the key names another tenant
        (limit_key("victim"), b"\x00garbage"),  # not a limit
    ])
    await set_limit(producer_config, "victim", 2_000)
    async with KafkaQuotaStore(local_only(producer_config)) as store:
        assert store.limits.invalid == 3 and store.limits.failed is None
        assert store.limits.table.limit_for("victim", month_key()) == 2_000
        assert store.limits.table.limit_for("other", month_key()) is None
