"""Quota rules end to end on the real broker (issue 11): several rules per call, each counted exactly
by the aggregator and held by every instance from the first call."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from agent_framework import Agent

from aggregator.changelog import read_changelog
from aggregator.config import AggregatorConfig
from aggregator.limits import write_rule
from aggregator.replay import replay
from aggregator.simulate import simulate_topic
from producer import KafkaQuotaStore, ProducerConfig, QuotaExceededError, TokenGuardMiddleware, usage_scope
from producer.scripted import ScriptedChatClient
from schemas.policy import QuotaRule, counter_key, parse_counter_key, rule_key
from schemas.prices import ModelPrice, price_key
from schemas.wire import decode_usage, encode
from tests.helpers import (
    RawRecord,
    eventually,
    make_event,
    read_topic,
    reason_of,
    run_agent,
    running_aggregator,
    send_raw,
    send_records,
    verified,
)
from transport.admin import ensure_topics

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

EPOCH = datetime(2020, 1, 1, tzinfo=UTC)


def rule(name: str, tenant: str | None, limit: int, **fields: Any) -> QuotaRule:
    fields.setdefault("effective_from", EPOCH)
    return QuotaRule(name=name, tenant_id=tenant, limit=limit, updated_at=datetime.now(UTC), **fields)


async def set_rules(config: ProducerConfig, *rules: QuotaRule) -> None:
    await ensure_topics(config.connection, config.topics)
    for one in rules:
        await write_rule(config.connection, config.topics, one)


class Caller:
    """One tenant's calls through one middleware, remembering what was admitted and the refusal."""

    def __init__(self, store: KafkaQuotaStore, tenant: str, **kwargs: Any) -> None:
        self.spent = 0
        self.warnings: list[dict[str, Any]] = []
        self.guard = TokenGuardMiddleware(
            quota_store=store, quota_tokens=10**9, user_id_getter=lambda _: tenant, default_max_tokens=64,
            on_usage=self._used, on_quota_warning=self.warnings.append, **kwargs,
        )

    def _used(self, record: dict[str, Any]) -> None:
        self.spent += int(record["total_tokens"])

    async def until_refused(self, agent: Agent, most: int = 500) -> QuotaExceededError:
        for _ in range(most):
            try:
                await run_agent(agent, middleware=[self.guard])
            except QuotaExceededError as exc:
                return exc
        raise AssertionError(f"no call refused after {most} calls ({self.spent} tokens)")


def counters(records: dict[tuple[str, str], Any], tenant: str) -> dict[str, int]:
    """Rule name -> used, of ``tenant``'s rule counters in the changelog (summed over windows, so
    a test that runs across a window's end still compares totals)."""
    found: dict[str, int] = {}
    for (who, period), record in records.items():
        parsed = parse_counter_key(period)
        if who == tenant and parsed is not None:
            found[parsed[0]] = found.get(parsed[0], 0) + record.used_tokens
    return found


async def test_daily_and_monthly_rules_of_one_tenant_both_hold(
    producer_config: ProducerConfig, aggregator_config: AggregatorConfig
) -> None:
    """'100k a day and 2M a month', scaled down: for one tenant the monthly rule is the tighter,
    for another the daily one; each is refused by its tighter rule, never past it, and the
    aggregator's counters of both rules equal the independent recompute."""
    await set_rules(
        producer_config,
        rule("daily", "tight-month", 3_000, window="day"), rule("monthly", "tight-month", 1_500, window="month"),
        rule("daily", "tight-day", 1_500, window="day"), rule("monthly", "tight-day", 5_000, window="month"),
    )
    async with running_aggregator(aggregator_config), KafkaQuotaStore(producer_config) as store:
        agent = Agent(ScriptedChatClient(reply_words=30))
        month, day = Caller(store, "tight-month"), Caller(store, "tight-day")
        refused_month, refused_day = await month.until_refused(agent), await day.until_refused(agent)
        assert refused_month.rules and [r["rule"] for r in refused_month.rules] == ["monthly"]
        assert refused_day.rules and [r["rule"] for r in refused_day.rules] == ["daily"]
        assert refused_month.source == "rule" and refused_month.reason == "rule_exceeded"
        assert 0 < refused_month.retry_after_s <= 31 * 86400 and 0 < refused_day.retry_after_s <= 86400
        assert 1_500 - 200 < month.spent <= 1_500 and 1_500 - 200 < day.spent <= 1_500
        await store.publisher.flush()
        report = await verified(aggregator_config)
        assert report.keys == 2 + 4  # two tenant-periods, four rule counters
        records = await read_changelog(aggregator_config.connection, aggregator_config.topics.totals)
        assert counters(records, "tight-month") == {"daily": month.spent, "monthly": month.spent}
        assert counters(records, "tight-day") == {"daily": day.spent, "monthly": day.spent}


