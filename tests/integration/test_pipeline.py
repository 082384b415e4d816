"""The pipeline on a real broker: middleware instances, the aggregator, notices back."""

from __future__ import annotations

import random
from datetime import UTC, datetime

import pytest
from agent_framework import Agent

from aggregator import AggregatorConfig, AggregatorService
from producer import KafkaQuotaStore, ProducerConfig, QuotaExceededError, TokenGuardMiddleware, ensure_topics
from producer.scripted import ScriptedChatClient
from producer.store import CallUsage
from schemas.wire import decode_usage
from tests.helpers import (
    AggregatorProcess,
    call_usage,
    instance,
    read_topic,
    reason_of,
    run_agent,
    running_aggregator,
    send_raw,
    wait_for_totals,
)

pytestmark = pytest.mark.integration


def usage(tenant: str, tokens: int, *, period: str = "2026-04", quota: int = 10**9) -> CallUsage:
    """One call's usage; by default far under its quota."""
    return call_usage(tenant, tokens, period=period, quota=quota)


async def test_tenant_exhausted_through_one_instance_is_blocked_by_another(
    producer_config: ProducerConfig, aggregator_config: AggregatorConfig
) -> None:
    async with (
        running_aggregator(aggregator_config),
        KafkaQuotaStore(instance(producer_config, "a")) as store_a,
        KafkaQuotaStore(instance(producer_config, "b")) as store_b,
    ):
        agent = Agent(ScriptedChatClient(reply_words=40))

        def guard(store: KafkaQuotaStore) -> TokenGuardMiddleware:
            return TokenGuardMiddleware(quota_store=store, quota_tokens=500, user_id_getter=lambda _: "acme")

        guard_a, guard_b = guard(store_a), guard(store_b)
        allowed_a = 0
        with pytest.raises(QuotaExceededError):
            for _ in range(100):
                await agent.run("Hello!", middleware=[guard_a])
                allowed_a += 1
        assert 0 < allowed_a < 100
        # Instance B spent nothing itself: only the aggregator's notice can stop it.
        await store_b.feed.wait_until(
            lambda snap: (n := snap.notice("acme", guard_b.period_key_fn())) is not None and n.state == "exceeded",
            timeout=20,
        )
        with pytest.raises(QuotaExceededError, match="user=acme"):
            await agent.run("Hello!", middleware=[guard_b])
        # Another tenant on B is untouched.
        other = TokenGuardMiddleware(quota_store=store_b, quota_tokens=500, user_id_getter=lambda _: "globex")
        await agent.run("Hello!", middleware=[other])


async def test_aggregator_totals_equal_the_sum_of_published_events(
    producer_config: ProducerConfig, aggregator_config: AggregatorConfig
) -> None:
    rng = random.Random(7)
    expected: dict[tuple[str, str], int] = {}
    async with running_aggregator(aggregator_config) as aggregator:
        async with KafkaQuotaStore(producer_config) as store:
            for _ in range(5_000):
                tenant = f"tenant-{rng.randrange(40)}"
                period = rng.choice(["2026-04", "2026-05"])
                tokens = rng.randrange(1, 2_000)
                store.record(usage(tenant, tokens, period=period))
                expected[(tenant, period)] = expected.get((tenant, period), 0) + tokens
            await store.publisher.flush(timeout=30)
        records = await wait_for_totals(aggregator_config, expected)
    assert sum(r.event_count for r in records.values()) == 5_000
    assert aggregator.stats.events == 5_000 and aggregator.stats.dead_letters == 0


async def test_restarted_aggregator_restores_and_continues_exactly(
    producer_config: ProducerConfig, aggregator_config: AggregatorConfig
) -> None:
    async with KafkaQuotaStore(producer_config) as store:
        async with running_aggregator(aggregator_config):
            for i in range(300):
                store.record(usage(f"t{i % 7}", 10))
            await store.publisher.flush(timeout=30)
            await wait_for_totals(aggregator_config, {(f"t{i}", "2026-04"): 10 * len(range(i, 300, 7)) for i in range(7)})
        for i in range(300):
            store.record(usage(f"t{i % 7}", 10))
        await store.publisher.flush(timeout=30)
        async with running_aggregator(aggregator_config) as second:
            assert second.stats.restored_keys == 7
            await wait_for_totals(aggregator_config, {(f"t{i}", "2026-04"): 20 * len(range(i, 300, 7)) for i in range(7)})
        assert second.stats.events == 300


