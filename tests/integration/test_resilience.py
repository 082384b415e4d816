"""The producer side under trouble, on the real broker: concurrency, a silent aggregator, and the
broker itself going away for 30 seconds."""

from __future__ import annotations

import asyncio
import os
import random
from dataclasses import replace
from pathlib import Path

import pytest
from agent_framework import Agent

import localkafka
from aggregator import AggregatorConfig, AggregatorService
from producer import (
    KafkaConnection,
    KafkaQuotaStore,
    ProducerConfig,
    TokenGuardMiddleware,
    ensure_topics,
    tenant_scope,
)
from producer.errors import QuotaUnavailableError
from producer.scripted import ScriptedChatClient
from schemas.topics import TopicLayout
from tests.helpers import (
    admitted_of,
    call_usage,
    cost_of_one_call,
    eventually,
    run_agent,
    running_aggregator,
    wait_for_totals,
)

pytestmark = pytest.mark.integration


async def test_100_concurrent_calls_with_headroom_for_10_admit_at_most_10(
    producer_config: ProducerConfig, aggregator_config: AggregatorConfig
) -> None:
    async with running_aggregator(aggregator_config), KafkaQuotaStore(producer_config) as store:
        partition = store.publisher.partition_of("acme")
        await eventually(lambda: store.snapshot.heartbeat_age(partition) is not None, 30, "first heartbeat")
        agent = Agent(ScriptedChatClient(reply_words=40, latency_s=0.05), default_options={"max_tokens": 60})
        cost = await cost_of_one_call(agent)
        guard = TokenGuardMiddleware(quota_store=store, quota_tokens=10 * cost, user_id_getter=lambda _: "acme")
        admitted = await admitted_of(agent, guard)
    assert 0 < admitted <= 10


async def test_staleness_policies_when_the_aggregator_stops(
    producer_config: ProducerConfig, aggregator_config: AggregatorConfig, tmp_path: Path
) -> None:
    period = "2026-04"
    base = replace(producer_config, stale_after_s=1.5)

    def with_policy(policy: str) -> ProducerConfig:
        return replace(base, stale_policy=policy, instance_id=policy, spool_dir=tmp_path / policy)  # type: ignore[arg-type]

    async with running_aggregator(aggregator_config), KafkaQuotaStore(with_policy("fail_closed")) as store:
        store.record(call_usage("hot", 900, period=period))  # over its 500 quota
        await store.feed.wait_until(lambda s: (n := s.notice("hot", period)) is not None and n.state == "exceeded", 30)
        assert store.check("cold", period, 500).allowed, "fresh: fail_closed changes nothing"
    # The aggregator is gone; its last heartbeats age past stale_after_s.
    stores = {policy: KafkaQuotaStore(with_policy(policy)) for policy in ("fail_open", "fail_closed", "local_only")}
    for store in stores.values():
        await store.start()
    try:
        for store in stores.values():
            partition = store.publisher.partition_of("cold")
            await eventually(lambda s=store, p=partition: (s.snapshot.heartbeat_age(p) or 0) > 1.5, 10, "staleness")
        fail_open, fail_closed, local_only = stores["fail_open"], stores["fail_closed"], stores["local_only"]
        assert fail_open.check("hot", period, 500).allowed and fail_open.check("cold", period, 500).allowed
        assert fail_open.stats.stale_decisions == 2
        assert not fail_closed.check("cold", period, 500).allowed
        assert not local_only.check("hot", period, 500).allowed, "local_only keeps the last known totals"
        assert local_only.check("cold", period, 500).allowed
        local_only.record(call_usage("cold", 600, period=period))
        assert not local_only.check("cold", period, 500).allowed, "and counts its own spend"

        guard = TokenGuardMiddleware(quota_store=fail_closed, quota_tokens=500, user_id_getter=lambda _: "cold")
        with pytest.raises(QuotaUnavailableError):
            await Agent(ScriptedChatClient()).run("Hello!", middleware=[guard])
    finally:
        for store in stores.values():
            await store.stop()


