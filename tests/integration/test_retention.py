"""The usage topic's retention against its periods, on the real broker: a topic that keeps events
for less than a period plus its grace (and the verify margin) stops the aggregator at start with one
line, ``topics check`` reports it, the override starts anyway, and the default layout passes."""

from __future__ import annotations

import asyncio
import dataclasses
import logging

import pytest

from aggregator import AggregatorConfig, AggregatorService
from aggregator.errors import RetentionError
from tests.helpers import run_python
from transport.admin import ensure_topics, topic_config

pytestmark = pytest.mark.integration

DAY_MS = 86_400_000


def _short(config: AggregatorConfig, **fields: object) -> AggregatorConfig:
    """``config`` whose usage topic is created keeping events 30 days (the old default)."""
    return dataclasses.replace(config, topics=dataclasses.replace(config.topics, usage_retention_ms=30 * DAY_MS), **fields)


async def _cli(config: AggregatorConfig, *args: str, **env: str) -> tuple[int, str, str]:
    return await run_python("-m", *args, env={
        "KAFKA_BOOTSTRAP_SERVERS": config.connection.bootstrap_servers,
        "TOKENGUARD_TOPIC_PREFIX": config.topics.prefix,
        "TOKENGUARD_PARTITIONS": str(config.topics.partitions),
        "TOKENGUARD_GROUP_ID": config.group_id,
        **env,
    }, timeout=90)


async def test_the_default_layout_creates_a_usage_topic_that_passes(aggregator_config: AggregatorConfig) -> None:
    await ensure_topics(aggregator_config.connection, aggregator_config.topics)
    described = await topic_config(aggregator_config.connection, aggregator_config.topics.usage)
    assert described["retention.ms"] == str(63 * DAY_MS) and described["retention.bytes"] == "-1"
    code, out, err = await _cli(aggregator_config, "aggregator.cli", "topics", "check")
    assert code == 0 and "RETENTION" not in out and "WARNING" not in out and err == "", out + err
    async with AggregatorService(aggregator_config) as aggregator:
        await asyncio.wait_for(aggregator.assigned.wait(), 30)


async def test_a_short_usage_retention_stops_the_aggregator_with_one_line(aggregator_config: AggregatorConfig) -> None:
    short = _short(aggregator_config)
    await ensure_topics(short.connection, short.topics)
    with pytest.raises(RetentionError, match=r"keeps events 30 days \(retention.ms=2592000000\) but needs at least 62.25"):
        await AggregatorService(aggregator_config).start()

    code, out, err = await _cli(aggregator_config, "aggregator")  # python -m aggregator: tokenguard aggregator
    assert code == 1 and "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1 and out == "", err  # exactly one line: no log line, no traceback
    usage = aggregator_config.topics.usage
    assert lines[0].startswith(f"tokenguard aggregator: topic {usage!r} keeps events 30 days"), err
    assert f"--entity-name {usage} --add-config retention.ms={63 * DAY_MS}" in lines[0], err
    assert "TOKENGUARD_ALLOW_SHORT_RETENTION=true" in lines[0], err

    code, out, err = await _cli(aggregator_config, "aggregator.cli", "topics", "check")
    assert code == 1 and err == "", err
    flagged = [line for line in out.splitlines() if line.startswith("RETENTION ")]
    assert len(flagged) == 1 and f"topic {usage!r} keeps events 30 days" in flagged[0], out
    # A fleet counting in days only needs 2 days and 6 hours: the same topic passes.
    code, out, _ = await _cli(aggregator_config, "aggregator.cli", "topics", "check", "--longest-period", "86400")
    assert code == 0 and "RETENTION" not in out, out


async def test_the_override_starts_anyway_with_a_warning(
    aggregator_config: AggregatorConfig, caplog: pytest.LogCaptureFixture
) -> None:
    short = _short(aggregator_config, allow_short_retention=True)
    await ensure_topics(short.connection, short.topics)
    with caplog.at_level(logging.WARNING, logger="aggregator.service"):
        async with AggregatorService(short) as aggregator:
            await asyncio.wait_for(aggregator.assigned.wait(), 30)
    assert any("starting anyway" in r.getMessage() and "keeps events 30 days" in r.getMessage() for r in caplog.records)


async def test_the_override_by_environment_starts_the_cli_service(aggregator_config: AggregatorConfig) -> None:
    import os
    import signal
    import sys

    from tests.helpers import REPO

    await ensure_topics(aggregator_config.connection, _short(aggregator_config).topics)
    env = {**os.environ, "PYTHONPATH": str(REPO), "KAFKA_BOOTSTRAP_SERVERS": aggregator_config.connection.bootstrap_servers,
           "TOKENGUARD_TOPIC_PREFIX": aggregator_config.topics.prefix, "TOKENGUARD_PARTITIONS": "3",
           "TOKENGUARD_GROUP_ID": aggregator_config.group_id, "TOKENGUARD_ALLOW_SHORT_RETENTION": "true"}
    process = await asyncio.create_subprocess_exec(sys.executable, "-m", "aggregator", cwd=REPO, env=env,
                                                   stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    seen = b""
    try:
        assert process.stderr is not None
        async with asyncio.timeout(60):
            while b"consuming" not in seen:  # "aggregator <id> consuming <usage>": start() returned
                line = await process.stderr.readline()
                assert line, seen.decode()
                seen += line
    finally:
        process.send_signal(signal.SIGTERM)
        rest, _ = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, (seen + (rest or b"")).decode()[-2000:]
    assert b"starting anyway (TOKENGUARD_ALLOW_SHORT_RETENTION)" in seen, seen.decode()


async def test_a_retention_bytes_limit_is_reported_not_refused(aggregator_config: AggregatorConfig) -> None:
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    topics = aggregator_config.topics
    admin = AIOKafkaAdminClient(**aggregator_config.connection.client_kwargs())
    await admin.start()
    try:
        spec = topics.specs()[0]
        await admin.create_topics([NewTopic(spec.name, spec.partitions, 1,
                                            topic_configs={**spec.configs, "retention.bytes": "1073741824"})])
    finally:
        await admin.close()
    await ensure_topics(aggregator_config.connection, topics)
    code, out, _ = await _cli(aggregator_config, "aggregator.cli", "topics", "check")
    assert code == 0 and "RETENTION" not in out, out
    assert f"WARNING topic {topics.usage!r} has retention.bytes=1073741824" in out, out
