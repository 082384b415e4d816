"""Starting before Kafka, on a private broker of the test's own (the shared one is never stopped):
the store starts degraded within its bound and its calls' usage waits in the spool, a strict store
refuses with a TokenGuardError, the aggregator waits (log line, /healthz 200, /readyz 503); then
the broker starts, the spool is delivered and the aggregator's totals hold every recorded token."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from agent_framework import Agent
from aiokafka.errors import KafkaError

import localkafka
from aggregator import AggregatorConfig
from producer import (
    KafkaConnection,
    KafkaQuotaStore,
    ProducerConfig,
    TokenGuardError,
    TokenGuardMiddleware,
    tenant_scope,
)
from producer.errors import KafkaUnavailableError
from producer.scripted import ScriptedChatClient
from schemas.topics import TopicLayout
from tests.helpers import AggregatorProcess, eventually, free_port, run_agent, verified, wait_for_totals
from tests.integration.test_metrics import get

pytestmark = pytest.mark.integration

START_TIMEOUT_S = 3.0


async def status(port: int, path: str) -> int:
    try:
        return (await get(port, path))[0]
    except OSError:
        return 0


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_started_before_kafka_every_token_reaches_the_totals(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()  # the private broker's, down until the middle of the test
    connection = KafkaConnection(bootstrap_servers=f"127.0.0.1:{port}")
    layout = TopicLayout(prefix=f"degraded{port}.", partitions=3)
    config = ProducerConfig(connection=connection, topics=layout, instance_id="degraded-a", spool_dir=tmp_path / "spool",
                            start_timeout_s=START_TIMEOUT_S, send_timeout_s=2.0, catch_up_timeout_s=20)
    aggregator_config = AggregatorConfig(connection=connection, topics=layout, group_id="degraded-aggregator",
                                         aggregator_id="degraded-aggregator", heartbeat_interval_s=0.2, seal_periods=False)
    metrics_port = free_port()
    aggregator = AggregatorProcess(aggregator_config, env={"TOKENGUARD_METRICS_PORT": str(metrics_port),
                                                                   "TOKENGUARD_WAIT_FOR_KAFKA": "true"})
    try:
        # Strict: a TokenGuardError, not aiokafka's, within the bound.
        strict = KafkaQuotaStore(replace(config, strict_start=True, spool_dir=tmp_path / "strict"))
        began = time.monotonic()
        with pytest.raises(KafkaUnavailableError) as raised:
            await strict.start()
        assert time.monotonic() - began < START_TIMEOUT_S + 1
        assert isinstance(raised.value, TokenGuardError) and isinstance(raised.value.__cause__, KafkaError | OSError)

        # The aggregator, started first, waits: one clear line, alive, not ready.
        await aggregator.start()
        await eventually(lambda: f"waiting for Kafka at 127.0.0.1:{port} (attempt" in aggregator.log(), 30, "waiting line")
        assert "Traceback" not in aggregator.log()
        for _ in range(100):
            if await status(metrics_port, "/healthz") == 200:
                break
            await asyncio.sleep(0.1)
        assert await status(metrics_port, "/healthz") == 200
        assert await status(metrics_port, "/readyz") == 503

        # Degraded start: bounded, decisions by the staleness policy, usage to the spool.
        store = KafkaQuotaStore(config)
        began = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="producer.kafka_store"):
            await store.start()
        degraded_start_s = time.monotonic() - began
        assert degraded_start_s < START_TIMEOUT_S + 1, degraded_start_s
        assert store.degraded and store.stats.degraded_starts == 1
        assert "started DEGRADED" in caplog.text

        tallies: dict[tuple[str, str], int] = {}

        def tally(record: dict[str, Any]) -> None:
            key = (record["user_id"], record["period_key"])
            tallies[key] = tallies.get(key, 0) + record["total_tokens"]

        guard = TokenGuardMiddleware(quota_store=store, quota_tokens=10**9, on_usage=tally)
        agent = Agent(ScriptedChatClient(reply_words=(10, 40), seed=7))
        for index in range(30):
            with tenant_scope(f"tenant-{index % 5}"):
                await run_agent(agent, stream=index % 3 == 0, middleware=[guard])
        await eventually(lambda: store.publisher.spool_pending == 30, 10, "every call's usage spooled")
        assert sum(tallies.values()) > 0 and store.is_stale("tenant-0")

        # The broker starts: the store leaves degraded mode and delivers its spool.
        await asyncio.to_thread(localkafka.start, port)
        broker_up = time.monotonic()
        await eventually(lambda: not store.degraded and store.publisher.spool_pending == 0, 60, "spool delivered")
        delivered_s = time.monotonic() - broker_up
        with tenant_scope("tenant-after"):
            await run_agent(agent, middleware=[guard])  # and calls go on, now straight to Kafka
        await store.publisher.flush(timeout=30)
        await store.stop()

        # The aggregator that waited serves: ready, and its totals hold every recorded token.
        await wait_for_totals(aggregator_config, tallies, timeout=60)
        await verified(aggregator_config)
        for _ in range(300):
            if await status(metrics_port, "/readyz") == 200:
                break
            await asyncio.sleep(0.1)
        assert await status(metrics_port, "/readyz") == 200
        assert await aggregator.terminate() == 0
        print(f"\nstart() returned degraded in {degraded_start_s:.2f}s; broker up -> spool delivered in {delivered_s:.2f}s")
    finally:
        if aggregator.process is not None and aggregator.process.returncode is None:
            await aggregator.kill()
        await asyncio.to_thread(localkafka.stop, port)


async def test_sigterm_while_the_aggregator_waits_for_kafka_exits_0(tmp_path: Path) -> None:
    port = free_port()  # nobody listens: Kafka never answers
    layout = TopicLayout(prefix=f"waiting{port}.", partitions=3)
    config = AggregatorConfig(connection=KafkaConnection(bootstrap_servers=f"127.0.0.1:{port}"), topics=layout,
                              group_id="waiting-aggregator", seal_periods=False)
    aggregator = AggregatorProcess(config, env={"TOKENGUARD_WAIT_FOR_KAFKA": "true"})
    await aggregator.start()
    try:
        await eventually(lambda: "waiting for Kafka at" in aggregator.log(), 30, "waiting line")
        await asyncio.sleep(1.5)
        began = time.monotonic()
        assert await aggregator.terminate(timeout=10) == 0
        assert time.monotonic() - began < 3, "SIGTERM while waiting ends the wait at once"
        log = aggregator.log()
        assert "Traceback" not in log and log.count("waiting for Kafka at") <= 2, log
    finally:
        if aggregator.process is not None and aggregator.process.returncode is None:
            await aggregator.kill()
