"""The ``tokenguard`` operator command, run as a process against the real broker."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from datetime import UTC

import pytest

from aggregator import AggregatorConfig, AggregatorService
from producer import ProducerConfig, UsagePublisher
from tests.helpers import REPO, free_port, make_event, run_python

pytestmark = pytest.mark.integration


async def tokenguard(config: AggregatorConfig, *args: str, bootstrap: str | None = None) -> tuple[int, str]:
    """``tokenguard <args>`` for ``config``'s deployment, set by the environment; (exit code, its
    stdout then its stderr)."""
    env = {
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap or config.connection.bootstrap_servers,
        "TOKENGUARD_TOPIC_PREFIX": config.topics.prefix,
        "TOKENGUARD_PARTITIONS": str(config.topics.partitions),
        "TOKENGUARD_GROUP_ID": config.group_id,
        "TOKENGUARD_SEAL_PERIODS": "true" if config.seal_periods else "false",
    }
    code, out, err = await run_python("-m", "aggregator.cli", *args, env=env, timeout=90)
    return code, out + err


async def test_topics_check_then_create(aggregator_config: AggregatorConfig) -> None:
    code, out = await tokenguard(aggregator_config, "topics", "check")
    assert code == 1 and out.count("MISSING") == 6
    code, out = await tokenguard(aggregator_config, "topics", "create")
    assert code == 0 and f"{aggregator_config.topics.usage}: 3 partitions" in out
    code, out = await tokenguard(aggregator_config, "topics", "check")
    assert code == 0 and "MISSING" not in out


async def test_limits_set_get_list_delete(aggregator_config: AggregatorConfig) -> None:
    assert (await tokenguard(aggregator_config, "topics", "create"))[0] == 0
    code, out = await tokenguard(aggregator_config, "limits", "set", "acme", "--tokens", "2000000", "--warning-ratio", "0.9")
    assert code == 0 and "acme: 2,000,000 tokens" in out
    assert (await tokenguard(aggregator_config, "limits", "set", "--default", "--tokens", "5000", "--period", "month"))[0] == 0
    code, out = await tokenguard(aggregator_config, "limits", "get", "acme")
    assert code == 0 and "2,000,000" in out and "warning at 90%" in out
    code, out = await tokenguard(aggregator_config, "limits", "list")
    assert code == 0 and "(default): 5,000 tokens per month period" in out and "acme" in out
    assert (await tokenguard(aggregator_config, "limits", "delete", "acme"))[0] == 0
    code, out = await tokenguard(aggregator_config, "limits", "get", "acme")
    assert code == 1 and "no limit set for acme" in out
    code, out = await tokenguard(aggregator_config, "limits", "set", "acme", "--default", "--tokens", "1")
    assert code == 2 and "not both" in out and "Traceback" not in out


async def test_usage_show_and_verify(producer_config: ProducerConfig, aggregator_config: AggregatorConfig) -> None:
    async with AggregatorService(aggregator_config) as aggregator:
        await asyncio.wait_for(aggregator.assigned.wait(), 30)
        async with UsagePublisher(producer_config) as publisher:
            for index in range(30):
                publisher.publish(make_event(f"t{index % 3}", 100))
            await publisher.flush()
        code, out = await tokenguard(aggregator_config, "verify", "--wait-s", "30")
        assert code == 0 and "differences: 0" in out
    code, out = await tokenguard(aggregator_config, "usage", "show", "--json")
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert code == 0 and sorted((r["tenant_id"], r["used_tokens"]) for r in rows) == [("t0", 1000), ("t1", 1000), ("t2", 1000)]
    code, out = await tokenguard(aggregator_config, "usage", "show", "--tenant", "t1")
    assert code == 0 and "t1" in out and "t0" not in out


async def test_unreachable_kafka_is_a_clear_error(aggregator_config: AggregatorConfig) -> None:
    for command in (("usage", "show"), ("verify",), ("aggregator",)):
        code, out = await tokenguard(aggregator_config, *command, bootstrap="127.0.0.1:1")
        assert code == 3 and "127.0.0.1:1" in out and out.count("\n") == 1 and "Traceback" not in out, out


async def test_usage_show_writes_no_escape_bytes_from_the_changelog(aggregator_config: AggregatorConfig) -> None:
    """A record on the totals topic can hold anything its writers put there: nothing of it reaches
    the operator's terminal raw (the schema refuses such keys now; the output escapes them anyway)."""
    from datetime import datetime

    from schemas.totals import TotalsRecord
    from schemas.wire import encode, tenant_period_key
    from tests.helpers import send_raw

    assert (await tokenguard(aggregator_config, "topics", "create"))[0] == 0
    good = TotalsRecord(tenant_id="acme", period_key="2026-11", used_tokens=7, event_count=1, limit_tokens=100,
                        state="ok", usage_partition=0, applied_offset=0, updated_at=datetime.now(UTC))
    hostile = "2026-11\x1b[2J\x1b]0;owned\x07"
    raw = encode(good).replace(b'"2026-11"', b'"2026-11\\u001b[2J\\u001b]0;owned\\u0007"')
    assert raw != encode(good)
    await send_raw(aggregator_config.connection, aggregator_config.topics.totals, [
        (tenant_period_key("acme", "2026-11"), encode(good)),
        (tenant_period_key("mallory", hostile), raw.replace(b'"acme"', b'"mallory"')),
        (tenant_period_key("eve", "x"), encode(good.model_copy(update={"tenant_id": "eve"}))[:-1]
         + b',"period_key":"x\x1b[2J"}'),  # raw ESC bytes in the JSON, not even valid JSON
    ])
    for flags in ((), ("--json",)):
        code, out = await tokenguard(aggregator_config, "usage", "show", *flags)
        assert code == 0 and "\x1b" not in out and "\x07" not in out, out
        assert "acme" in out and "2026-11" in out, out


