"""``tokenguard limits ... --rule``: quota rules on the limits topic, run as a process against the real broker."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime

import pytest

from aggregator import AggregatorConfig
from tests.integration.test_cli import tokenguard

pytestmark = pytest.mark.integration


async def rule_json(config: AggregatorConfig, tenant: str | None, name: str) -> dict[str, object] | None:
    """The rule as ``limits list --json`` shows it; None if there is none."""
    code, out = await tokenguard(config, "limits", "list", "--json")
    assert code == 0, out
    for row in (json.loads(line) for line in out.splitlines() if line.startswith("{")):
        if row["kind"] == "rule" and (row["tenant_id"], row["name"]) == (tenant, name):
            return row
    return None


async def test_rules_set_get_list_update_delete(aggregator_config: AggregatorConfig) -> None:
    config = aggregator_config
    assert (await tokenguard(config, "topics", "create"))[0] == 0
    assert (await tokenguard(config, "limits", "set", "acme", "--tokens", "5000"))[0] == 0
    code, out = await tokenguard(config, "limits", "set", "acme", "--rule", "daily", "--limit", "100000", "--window", "day",
                                 "--timezone", "Europe/Paris", "--user", "alice", "--threshold", "0.8",
                                 "--threshold", "0.5", "--action", "warn")
    assert code == 0 and "acme rule daily: 100,000 total_tokens per day (Europe/Paris), user=alice, " \
                         "warn at 50%, 80%, warn, from " in out, out
    code, out = await tokenguard(config, "limits", "set", "acme", "--rule", "monthly", "--limit", "12.5", "--measure",
                                 "cost", "--currency", "USD", "--model", "gpt-4o")
    assert code == 0 and "acme rule monthly: 12.50 USD cost per month (UTC), model=gpt-4o, no thresholds, block" in out, out
    code, out = await tokenguard(config, "limits", "set", "--default", "--rule", "burst", "--limit", "60",
                                 "--measure", "requests", "--rate", "1m", "--agent", "planner")
    assert code == 0 and "(default) rule burst: 60 requests per 60s (rate), agent=planner" in out, out

    code, out = await tokenguard(config, "limits", "list")
    lines = out.splitlines()
    assert code == 0 and lines[0].startswith("acme: 5,000 tokens"), out
    assert [line.split(":")[0] for line in lines[1:]] == ["(default) rule burst", "acme rule daily", "acme rule monthly"]
    code, out = await tokenguard(config, "limits", "get", "acme")
    assert code == 0 and "acme: 5,000 tokens" in out and "rule daily" in out and "rule monthly" in out, out
    assert "burst" not in out
    code, out = await tokenguard(config, "limits", "get", "acme", "--rule", "monthly")
    assert code == 0 and out.count("\n") == 1 and "12.50 USD" in out, out
    code, out = await tokenguard(config, "limits", "get", "acme", "--rule", "burst")
    assert code == 1 and "no rule burst set for acme (the default rule of that name applies)" in out, out
    monthly = await rule_json(config, "acme", "monthly")
    assert monthly is not None and monthly["limit"] == 12_500_000 and monthly["currency"] == "USD"

    # only the limit, thresholds or action change: the same counters continue
    first = await rule_json(config, "acme", "daily")
    assert first is not None
    code, out = await tokenguard(config, "limits", "set", "acme", "--rule", "daily", "--limit", "200000", "--window", "day",
                                 "--timezone", "Europe/Paris", "--user", "alice", "--action", "block")
    assert code == 0 and "200,000" in out, out
    second = await rule_json(config, "acme", "daily")
    assert second is not None and second["limit"] == 200_000 and second["action"] == "block"
    assert second["effective_from"] == first["effective_from"] and second["updated_at"] != first["updated_at"]
    # what it counts changes (the window): new counters, from a moment every reader has seen the rule
    code, out = await tokenguard(config, "limits", "set", "acme", "--rule", "daily", "--limit", "200000", "--window", "week",
                                 "--timezone", "Europe/Paris", "--user", "alice")
    assert code == 0, out
    third = await rule_json(config, "acme", "daily")
    assert third is not None and third["window"] == "week"
    assert datetime.fromisoformat(str(third["effective_from"])) > datetime.fromisoformat(str(first["effective_from"]))

    code, out = await tokenguard(config, "limits", "delete", "acme", "--rule", "daily")
    assert code == 0 and "deleted rule daily of acme" in out, out
    assert (await tokenguard(config, "limits", "delete", "--default", "--rule", "burst"))[0] == 0
    code, out = await tokenguard(config, "limits", "list")
    assert code == 0 and "daily" not in out and "burst" not in out and "acme rule monthly" in out, out
    code, out = await tokenguard(config, "limits", "get", "acme", "--rule", "daily")
    assert code == 1 and "no rule daily set for acme" in out, out
    code, out = await tokenguard(config, "limits", "get", "acme")  # the tenant limit is untouched
    assert code == 0 and "acme: 5,000 tokens" in out, out


BAD_RULES = [
    (("--timezone", "Mars/Olympus"), "--timezone: unknown time zone"),
    (("--rate", "60s", "--window", "day"), "--rate and --window"),
    (("--measure", "cost"), "--currency"),
    (("--threshold", "1.5"), "--threshold"),
    (("--rate", "0s"), "--rate"),
    (("--measure", "cost", "--currency", "USD", "--limit", "0.0000001"), "--limit"),
    (("--attribute", "team"), "--attribute"),
    (("--tokens", "5"), "--tokens"),
]


async def test_bad_rules_are_one_line_exit_2_and_write_nothing(aggregator_config: AggregatorConfig) -> None:
    config = aggregator_config
    assert (await tokenguard(config, "topics", "create"))[0] == 0

    async def attempt(flags: tuple[str, ...]) -> tuple[int, str]:
        limit = () if "--limit" in flags else ("--limit", "100")
        return await tokenguard(config, "limits", "set", "acme", "--rule", "daily", *limit, *flags)

    outcomes = await asyncio.gather(*(attempt(flags) for flags, _ in BAD_RULES))
    for (flags, named), (code, out) in zip(BAD_RULES, outcomes, strict=True):
        assert code == 2 and out.count("\n") == 1 and named in out and "Traceback" not in out, (flags, out)
    code, out = await tokenguard(config, "limits", "list", "--json")
    assert code == 0 and out == "", out
