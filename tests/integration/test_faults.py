"""Exactness under faults, on the real broker: SIGKILLed aggregators, scale-out, duplicates, bad input.

Each ends with the independent verifier (``aggregator.verify``) reporting no difference.
"""

from __future__ import annotations

import asyncio
import json
import random
from dataclasses import replace

import pytest

from aggregator import AggregatorConfig, AggregatorService
from aggregator.changelog import read_changelog
from producer import ProducerConfig, UsagePublisher, ensure_topics
from schemas.usage import UsageEvent
from schemas.wire import MAX_RECORD_BYTES, encode, tenant_period_key
from tests.helpers import (
    AggregatorProcess,
    RawRecord,
    eventually,
    make_event,
    read_topic,
    reason_of,
    run_python,
    running_aggregator,
    send_raw,
    send_records,
    verified,
)

pytestmark = pytest.mark.integration


async def publish_paced(publisher: UsagePublisher, events: list[UsageEvent], seconds: float) -> None:
    """Publish ``events`` spread over about ``seconds``, so faults land while they flow."""
    chunks = 100
    size = max(1, len(events) // chunks)
    for start in range(0, len(events), size):
        for event in events[start : start + size]:
            publisher.publish(event)
        await asyncio.sleep(seconds / chunks)
    await publisher.flush(timeout=60)


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_random_sigkills_while_200k_events_for_1000_tenants_flow(
    producer_config: ProducerConfig, aggregator_config: AggregatorConfig
) -> None:
    rng = random.Random(2026)
    await ensure_topics(aggregator_config.connection, aggregator_config.topics)
    events = [make_event(f"tenant-{rng.randrange(1_000):04d}", rng.randrange(1, 5_000)) for _ in range(200_000)]
    # A static member id: each restart takes the partitions back at once, no session timeout.
    aggregator = AggregatorProcess(aggregator_config, instance_id="agg-0", env={"TOKENGUARD_DEDUP_WINDOW": "20000"})
    await aggregator.start()
    kills = mid_flow = 0
    async with UsagePublisher(producer_config) as publisher:
        flow = asyncio.create_task(publish_paced(publisher, events, seconds=25))
        try:
            while kills < 10 or not flow.done():
                await asyncio.sleep(rng.uniform(0.8, 2.5))
                mid_flow += not flow.done()
                await aggregator.kill()
                kills += 1
                await aggregator.start()
        finally:
            await flow
    try:
        report = await verified(aggregator_config, wait_s=120)
    finally:
        assert await aggregator.terminate() == 0
    assert mid_flow >= 5, f"only {mid_flow} of {kills} SIGKILLs landed while events flowed"
    assert report.events == 200_000
    assert report.keys == len({e.tenant_id for e in events}) >= 1_000


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_two_aggregators_one_killed_mid_stream_then_restarted(
    producer_config: ProducerConfig, aggregator_config: AggregatorConfig
) -> None:
    rng = random.Random(11)
    config = replace(aggregator_config, session_timeout_ms=6_000)
    events = [make_event(f"t{rng.randrange(300)}", rng.randrange(1, 900)) for _ in range(60_000)]
    partitions = set(range(config.topics.partitions))
    async with running_aggregator(config) as local:
        other = AggregatorProcess(config, instance_id=None, env={"TOKENGUARD_SESSION_TIMEOUT_MS": "6000"})
        await other.start()
        await eventually(lambda: local.owned_partitions != partitions, 60, "the group splitting the partitions")
        async with UsagePublisher(producer_config) as publisher:
            flow = asyncio.create_task(publish_paced(publisher, events, seconds=12))
            await asyncio.sleep(3)
            shared, flowing = local.owned_partitions, not flow.done()
            await other.kill()
            # The survivor takes over the dead member's partitions after its session times out.
            await eventually(lambda: local.owned_partitions == partitions, 60, "the survivor owning every partition")
            await other.start()
            await flow
        report = await verified(config)
        assert await other.terminate() == 0
    assert shared != partitions and flowing, "the kill must hit a member that owned partitions, mid-stream"
    assert report.events == 60_000


async def test_republished_event_ids_are_counted_once(
    producer_config: ProducerConfig, aggregator_config: AggregatorConfig
) -> None:
    rng = random.Random(5)
    originals = [make_event(f"t{rng.randrange(50)}", rng.randrange(1, 1_000)) for _ in range(20_000)]
    stream: list[UsageEvent] = []
    for index, event in enumerate(originals):
        stream.append(event)
        if index % 10 == 9:  # 10%: a publisher retry or a spool replay re-sends an earlier event
            stream.append(originals[rng.randrange(max(0, index - 500), index + 1)])
    async with running_aggregator(aggregator_config) as aggregator:
        async with UsagePublisher(producer_config) as publisher:
            await publish_paced(publisher, stream, seconds=3)
        report = await verified(aggregator_config)
        assert aggregator.stats.duplicates_dropped == 2_000
    assert report.duplicates == 2_000 and report.events == 20_000


BAD_RECORDS: list[tuple[str, bytes | None, bytes | None, str]] = []


def _bad(name: str, reason: str, *, key: bytes | None = b"acme", value: bytes | None = None, **change: object) -> None:
    if value is None and change:
        data = json.loads(encode(make_event("acme", 10)))
        data.update(change)
        data = {k: v for k, v in data.items() if v is not _DROP}
        value = json.dumps(data).encode()
    BAD_RECORDS.append((name, key, value, reason))


_DROP = object()
_bad("garbage bytes", "invalid_json", value=b"\x00\xffnot json at all")
_bad("empty value", "empty_value", value=b"")
_bad("null value", "empty_value", value=None)
_bad("json array", "invalid_schema", value=b"[1, 2, 3]")
_bad("invalid utf-8 in a string", "invalid_json", value=b'{"tenant_id": "\xc3\x28"}')
_bad("missing tenant", "invalid_schema", tenant_id=_DROP)
_bad("negative tokens", "invalid_schema", total_tokens=-5)
_bad("absurd token count", "invalid_schema", total_tokens=10**13)
_bad("tokens as a string", "invalid_schema", total_tokens="63")
_bad("unknown schema version", "unsupported_version", schema_version=7)
_bad("oversized tenant id", "invalid_schema", tenant_id="x" * 5_000)
_bad("control characters in tenant", "invalid_schema", tenant_id="acme\x1b[31m")
_bad("naive timestamp", "invalid_schema", event_time="2026-04-14T11:46:09")
_bad("too many attributes", "invalid_schema", attributes={f"k{i}": "v" for i in range(100)})
_bad("record over 64 KiB", "oversized", value=b'{"pad": "' + b"x" * MAX_RECORD_BYTES + b'"}')
_bad("key is another tenant", "key_mismatch", key=b"globex", value=encode(make_event("acme", 10)))


async def test_bad_input_classes_end_in_the_dead_letter_topic_with_a_reason(
    aggregator_config: AggregatorConfig,
) -> None:
    layout = aggregator_config.topics
    await ensure_topics(aggregator_config.connection, layout)
    records: list[tuple[bytes | None, bytes | None]] = []
    good_tokens = 0
    for index, (_, key, value, _) in enumerate(BAD_RECORDS):
        good = make_event("acme", 100 + index)
        good_tokens += good.total_tokens
        records += [(b"acme", encode(good)), (key, value)]
    await send_raw(aggregator_config.connection, layout.usage, records)
    async with AggregatorService(aggregator_config) as aggregator:
        report = await verified(aggregator_config)
        assert aggregator.stats.dead_letters == len(BAD_RECORDS)
        assert aggregator.stats.events == len(BAD_RECORDS)
    assert report.events == len(BAD_RECORDS) and sum(report.invalid.values()) == len(BAD_RECORDS)

    letters = await read_topic(aggregator_config.connection, layout.dead_letters)
    got = sorted((letter.value or b"", reason_of(letter)) for letter in letters)
    want = sorted((value or b"", reason) for _, _, value, reason in BAD_RECORDS)
    assert got == want, "each bad record is dead-lettered once, with its original bytes and its reason"
    assert all(dict(letter.headers)["tokenguard.error.detail"] for letter in letters if letter.value)


async def run_verify_cli(config: AggregatorConfig) -> tuple[int, str]:
    code, out, _ = await run_python(
        "-m", "aggregator", "verify", "--bootstrap-servers", config.connection.bootstrap_servers,
        "--topic-prefix", config.topics.prefix, "--group-id", config.group_id, "--wait-s", "30",
        env={"TOKENGUARD_SEAL_PERIODS": "true" if config.seal_periods else "false"},
    )
    return code, out


async def test_verify_cli_exits_zero_when_exact_and_one_on_a_difference(
    producer_config: ProducerConfig, aggregator_config: AggregatorConfig
) -> None:
    async with running_aggregator(aggregator_config):
        async with UsagePublisher(producer_config) as publisher:
            for index in range(500):
                publisher.publish(make_event(f"t{index % 9}", 10))
            await publisher.flush()
        await verified(aggregator_config)
    code, out = await run_verify_cli(aggregator_config)
    assert code == 0 and "differences: 0" in out, out

    # Corrupt one changelog record behind the aggregator's back: the verifier must notice.
    records = await read_changelog(aggregator_config.connection, aggregator_config.topics.totals)
    (tenant, period), record = sorted(records.items())[0]
    forged = record.model_copy(update={"used_tokens": record.used_tokens + 1})
    await send_records(aggregator_config.connection, aggregator_config.topics.totals, [
        RawRecord(tenant_period_key(tenant, period), encode(forged), partition=record.usage_partition)
    ])
    code, out = await run_verify_cli(aggregator_config)
    assert code == 1, out
    assert f"DIFFERENCE '{tenant}' '{period}'" in out and "differences: 1" in out
