"""A tokens-per-window rate rule holds across processes (issue 11), on the real broker.

Three agent processes hammer one tenant, each with its own ``KafkaQuotaStore``; a real aggregator
counts. The judge is the usage topic itself: every admitted call is an event there, so the tokens
admitted per rate window are summed from the topic, independently of anybody's counters.
"""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict
from datetime import UTC, datetime

import pytest

from aggregator.config import AggregatorConfig
from aggregator.limits import write_rule
from producer import ProducerConfig
from schemas.policy import QuotaRule
from schemas.wire import decode_usage
from tests.helpers import read_topic, run_python, running_aggregator, verified
from transport.admin import ensure_topics

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

WINDOW_S, LIMIT, SECONDS = 2, 1_500, 7.0

AGENT = """
import asyncio, json, sys, time
from agent_framework import Agent
from producer import KafkaQuotaStore, ProducerConfig, QuotaExceededError, TokenGuardMiddleware
from producer.scripted import ScriptedChatClient

async def main() -> None:
    admitted = refused = 0
    async with KafkaQuotaStore(ProducerConfig.from_env()) as store:
        guard = TokenGuardMiddleware(quota_store=store, quota_tokens=10**9, user_id_getter=lambda _: "tpm",
                                     default_max_tokens=64)
        agent = Agent(ScriptedChatClient(reply_words=20, latency_s=0.03))
        print("ready", flush=True, file=sys.stderr)
        end = time.monotonic() + float(sys.argv[1])
        while time.monotonic() < end:
            try:
                await agent.run("Hello!", middleware=[guard])
                admitted += 1
            except QuotaExceededError as exc:
                assert exc.rules and exc.rules[0]["rule"] == "tpm", exc.rules
                refused += 1
                await asyncio.sleep(0.03)
    print(json.dumps({"admitted": admitted, "refused": refused}))

asyncio.run(main())
"""


async def test_a_tokens_per_window_rule_holds_across_processes(
    producer_config: ProducerConfig, aggregator_config: AggregatorConfig
) -> None:
    await ensure_topics(producer_config.connection, producer_config.topics)
    await write_rule(producer_config.connection, producer_config.topics, QuotaRule(
        name="tpm", tenant_id="tpm", limit=LIMIT, window="rate", window_seconds=WINDOW_S, thresholds=(0.5, 0.8, 0.9),
        effective_from=datetime(2020, 1, 1, tzinfo=UTC), updated_at=datetime.now(UTC)))
    env = {"KAFKA_BOOTSTRAP_SERVERS": producer_config.connection.bootstrap_servers,
           "TOKENGUARD_TOPIC_PREFIX": producer_config.topics.prefix,
           "TOKENGUARD_PARTITIONS": str(producer_config.topics.partitions)}
    async with running_aggregator(aggregator_config):
        runs = await asyncio.gather(*(
            run_python("-c", AGENT, str(SECONDS), env={**env, "TOKENGUARD_INSTANCE_ID": f"agent-{i}",
                                                      "TOKENGUARD_SPOOL_DIR": str(producer_config.spool_dir) + f"-{i}"},
                       timeout=90)
            for i in range(3)))
        for code, _, err in runs:
            assert code == 0, err[-2000:]
        outcomes = [json.loads(out.strip().splitlines()[-1]) for _, out, _ in runs]
        await verified(aggregator_config)
    per_window: dict[int, int] = defaultdict(int)
    for record in await read_topic(producer_config.connection, producer_config.topics.usage):
        event = decode_usage(record.value)
        per_window[int(event.event_time.timestamp()) // WINDOW_S] += event.total_tokens
    spent = sorted(per_window.items())
    print("tokens admitted per window:", [tokens for _, tokens in spent], "limit", LIMIT, "outcomes", outcomes)
    # Unbounded, the fleet spends ~3x the limit per window (three processes at ~1,000 tokens/s).
    assert all(outcome["refused"] > 0 for outcome in outcomes)
    # What passes beyond the limit is what the fleet spends while a notice travels.
    assert max(tokens for _, tokens in spent) <= LIMIT * 1.35, spent
    full = spent[1:-1]  # the first and last windows are cut by the run's start and end
    assert full and all(tokens >= LIMIT * 0.7 for _, tokens in full), spent
