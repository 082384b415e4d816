"""The aggregator's /metrics, /healthz and /readyz, scraped over HTTP on 127.0.0.1."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from aggregator import AggregatorConfig, AggregatorService
from producer import ProducerConfig, UsagePublisher
from schemas.wire import encode
from tests.helpers import eventually, make_event, send_raw

pytestmark = pytest.mark.integration


async def get(port: int, path: str) -> tuple[int, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    await writer.drain()
    response = (await asyncio.wait_for(reader.read(), 10)).decode()
    writer.close()
    await writer.wait_closed()
    status = int(response.split(" ", 2)[1])
    return status, response.partition("\r\n\r\n")[2]


def series(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


async def test_metrics_and_health(producer_config: ProducerConfig, aggregator_config: AggregatorConfig) -> None:
    config = replace(aggregator_config, metrics_port=0)
    async with AggregatorService(config) as aggregator:
        assert aggregator.metrics is not None
        port = aggregator.metrics.port
        assert (await get(port, "/healthz"))[0] == 200
        await asyncio.wait_for(aggregator.assigned.wait(), 30)
        async with UsagePublisher(producer_config) as publisher:
            for index in range(30):
                publisher.publish(make_event(f"t{index % 3}", 100, quota=150))
            await publisher.flush()
        await send_raw(config.connection, config.topics.usage, [(b"t0", b"not json"), (b"t1", encode(make_event("t2", 1)))])
        await eventually(lambda: aggregator.stats.events == 30 and aggregator.stats.dead_letters == 2, 30, "all applied")
        status, text = await get(port, "/metrics")
        assert status == 200
        assert series(text, "tokenguard_aggregator_events_total") == 30
        assert series(text, "tokenguard_aggregator_dead_letters_total") == 2
        assert series(text, "tokenguard_aggregator_blocked_tenants") == 3
        assert series(text, "tokenguard_aggregator_owned_partitions") == 3
        assert "tokenguard_aggregator_lag{partition=" in text
        await eventually(lambda: sum(aggregator.lag().values()) == 0, 30, "lag 0")
        status, body = await get(port, "/readyz")
        assert status == 200 and body.strip() == "lag 0"
        assert (await get(port, "/nope"))[0] == 404


async def test_middleware_side_metrics_through_an_application_registry(producer_config: ProducerConfig) -> None:
    from agent_framework import Agent
    from prometheus_client import CollectorRegistry, generate_latest

    from producer import KafkaQuotaStore, QuotaExceededError, TokenGuardMiddleware
    from producer.metrics import register_metrics
    from producer.scripted import ScriptedChatClient

    registry = CollectorRegistry()
    # No aggregator runs here: local_only keeps judging by this process's own spend.
    async with KafkaQuotaStore(replace(producer_config, stale_policy="local_only")) as store:
        guard = TokenGuardMiddleware(quota_store=store, quota_tokens=1, user_id_getter=lambda _: "acme")
        register_metrics(store, guard, registry=registry)
        agent = Agent(ScriptedChatClient())
        await agent.run("Hello!", middleware=[guard])
        with pytest.raises(QuotaExceededError):
            await agent.run("Hello!", middleware=[guard])
        await store.publisher.flush()
        text = generate_latest(registry).decode()
    assert series(text, "tokenguard_publisher_published_total") == 1
    assert series(text, "tokenguard_publisher_delivered_total") == 1
    assert series(text, "tokenguard_blocked_calls_total") == 1
    assert series(text, "tokenguard_publisher_queue_depth") == 0
    assert series(text, "tokenguard_stale_decisions_total") >= 1  # no aggregator runs in this test
