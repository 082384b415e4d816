"""Usage that survives a crash (issue 13), on the real broker.

An agent process calls in a tight loop that never yields to the publisher (CPU-bound between
calls, the worst case for a publisher sharing the agent's event loop) and is SIGKILLed; a process
started afterwards on the same host, with the same spool folder, delivers what the dead one left.
Every token the dead process recorded (its ``on_usage`` log, written unbuffered) must be in the
aggregator's totals. Without the journal the same kill loses most of them: the scenario is real.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import pytest

from aggregator.changelog import read_changelog
from aggregator.config import AggregatorConfig
from producer import ProducerConfig
from producer.periods import month_key
from tests.helpers import REPO, eventually, run_python, running_aggregator, verified
from transport.admin import ensure_topics

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

AGENT = """
import asyncio, os, sys
from agent_framework import Agent
from producer import KafkaQuotaStore, ProducerConfig, TokenGuardMiddleware
from producer.scripted import ScriptedChatClient

log = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

def used(record):
    os.write(log, b"%d\\n" % record["total_tokens"])

async def main():
    async with KafkaQuotaStore(ProducerConfig.from_env()) as store:
        guard = TokenGuardMiddleware(quota_store=store, quota_tokens=10**12, on_usage=used,
                                     user_id_getter=lambda _: "crash")
        agent = Agent(ScriptedChatClient(reply_words=20))
        while True:
            await agent.run("Hello!", middleware=[guard])

asyncio.run(main())
"""

ADOPT = """
import asyncio
from producer import KafkaQuotaStore, ProducerConfig

async def main():
    async with KafkaQuotaStore(ProducerConfig.from_env()) as store:
        while store.publisher.spool_pending:
            await asyncio.sleep(0.05)

asyncio.run(main())
"""


def logged(path: Path) -> list[int]:
    return [int(line) for line in path.read_text().split()] if path.exists() else []


@pytest.mark.parametrize("journal", [True, False], ids=["journal", "no-journal"])
async def test_a_killed_agent_loses_no_recorded_usage(
    producer_config: ProducerConfig, aggregator_config: AggregatorConfig, tmp_path: Path, journal: bool
) -> None:
    await ensure_topics(producer_config.connection, producer_config.topics)
    env = {**os.environ, "PYTHONPATH": str(REPO),
           "KAFKA_BOOTSTRAP_SERVERS": producer_config.connection.bootstrap_servers,
           "TOKENGUARD_TOPIC_PREFIX": producer_config.topics.prefix,
           "TOKENGUARD_PARTITIONS": str(producer_config.topics.partitions),
           "TOKENGUARD_SPOOL_DIR": str(tmp_path / "spool"), "TOKENGUARD_JOURNAL": "true" if journal else "false"}
    log = tmp_path / "on_usage.log"
    async with running_aggregator(aggregator_config):
        agent = await asyncio.create_subprocess_exec(
            sys.executable, "-c", AGENT, str(log), cwd=REPO, env={**env, "TOKENGUARD_INSTANCE_ID": "doomed"},
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        try:
            await eventually(lambda: len(logged(log)) >= 2_000, timeout=60, what="2,000 calls recorded")
        finally:
            agent.send_signal(signal.SIGKILL)
            await agent.wait()
        recorded = logged(log)
        # The next process on the host: it adopts what the dead one left and delivers it.
        code, _, err = await run_python("-c", ADOPT, env={**env, "TOKENGUARD_INSTANCE_ID": "successor"}, timeout=90)
        assert code == 0, err[-2000:]
        await verified(aggregator_config)
    totals = await read_changelog(aggregator_config.connection, aggregator_config.topics.totals)
    record = totals.get(("crash", month_key()))
    counted = record.used_tokens if record is not None else 0
    print(f"journal {journal}: {len(recorded)} calls ({sum(recorded)} tokens) recorded before SIGKILL; "
          f"{counted} tokens in the totals")
    if journal:
        # Every recorded call is counted; at most the one being recorded at the kill is counted
        # without its on_usage line (the journal write comes first).
        assert sum(recorded) <= counted <= sum(recorded) + max(recorded)
    else:
        assert counted < sum(recorded), "without the journal a starved publisher's queue dies with the process"