async def test_bad_records_go_to_the_dead_letter_topic_and_good_ones_still_count(
    producer_config: ProducerConfig, aggregator_config: AggregatorConfig
) -> None:
    layout = aggregator_config.topics
    await ensure_topics(aggregator_config.connection, layout)
    async with KafkaQuotaStore(producer_config) as store:
        store.record(usage("acme", 100))
        await store.publisher.flush()
        await send_raw(
            aggregator_config.connection, layout.usage, [(b"acme", b"\xff\x00 not json"), (b"acme", b'{"tenant_id": "acme"}')]
        )
        store.record(usage("acme", 50))
        await store.publisher.flush()
    async with AggregatorService(aggregator_config) as aggregator:
        await wait_for_totals(aggregator_config, {("acme", "2026-04"): 150})
        assert aggregator.stats.dead_letters == 2
    letters = await read_topic(aggregator_config.connection, layout.dead_letters)
    reasons = sorted(map(reason_of, letters))
    assert reasons == ["invalid_json", "invalid_schema"]
    assert {letter.value for letter in letters} == {b"\xff\x00 not json", b'{"tenant_id": "acme"}'}
    assert all(letter.key == b"acme" for letter in letters)


async def test_usage_topic_is_the_replayable_record_billing_reads(
    producer_config: ProducerConfig, aggregator_config: AggregatorConfig
) -> None:
    async with KafkaQuotaStore(producer_config) as store:
        middleware = TokenGuardMiddleware(quota_store=store, quota_tokens=10**6, user_id_getter=lambda _: "acme")
        agent = Agent(ScriptedChatClient(model="scripted-7"))
        await run_agent(agent, middleware=[middleware])
        await run_agent(agent, "Stream it", stream=True, middleware=[middleware])
        await store.publisher.flush()
    events = [decode_usage(r.value) for r in await read_topic(producer_config.connection, producer_config.topics.usage)]
    assert [e.streaming for e in events] == [False, True]
    assert all(e.tenant_id == "acme" and e.model == "scripted-7" and e.instance_id == "test-a" for e in events)
    assert len({e.event_id for e in events}) == 2
    assert all(e.total_tokens == (e.input_tokens or 0) + (e.output_tokens or 0) for e in events)


async def test_aggregator_cli_runs_and_stops_cleanly_on_sigterm(
    producer_config: ProducerConfig, aggregator_config: AggregatorConfig
) -> None:
    process = AggregatorProcess(aggregator_config)
    await process.start()
    try:
        async with KafkaQuotaStore(producer_config) as store:
            store.record(usage("acme", 600, quota=500))
            await store.publisher.flush()
            await store.feed.wait_until(lambda snap: snap.notice("acme", "2026-04") is not None, timeout=30)
            assert not store.check("acme", "2026-04", 500).allowed
    finally:
        code = await process.terminate()
    assert code == 0, process.log()[-2000:]
    assert "aggregator stopped" in process.log()


async def test_limit_changes_apply_at_once_raised_unblocks_lowered_blocks(
    producer_config: ProducerConfig, aggregator_config: AggregatorConfig
) -> None:
    from aggregator.limits import delete_limit, write_limit
    from schemas.limits import QuotaLimit

    layout = aggregator_config.topics
    period = "2026-04"

    def state_is(state: str, limit: int):  # type: ignore[no-untyped-def]
        def check(snap) -> bool:  # type: ignore[no-untyped-def]
            notice = snap.notice("acme", period)
            return notice is not None and notice.state == state and notice.limit_tokens == limit

        return check

    async with running_aggregator(aggregator_config), KafkaQuotaStore(producer_config) as store:
        store.record(usage("acme", 600, period=period, quota=500))
        await store.feed.wait_until(state_is("exceeded", 500), timeout=30)
        assert not store.check("acme", period, 500).allowed

        now = datetime.now(UTC)
        await write_limit(producer_config.connection, layout, QuotaLimit(tenant_id="acme", limit_tokens=10_000, updated_at=now))
        await store.feed.wait_until(state_is("ok", 10_000), timeout=30)
        assert store.check("acme", period, 500).allowed, "a raised limit unblocks at once"
        assert store.snapshot.notice("acme", period).reason == "limit_changed"  # type: ignore[union-attr]

        await write_limit(producer_config.connection, layout, QuotaLimit(tenant_id="acme", limit_tokens=100, updated_at=now))
        await store.feed.wait_until(state_is("exceeded", 100), timeout=30)
        assert not store.check("acme", period, 500).allowed, "a lowered limit blocks at once"

        await delete_limit(producer_config.connection, layout, "acme")
        await store.feed.wait_until(state_is("exceeded", 500), timeout=30)  # back to the event's quota
