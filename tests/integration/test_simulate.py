"""``tokenguard simulate`` on the real broker: usage events with known times, figures computed by hand."""

from __future__ import annotations

import json
import secrets
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from aggregator.changelog import read_changelog
from aggregator.cli.prices import write_price
from aggregator.config import AggregatorConfig
from aggregator.limits import write_rule
from aggregator.rulefile import parse_rules
from aggregator.simulate import simulate_topic
from schemas.policy import parse_counter_key
from schemas.prices import ModelPrice
from schemas.usage import UsageEvent
from schemas.wire import encode_usage, usage_key
from tests.helpers import RawRecord, running_aggregator, send_records, verified
from tests.integration.test_cli import tokenguard
from transport.admin import ensure_topics

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

DAY1 = datetime(2026, 11, 3, 9, 0, tzinfo=UTC)
DAY2 = datetime(2026, 11, 4, 9, 0, tzinfo=UTC)
_prefix = secrets.token_hex(8)


def event(tenant: str, tokens: int, when: datetime, input_tokens: int) -> UsageEvent:
    """A usage event with an id as the fleet makes them (an instance prefix and a sequence)."""
    return UsageEvent(event_id=f"{_prefix}-{secrets.token_hex(6)}", tenant_id=tenant, period_key="2026-11",
                      model="gpt-x", total_tokens=tokens, input_tokens=input_tokens, output_tokens=tokens - input_tokens,
                      quota_tokens=10**12, event_time=when, instance_id="fleet-a")


def records(events: list[UsageEvent]) -> list[RawRecord]:
    return [RawRecord(usage_key(e.tenant_id), encode_usage(e), [("ce_id", e.event_id.encode())]) for e in events]


def write_rules(tmp_path: Path, rules: list[dict[str, Any]]) -> str:
    path = tmp_path / "rules.json"
    path.write_text(json.dumps({"rules": rules}))
    return str(path)


async def test_simulate_two_tenants_prints_the_hand_computed_figures(
    aggregator_config: AggregatorConfig, tmp_path: Path
) -> None:
    config = aggregator_config
    await ensure_topics(config.connection, config.topics)
    await write_price(config.connection, config.topics, ModelPrice(
        model="gpt-x", currency="USD", input_per_mtok=2_000_000, output_per_mtok=10_000_000,
        effective_from=datetime(2026, 1, 1, tzinfo=UTC), updated_at=datetime.now(UTC)))
    acme_day1 = [event("acme", 300, DAY1 + timedelta(minutes=i), 100) for i in range(6)]
    acme_day2 = [event("acme", 300, DAY2 + timedelta(minutes=i), 100) for i in range(2)]
    bigco = [event("bigco", 150_000, DAY1 + timedelta(minutes=i), 100_000) for i in range(3)]
    repeat = acme_day1[4]  # at-least-once delivery: the same event twice counts once
    await send_records(config.connection, config.topics.usage, records([*acme_day1, repeat, *acme_day2, *bigco]))
    rules = write_rules(tmp_path, [
        {"name": "daily", "tenant_id": "acme", "window": "day", "limit": 1000},
        {"name": "spend", "tenant_id": "bigco", "measure": "cost", "currency": "USD", "limit_currency": "1.00"},
    ])

    code, out = await tokenguard(config, "simulate", "--rules", rules, "--json")
    assert code == 0, out
    report = json.loads(out)
    daily, spend = report["rules"]
    # acme: 300, 600, 900, 1200 (crosses: admitted), then 2 refused; day 2 starts again at 0
    assert (daily["tenant_id"], daily["rule"], daily["refused_calls"], daily["refused_tokens"]) == ("acme", "daily", 2, 600)
    assert daily["first_refused"] == (DAY1 + timedelta(minutes=4)).isoformat()
    assert daily["reached_at"] == (DAY1 + timedelta(minutes=3)).isoformat()
    assert [w["window"] for w in daily["windows"]] == ["2026-11-03"] and daily["calls"] == 8
    # bigco: $0.20 input + $0.50 output = 700,000 micros a call: 700k, 1.4M (crosses $1.00), refused
    assert (spend["refused_calls"], spend["refused_tokens"], spend["refused_amount"]) == (1, 150_000, 700_000)
    assert (spend["unit"], spend["limit"], spend["peak_used"]) == ("micro-USD", 1_000_000, 1_400_000)
    # acme's refused calls cost 100 x $2/M + 200 x $10/M = 2,200 micros each
    assert report["totals"] == {
        "events": 11, "refused_calls": 3, "refused_tokens": 150_600, "refused_cost_micros": {"USD": 704_400},
        "before_since": 0, "records": 12, "duplicates": 1, "invalid": {},
    }

    code, out = await tokenguard(config, "simulate", "--rules", rules)
    lines = out.splitlines()
    assert code == 0 and lines[0].startswith("tenant"), out
    assert lines[1].split()[:4] == ["acme", "daily", "block", "1,000"] and "2026-11-03 09:04:00" in lines[1]
    assert "USD 0.70" in lines[2] and "USD 1.00" in lines[2]
    assert lines[3] == "total: 11 calls simulated, 3 refused, 150,600 tokens refused, cost refused USD 0.7044"
    assert lines[4] == "not simulated: 1 repeats"

    code, out = await tokenguard(config, "simulate", "--rules", rules, "--since", "2026-11-04", "--json")
    since = json.loads(out)
    assert code == 0 and since["totals"]["before_since"] == 9 and since["totals"]["refused_calls"] == 0, out