async def test_a_rule_of_a_tenant_overrides_the_default_rule_of_its_name_and_selects_by_model(
    producer_config: ProducerConfig, aggregator_config: AggregatorConfig
) -> None:
    await set_rules(
        producer_config,
        rule("daily", None, 800, window="day"),
        rule("daily", "big", 100_000, window="day"),
        rule("gpt-only", "big", 1_000, window="day", model="gpt-x"),
    )
    async with running_aggregator(aggregator_config), KafkaQuotaStore(producer_config) as store:
        scripted = Agent(ScriptedChatClient(reply_words=30))
        small = Caller(store, "anyone")
        assert (await small.until_refused(scripted)).rules[0]["rule"] == "daily"  # type: ignore[index]
        assert small.spent <= 800
        big = Caller(store, "big")
        for _ in range(40):  # past the default's 800 and the gpt-x rule's 1,000: neither applies
            await run_agent(scripted, middleware=[big.guard])
        assert big.spent > 1_000
        gpt = Caller(store, "big")
        refused = await gpt.until_refused(Agent(ScriptedChatClient(model="gpt-x", reply_words=30)))
        assert refused.rules is not None and refused.rules[0]["rule"] == "gpt-only" and gpt.spent <= 1_000
        await store.publisher.flush()
        await verified(aggregator_config)


