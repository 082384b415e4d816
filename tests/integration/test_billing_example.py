"""examples/billing.py run as a process against usage on the real broker, duplicates included."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from aggregator import AggregatorConfig
from producer import ProducerConfig, UsagePublisher, ensure_topics
from tests.helpers import make_event, run_python
from tests.integration.test_cli import tokenguard

pytestmark = pytest.mark.integration


async def test_billing_example_prices_each_event_once(producer_config: ProducerConfig, tmp_path: Path) -> None:
    await ensure_topics(producer_config.connection, producer_config.topics)
    events = [make_event("acme", 3_000_000) for _ in range(2)] + [make_event("globex", 1_000_000)]
    async with UsagePublisher(producer_config) as publisher:
        for event in [*events, events[0]]:  # the first event arrives twice
            publisher.publish(event)
        await publisher.flush()
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps({"*": {"input": 1.0, "output": 2.0}}))
    out = tmp_path / "costs.csv"
    code, _, err = await run_python(
        "examples/billing.py", "--prices", str(prices), "--out", str(out),
        "--bootstrap-servers", producer_config.connection.bootstrap_servers,
        "--topic-prefix", producer_config.topics.prefix,
    )
    assert code == 0, err[-2000:]
    with out.open() as file:
        rows = {row["tenant"]: row for row in csv.DictReader(file)}
    # make_event splits tokens a third input, the rest output: 1M in + 2M out per 3M event.
    assert rows["acme"]["events"] == "2" and float(rows["acme"]["cost_usd"]) == pytest.approx(2 * (1.0 + 4.0))
    assert rows["globex"]["total_tokens"] == "1000000"


async def test_billing_example_costs_from_the_price_table(
    producer_config: ProducerConfig, aggregator_config: AggregatorConfig, tmp_path: Path
) -> None:
    await ensure_topics(producer_config.connection, producer_config.topics)
    for version in (("--input", "2.50", "--output", "10", "--cached-input", "1.25", "--effective-from", "2026-01-01"),
                    ("--input", "100", "--output", "100", "--effective-from", "2099-01-01")):  # not yet in force
        code, out = await tokenguard(aggregator_config, "prices", "set", "gpt-4o", "--currency", "USD", *version)
        assert code == 0, out
    cached = make_event("acme", 1333).model_copy(update={
        "model": "gpt-4o", "input_tokens": 1000, "output_tokens": 333, "cache_read_input_tokens": 400})
    events = [
        cached, cached.model_copy(update={"event_id": "another-cached-call"}),
        make_event("acme", 500).model_copy(update={"model": "mystery"}),
        make_event("globex", 10).model_copy(update={"model": "gpt-4o", "input_tokens": 7, "output_tokens": 3}),
    ]
    async with UsagePublisher(producer_config) as publisher:
        for event in [*events, events[0]]:  # the first event arrives twice
            publisher.publish(event)
        await publisher.flush()
    out_csv = tmp_path / "costs.csv"
    code, out, err = await run_python(
        "examples/billing.py", "--out", str(out_csv),
        "--bootstrap-servers", producer_config.connection.bootstrap_servers,
        "--topic-prefix", producer_config.topics.prefix,
    )
    assert code == 0, err[-2000:]
    # acme, per call: 600 input at 2.50 + 400 cached at 1.25 + 333 output at 10 = 1500 + 500 + 3330 micros
    # globex: 7 * 2.5 + 3 * 10 = 47.5 micros, rounded up once
    assert "cost acme USD 0.01066 (10660 micros)" in out, out
    assert "cost globex USD 0.000048 (48 micros)" in out, out
    assert "flag acme: 500 tokens unpriced (no price for their model and no '*')" in out, out
    with out_csv.open() as file:
        rows = {(row["tenant"], row["model"]): row for row in csv.DictReader(file)}
    assert rows[("acme", "gpt-4o")]["cost_micros"] == "10660" and rows[("acme", "gpt-4o")]["events"] == "2"
    assert rows[("acme", "mystery")]["currency"] == "" and rows[("acme", "mystery")]["unpriced_tokens"] == "500"
