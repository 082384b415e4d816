"""On the real broker: the default staleness policy keeps what is known (issue 11, item 6). With the
aggregator stopped, a tenant every instance knows is exceeded stays refused while a tenant under its
limit is admitted; ``fail_open`` releases the exceeded tenant only when asked for explicitly."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from agent_framework import Agent

from aggregator import AggregatorConfig
from producer import KafkaQuotaStore, ProducerConfig, TokenGuardMiddleware
from producer.errors import QuotaExceededError, QuotaUnavailableError
from producer.scripted import ScriptedChatClient
from producer.snapshot import QuotaSnapshot
from tests.helpers import call_usage, eventually, running_aggregator

pytestmark = pytest.mark.integration

PERIOD = "2026-04"
STALE_AFTER_S = 2.0


def exceeded(tenant: str) -> Any:
    def holds(snapshot: QuotaSnapshot) -> bool:
        notice = snapshot.notice(tenant, PERIOD)
        return notice is not None and notice.state == "exceeded"

    return holds


async def test_exceeded_tenant_stays_refused_when_the_aggregator_stops(
    producer_config: ProducerConfig, aggregator_config: AggregatorConfig, tmp_path: Path
) -> None:
    base = replace(producer_config, stale_after_s=STALE_AFTER_S)
    assert base.stale_policy == "keep_known", "the default"

    def member(name: str, **changes: Any) -> ProducerConfig:
        return replace(base, instance_id=name, spool_dir=tmp_path / name, **changes)

    alerts: list[dict[str, Any]] = []

    async def on_exceeded(payload: dict[str, Any]) -> None:
        alerts.append(payload)

    def guard(store: KafkaQuotaStore, tenant: str) -> TokenGuardMiddleware:
        # quota_tokens well above hot's 500: the limit in hot's notice is the one that governs.
        return TokenGuardMiddleware(
            quota_store=store, quota_tokens=100_000, user_id_getter=lambda _: tenant, period_key_fn=lambda: PERIOD,
            on_quota_exceeded=on_exceeded,
        )

    agent = Agent(ScriptedChatClient())
    async with KafkaQuotaStore(member("keeper")) as keeper, KafkaQuotaStore(member("opener", stale_policy="fail_open")) as opener:
        async with running_aggregator(aggregator_config), KafkaQuotaStore(member("spender")) as spender:
            spender.record(call_usage("hot", 900, period=PERIOD))  # over its 500 quota
            for store in (keeper, opener):
                await store.feed.wait_until(exceeded("hot"), 30)
                await eventually(lambda s=store: not s.is_stale("hot") and not s.is_stale("cold"), 30, "fresh")
                # Neither spent anything itself: the aggregator's notice refuses hot on every instance.
                assert not store.check("hot", PERIOD, 100_000).allowed
                assert store.check("cold", PERIOD, 100_000).allowed
        # The aggregator is gone (a deploy): its last heartbeats age past stale_after_s.
        for store in (keeper, opener):
            await eventually(lambda s=store: s.is_stale("hot") and s.is_stale("cold"), 10 * STALE_AFTER_S, "staleness")

        with pytest.raises(QuotaExceededError) as refused:
            await Agent(ScriptedChatClient()).run("Hello!", middleware=[guard(keeper, "hot")])
        assert not isinstance(refused.value, QuotaUnavailableError), "known to be over, not unknown"
        assert alerts[-1]["reason"] == "quota_exceeded_before_call"
        assert (alerts[-1]["used_tokens"], alerts[-1]["quota_tokens"]) == (900, 500)
        await agent.run("Hello!", middleware=[guard(keeper, "cold")])  # an ok tenant is admitted
        assert not keeper.check("hot", PERIOD, 100_000).allowed, "still refused"
        assert keeper.stats.stale_decisions >= 3 and keeper.stats.stale_refusals == 0

        # fail_open, asked for explicitly: today's behaviour, the exceeded tenant is released.
        await agent.run("Hello!", middleware=[guard(opener, "hot")])
        assert opener.check("hot", PERIOD, 100_000).allowed
        assert opener.stats.stale_decisions >= 2