async def test_a_cost_budget_blocks_at_its_cost_and_replay_reproduces_every_cost_total(
    producer_config: ProducerConfig, aggregator_config: AggregatorConfig
) -> None:
    """$1 / $4 per million input / output tokens; a budget of 0.02 (20,000 micro-USD) a day. The
    calls admitted cost at most the budget, the aggregator's cost counter is the sum of each call's
    integer cost, and a replay of the usage topic rewrites exactly the same totals."""
    await ensure_topics(producer_config.connection, producer_config.topics)
    price = ModelPrice(model="scripted-1", currency="USD", input_per_mtok=1_000_000, output_per_mtok=4_000_000,
                       effective_from=EPOCH, updated_at=datetime.now(UTC))
    await send_raw(producer_config.connection, producer_config.topics.limits,
                   [(price_key(price.model, price.effective_from), encode(price))])
    await set_rules(producer_config, rule("budget", "payer", 20_000, window="day", measure="cost", currency="USD",
                                          thresholds=(0.5, 0.8)))
    costs: list[int] = []

    def cost(record: dict[str, Any]) -> None:
        costs.append(-(-(record["input_tokens"] * 1_000_000 + record["output_tokens"] * 4_000_000) // 1_000_000))

    async with running_aggregator(aggregator_config), KafkaQuotaStore(producer_config) as store:
        payer = Caller(store, "payer")
        payer.guard.on_usage = cost
        refused = await payer.until_refused(Agent(ScriptedChatClient(reply_words=30)))
        assert refused.rules is not None and refused.rules[0]["measure"] == "cost"
        assert 20_000 - 500 < sum(costs) <= 20_000
        assert [w["reason"] for w in payer.warnings] == ["rule_threshold", "rule_threshold"]  # 50% and 80%
        await store.publisher.flush()
        await verified(aggregator_config)
    before = await read_changelog(aggregator_config.connection, aggregator_config.topics.totals)
    assert counters(before, "payer") == {"budget": sum(costs)}
    await replay(aggregator_config)
    after = await read_changelog(aggregator_config.connection, aggregator_config.topics.totals)
    assert {k: (r.used_tokens, r.event_count) for k, r in after.items()} == {
        k: (r.used_tokens, r.event_count) for k, r in before.items()}


async def test_a_cost_rule_refuses_a_model_it_cannot_price_when_told_to(producer_config: ProducerConfig) -> None:
    await set_rules(producer_config, rule("budget", "strict", 10**9, measure="cost", currency="EUR",
                                          unknown_model="refuse"))
    async with KafkaQuotaStore(producer_config) as store:
        with pytest.raises(QuotaExceededError) as refused:
            await run_agent(Agent(ScriptedChatClient()), middleware=[Caller(store, "strict").guard])
        assert refused.value.reason == "unpriced_model" and refused.value.retry_after_s is None


async def test_a_rule_set_while_running_governs_every_instance(
    producer_config: ProducerConfig, aggregator_config: AggregatorConfig
) -> None:
    """Two stores (two instances); a requests-per-window rule appears while they run. Each knows it
    from the limits topic; together they are refused once the aggregator counts the limit."""
    await ensure_topics(producer_config.connection, producer_config.topics)
    second = replace(producer_config, instance_id="second")
    async with running_aggregator(aggregator_config), KafkaQuotaStore(producer_config) as one, \
            KafkaQuotaStore(second) as two:
        await set_rules(producer_config, rule("calls", "shared", 30, window="day", measure="requests",
                                              thresholds=(0.5,), effective_from=datetime.now(UTC) - timedelta(seconds=1)))
        for store in (one, two):
            await store.limits.wait_until(lambda _, s=store: s.rules.applies("shared"), timeout=10)
        agent = Agent(ScriptedChatClient(reply_words=5, latency_s=0.05))
        callers = [Caller(one, "shared"), Caller(two, "shared")]
        admitted = 0

        async def hammer(caller: Caller) -> int:
            count = 0
            for _ in range(60):
                try:
                    await run_agent(agent, middleware=[caller.guard])
                    count += 1
                except QuotaExceededError:
                    await asyncio.sleep(0.02)
            return count

        admitted = sum(await asyncio.gather(*(hammer(c) for c in callers)))
        # Each instance alone would admit 30 (60 in all); together the aggregator's notices (the
        # warning at half, then exceeded) stop them near 30: what passes beyond is what the fleet
        # spends while a notice travels (~40 calls/s here).
        assert 30 <= admitted <= 40, admitted
        await eventually(lambda: all(s.snapshot.notice("shared", s.rules.view(
            s.rules.book.governing("shared", "calls"), "shared", datetime.now(UTC).timestamp()).counter)  # type: ignore[arg-type]
            is not None for s in (one, two)), timeout=10, what="both instances hold the aggregator's notice")


async def test_a_rule_selects_calls_by_the_user_of_a_usage_scope(
    producer_config: ProducerConfig, aggregator_config: AggregatorConfig
) -> None:
    """``--user alice``: alice's calls count against the rule, bob's (same tenant) do not."""
    await set_rules(producer_config, rule("alice-cap", "team", 600, window="day", attributes={"user": "alice"}))
    async with running_aggregator(aggregator_config), KafkaQuotaStore(producer_config, attributes={"region": "eu"}) as store:
        agent = Agent(ScriptedChatClient(reply_words=30))
        caller = Caller(store, "team")
        with usage_scope(user="alice", agent="helper"):
            refused = await caller.until_refused(agent)
        assert refused.rules is not None and refused.rules[0]["rule"] == "alice-cap" and caller.spent <= 600
        with usage_scope(user="bob"):
            for _ in range(30):
                await run_agent(agent, middleware=[caller.guard])
        assert caller.spent > 1_000
        await store.publisher.flush()
        await verified(aggregator_config)
    events = [decode_usage(r.value) for r in await read_topic(producer_config.connection, producer_config.topics.usage)]
    assert {tuple(sorted(e.attributes.items())) for e in events} == {
        (("agent", "helper"), ("region", "eu"), ("user", "alice")), (("region", "eu"), ("user", "bob"))}


async def test_the_simulator_matches_what_the_live_fleet_did(
    producer_config: ProducerConfig, aggregator_config: AggregatorConfig
) -> None:
    """The fleet runs under a daily rule of 2,000 tokens through the real middleware until refused.
    Simulated on the usage topic it produced: the enforced rule refuses nothing (the live fleet
    stopped at the limit) and counts what the aggregator counted; a rule half as tight refuses
    exactly the calls after the one that crossed 1,000, in order."""
    enforced = rule("daily", "sim", 2_000, window="day")
    await set_rules(producer_config, enforced)
    calls: list[int] = []
    async with running_aggregator(aggregator_config), KafkaQuotaStore(producer_config) as store:
        caller = Caller(store, "sim")
        caller.guard.on_usage = lambda record: calls.append(int(record["total_tokens"]))
        await caller.until_refused(Agent(ScriptedChatClient(reply_words=(10, 60), seed=7)))
        await store.publisher.flush()
        await verified(aggregator_config)
    live = await simulate_topic(producer_config.connection, producer_config.topics, [enforced])
    [outcome] = live.outcomes
    assert outcome.refused_calls == 0 and outcome.over_calls == 0 and live.events == len(calls)
    records = await read_changelog(aggregator_config.connection, aggregator_config.topics.totals)
    assert [w.used for w in outcome.windows.values()] == [counters(records, "sim")["daily"]] == [sum(calls)]
    tighter = await simulate_topic(producer_config.connection, producer_config.topics,
                                   [rule("daily", "sim", 1_000, window="day")])
    crossing = next(i for i in range(len(calls)) if sum(calls[: i + 1]) >= 1_000)
    assert tighter.refused_calls == len(calls) - crossing - 1
    assert tighter.refused_tokens == sum(calls[crossing + 1:])


async def test_hostile_records_cannot_forge_or_feed_a_rule(
    producer_config: ProducerConfig, aggregator_config: AggregatorConfig
) -> None:
    """Anyone who can write the topics: rule records that are not ours (deep nesting, a key naming
    another rule, a value that is not a rule) are skipped and counted by both sides, the genuine
    rule after them applies; a usage event whose period key is a rule counter's is dead-lettered
    and adds to no counter."""
    await ensure_topics(producer_config.connection, producer_config.topics)
    genuine = rule("daily", "victim", 1_000, window="day")
    forged = rule("daily", "other", 1, window="day")
    await send_raw(producer_config.connection, producer_config.topics.limits, [
        (b'["rule",' + b"[" * 5_000, encode(forged)),
        (rule_key("victim", "daily"), encode(forged)),  # names another tenant's rule
        (rule_key("victim", "daily"), b'{"name": 5}'),
        (rule_key(None, "x"), b"\xff" * 100),
    ])
    await set_rules(producer_config, genuine)
    counter = counter_key("daily", genuine.basis, datetime.now(UTC).date().isoformat())
    pollution = make_event("victim", 10**6, period=counter)
    fine = make_event("victim", 300)
    await send_records(producer_config.connection, producer_config.topics.usage, [
        RawRecord(b"victim", encode(pollution)), RawRecord(b"victim", encode(fine))])
    async with running_aggregator(aggregator_config) as aggregator, KafkaQuotaStore(producer_config) as store:
        assert store.limits.invalid == 4 and store.limits.failed is None
        assert store.rules.book.governing("victim", "daily") is not None
        assert store.rules.book.governing("other", "daily") is None
        await eventually(lambda: aggregator.stats.events + aggregator.stats.dead_letters == 2, what="both records")
        assert aggregator.stats.dead_letters == 1
        report = await verified(aggregator_config)
        assert report.invalid == {"reserved_period_key": 1}
    letters = await read_topic(producer_config.connection, producer_config.topics.dead_letters)
    assert [reason_of(letter) for letter in letters] == ["reserved_period_key"]
    records = await read_changelog(aggregator_config.connection, aggregator_config.topics.totals)
    assert counters(records, "victim") == {"daily": 300}


async def test_rule_counters_survive_an_aggregator_restart_exactly(
    producer_config: ProducerConfig, aggregator_config: AggregatorConfig
) -> None:
    """Usage keeps arriving while the aggregator is stopped and started again: its rule counters
    are restored from the changelog, the records after the committed offsets are applied once each
    (per-key replay guard), and every counter equals the independent recompute."""
    await set_rules(producer_config, rule("daily", None, 10**12, window="day"),
                    rule("tpm", None, 10**12, window="rate", window_seconds=3600, measure="requests"))
    async with KafkaQuotaStore(producer_config) as store:
        agent = Agent(ScriptedChatClient(reply_words=(5, 40), seed=3))
        callers = [Caller(store, f"tenant-{i}") for i in range(5)]

        async def spend(calls: int) -> None:
            for n in range(calls):
                await run_agent(agent, middleware=[callers[n % len(callers)].guard])
            await store.publisher.flush()

        async with running_aggregator(aggregator_config):
            await spend(60)
        await spend(60)  # while no aggregator runs
        async with running_aggregator(aggregator_config):
            await spend(60)
            report = await verified(aggregator_config)
    assert report.keys >= 5 * 3 and report.events == 180
    records = await read_changelog(aggregator_config.connection, aggregator_config.topics.totals)
    for caller, index in zip(callers, range(5), strict=True):
        assert counters(records, f"tenant-{index}") == {"daily": caller.spent, "tpm": 36}