async def test_the_rule_the_fleet_enforced_refuses_nothing_of_what_it_admitted(
    aggregator_config: AggregatorConfig, tmp_path: Path
) -> None:
    """The fleet enforced ``daily`` (1000 a day): its last admitted call of each day crossed the
    limit and nothing came after it. Simulated against the fleet's own output the rule refuses
    nothing, and its per-window figures are the aggregator's rule counters (kept here, though
    their days have ended, so they can be compared)."""
    config = replace(aggregator_config, rate_window_keep_s=10**9)
    await ensure_topics(config.connection, config.topics)
    rule_object = {"name": "daily", "window": "day", "limit": 1000, "effective_from": "2026-01-01T00:00:00Z"}
    [rule] = parse_rules(json.dumps([rule_object]))
    await write_rule(config.connection, config.topics, rule)
    admitted = [event("acme", 300, DAY1 + timedelta(minutes=i), 100) for i in range(4)]  # 1200: the 4th crossed
    admitted += [event("acme", 450, DAY2 + timedelta(minutes=i), 150) for i in range(3)]  # 1350: the 3rd crossed
    admitted += [event("bigco", 999, DAY1, 333), event("bigco", 1, DAY1 + timedelta(seconds=1), 0)]  # exactly 1000
    async with running_aggregator(config):
        await send_records(config.connection, config.topics.usage, records(admitted))
        await verified(config)

    changelog = await read_changelog(config.connection, config.topics.totals)
    fleet = {(tenant, parsed[2]): record.used_tokens for (tenant, period), record in changelog.items()
             if (parsed := parse_counter_key(period)) is not None}
    assert fleet == {("acme", "2026-11-03"): 1200, ("acme", "2026-11-04"): 1350, ("bigco", "2026-11-03"): 1000}

    report = await simulate_topic(config.connection, config.topics, [rule])
    assert (report.events, report.refused_calls, report.refused_tokens) == (9, 0, 0)
    simulated = {(o.tenant_id, w.window): w.used for o in report.outcomes for w in o.windows.values()}
    assert simulated == fleet

    code, out = await tokenguard(config, "simulate", "--rules", write_rules(tmp_path, [rule_object]))
    assert code == 0 and out.splitlines()[-1] == "total: 9 calls simulated, 0 refused, 0 tokens refused", out
