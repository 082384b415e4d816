"""examples/billing.py run as a process against usage on the real broker, duplicates included."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from producer import ProducerConfig, UsagePublisher, ensure_topics
from tests.helpers import make_event, run_python

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