async def test_replay_rebuilds_a_corrupted_changelog(producer_config: ProducerConfig, aggregator_config: AggregatorConfig) -> None:
    from aiokafka import AIOKafkaProducer

    from aggregator.changelog import read_changelog
    from schemas.wire import encode, tenant_period_key

    async with AggregatorService(aggregator_config) as aggregator:
        await asyncio.wait_for(aggregator.assigned.wait(), 30)
        async with UsagePublisher(producer_config) as publisher:
            for index in range(40):
                publisher.publish(make_event(f"t{index % 4}", 10))
            await publisher.flush()
        assert (await tokenguard(aggregator_config, "verify", "--wait-s", "30"))[0] == 0
        code, out = await tokenguard(aggregator_config, "replay")
        assert code == 1 and "running members" in out, "replay refuses while an aggregator runs"
    records = await read_changelog(aggregator_config.connection, aggregator_config.topics.totals)
    record = records[("t0", "2026-04")]
    producer = AIOKafkaProducer(**aggregator_config.connection.client_kwargs())
    await producer.start()
    try:  # the changelog goes wrong behind everyone's back
        await producer.send_and_wait(aggregator_config.topics.totals, encode(record.model_copy(update={"used_tokens": 999})),
                                     key=tenant_period_key("t0", "2026-04"), partition=record.usage_partition)
    finally:
        await producer.stop()
    assert (await tokenguard(aggregator_config, "verify", "--wait-s", "5"))[0] == 1
    code, out = await tokenguard(aggregator_config, "replay")
    assert code == 0 and "rebuilt 4 tenant-periods" in out, out
    code, out = await tokenguard(aggregator_config, "verify", "--wait-s", "30")
    assert code == 0 and "differences: 0" in out, out
    # The aggregator resumes from the replayed end: new events add to the rebuilt totals.
    async with AggregatorService(aggregator_config) as aggregator:
        await asyncio.wait_for(aggregator.assigned.wait(), 30)
        async with UsagePublisher(producer_config) as publisher:
            publisher.publish(make_event("t0", 5))
            await publisher.flush()
        code, out = await tokenguard(aggregator_config, "verify", "--wait-s", "30")
        assert code == 0, out
        assert aggregator.stats.events == 1


async def test_tokenguard_aggregator_runs_with_metrics_and_stops_on_sigterm(aggregator_config: AggregatorConfig) -> None:
    import signal

    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENGUARD_TOPIC_PREFIX": aggregator_config.topics.prefix}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "aggregator.cli", "aggregator", "--bootstrap-servers",
        aggregator_config.connection.bootstrap_servers, "--group-id", aggregator_config.group_id,
        "--metrics-port", str(port), cwd=REPO, env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(60):
            while True:  # ready once its partitions are restored and it has caught up
                try:
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                except OSError:
                    await asyncio.sleep(0.2)
                    continue
                writer.write(b"GET /readyz HTTP/1.1\r\n\r\n")
                response = await reader.read()
                writer.close()
                await writer.wait_closed()
                if response.startswith(b"HTTP/1.1 200"):
                    break
                await asyncio.sleep(0.2)
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, stderr.decode()[-2000:]