@pytest.mark.slow
@pytest.mark.timeout(240)  # two broker starts (each bounded at 90 s) around a 30 s outage
async def test_broker_down_30s_while_the_fleet_calls_loses_no_usage(tmp_path: Path) -> None:
    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        pytest.skip("stops and restarts its own broker: needs the local launcher, not an external cluster")
    broker = localkafka.start(None)
    try:
        await _outage_scenario(broker.port, KafkaConnection(bootstrap_servers=broker.bootstrap_servers), tmp_path)
    finally:
        localkafka.stop(broker.port)


async def _outage_scenario(port: int, connection: KafkaConnection, tmp_path: Path) -> None:
    layout = TopicLayout(prefix="outage.", partitions=3)
    await ensure_topics(connection, layout)
    config = ProducerConfig(
        connection=connection, topics=layout, send_timeout_s=2.0, stop_timeout_s=3.0, catch_up_timeout_s=20,
    )
    tallies: dict[tuple[str, str], int] = {}

    def tally(record: dict) -> None:  # what the middleware recorded, the ground truth
        key = (record["user_id"], record["period_key"])
        tallies[key] = tallies.get(key, 0) + record["total_tokens"]

    def fleet_member(name: str, spool: Path) -> KafkaQuotaStore:
        return KafkaQuotaStore(replace(config, instance_id=name, spool_dir=spool))

    stores = {name: fleet_member(name, tmp_path / f"spool-{name}") for name in ("a", "b")}
    stores["c"] = fleet_member("c", tmp_path / "spool-c")
    for store in stores.values():
        await store.start()
    running = {name: True for name in stores}

    async def caller(name: str, seed: int) -> None:
        rng = random.Random(seed)
        store = stores[name]
        guard = TokenGuardMiddleware(quota_store=store, quota_tokens=10**12, on_usage=tally)
        agent = Agent(ScriptedChatClient(reply_words=(10, 60), seed=seed))
        while running[name]:
            with tenant_scope(f"tenant-{rng.randrange(20)}"):
                await run_agent(agent, stream=rng.random() < 0.3, middleware=[guard])
            await asyncio.sleep(0.02)

    tasks = {name: asyncio.create_task(caller(name, i)) for i, name in enumerate(stores)}
    await asyncio.sleep(3)  # the fleet runs normally for a while

    await asyncio.to_thread(localkafka.stop, port, clean=False)  # the broker goes away, its data stays
    outage_started = asyncio.get_running_loop().time()
    await asyncio.sleep(5)
    running["c"] = False  # instance c shuts down gracefully during the outage
    await tasks.pop("c")
    await stores.pop("c").stop()
    assert list((tmp_path / "spool-c").glob("*/*.jsonl")), "c's undelivered usage is on disk"
    await asyncio.sleep(max(0.0, 30 - (asyncio.get_running_loop().time() - outage_started)))
    assert all(not task.done() for task in tasks.values()), "calls went on while the broker was away"
    spooled_during_outage = sum(s.publisher.stats.spooled for s in stores.values())

    await asyncio.to_thread(localkafka.start, port, fresh=False)  # the broker comes back with its data
    stores["c2"] = fleet_member("c2", tmp_path / "spool-c")  # c's replacement adopts c's spool
    await stores["c2"].start()
    await asyncio.sleep(2)
    for name in list(running):
        running[name] = False
    await asyncio.gather(*tasks.values())
    for store in stores.values():
        await eventually(lambda s=store: s.publisher.spool_pending == 0, 60, "spool delivered")
        await store.publisher.flush(timeout=60)
        await store.stop()

    aggregator_config = AggregatorConfig(connection=connection, topics=layout, group_id="outage-aggregator")
    async with AggregatorService(aggregator_config) as aggregator:
        await wait_for_totals(aggregator_config, tallies, timeout=60)
    assert spooled_during_outage > 0
    assert sum(tallies.values()) > 0 and aggregator.stats.events > 0
