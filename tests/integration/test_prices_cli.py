"""``tokenguard prices``, run as a process against the real broker."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from aiokafka import AIOKafkaProducer

from aggregator import AggregatorConfig
from schemas.prices import price_key
from tests.integration.test_cli import tokenguard

pytestmark = pytest.mark.integration

NOV = datetime(2026, 11, 1, tzinfo=UTC)


async def test_prices_set_two_versions_list_delete(aggregator_config: AggregatorConfig) -> None:
    assert (await tokenguard(aggregator_config, "topics", "create"))[0] == 0
    assert (await tokenguard(aggregator_config, "limits", "set", "acme", "--tokens", "1000"))[0] == 0
    code, out = await tokenguard(aggregator_config, "prices", "set", "gpt-4o", "--input", "2.50", "--output", "10",
                                 "--currency", "USD", "--cached-input", "1.25", "--effective-from", "2026-11-01T00:00:00Z")
    assert code == 0 and "gpt-4o from 2026-11-01T00:00:00Z: USD" in out and "input 2.50" in out, out
    code, out = await tokenguard(aggregator_config, "prices", "set", "gpt-4o", "--input", "2", "--output", "8.000001",
                                 "--currency", "USD", "--effective-from", "2026-12-01T01:00:00+01:00")
    assert code == 0 and "from 2026-12-01T00:00:00Z" in out, out
    assert (await tokenguard(aggregator_config, "prices", "set", "*", "--input", "1", "--output", "2",
                             "--currency", "EUR", "--effective-from", "2026-01-01"))[0] == 0

    # a price key whose value is not a price is counted; the limit next to it is not a price at all
    producer = AIOKafkaProducer(**aggregator_config.connection.client_kwargs())
    await producer.start()
    try:
        await producer.send_and_wait(aggregator_config.topics.limits, b"{}", key=price_key("bad", NOV))
    finally:
        await producer.stop()

    code, out = await tokenguard(aggregator_config, "prices", "list")
    lines = [line for line in out.splitlines() if " from " in line]
    assert code == 0 and [line.split(" from ")[0] for line in lines] == ["*", "gpt-4o", "gpt-4o"], out
    assert "cached input 1.25" in lines[1] and "output 8.000001" in lines[2] and "cached input input" in lines[2]
    assert "skipped 1 unreadable price records: {'invalid_schema': 1}" in out

    code, out = await tokenguard(aggregator_config, "prices", "list", "--model", "gpt-4o", "--json")
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert code == 0 and [(r["input_per_mtok"], r["output_per_mtok"], r["cached_input_per_mtok"]) for r in rows] == [
        (2_500_000, 10_000_000, 1_250_000), (2_000_000, 8_000_001, None)]

    code, out = await tokenguard(aggregator_config, "prices", "delete", "gpt-4o", "--effective-from", "2026-12-01T00:00:00Z")
    assert code == 0 and "deleted the price of gpt-4o from 2026-12-01T00:00:00Z" in out
    code, out = await tokenguard(aggregator_config, "prices", "list", "--model", "gpt-4o")
    assert code == 0 and out.count("gpt-4o from") == 1 and "2026-11-01T00:00:00Z" in out, out


@pytest.mark.parametrize("args", [
    ("--input", "2.5000001", "--output", "1", "--currency", "USD"),
    ("--input", "-1", "--output", "1", "--currency", "USD"),
    ("--input", "NaN", "--output", "1", "--currency", "USD"),
    ("--input", "1", "--output", "1", "--currency", "dollars"),
    ("--input", "1", "--output", "1", "--currency", "USD", "--effective-from", "soon"),
])
async def test_bad_prices_are_one_line_and_exit_2(aggregator_config: AggregatorConfig, args: tuple[str, ...]) -> None:
    code, out = await tokenguard(aggregator_config, "prices", "set", "gpt-4o", *args)
    assert code == 2 and out.count("\n") == 1 and "Traceback" not in out, out
