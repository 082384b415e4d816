"""The pure parts of ``tokenguard limits ... --rule``: flags to a ``QuotaRule``, a rule to one line."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from click.testing import CliRunner
from pydantic import ValidationError

from aggregator.cli import EXIT_USAGE, UsageError, tokenguard
from aggregator.cli.limits import (
    kept_effective_from,
    new_effective_from,
    rate_seconds,
    rule_limit,
    rule_problem,
    selectors,
    show_rule,
)
from schemas.policy import QuotaRule

NOW = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


def rule(**fields: object) -> QuotaRule:
    return QuotaRule.model_validate({"name": "daily", "tenant_id": "acme", "limit": 1000, "window": "day",
                                     "effective_from": NOW, "updated_at": NOW, **fields})


def test_rate_durations() -> None:
    assert [rate_seconds(text) for text in ("60s", "5m", "1h", "24h")] == [60, 300, 3600, 86_400]
    for bad in ("0s", "25h", "1d", "5", "-1s", "1.5m"):
        with pytest.raises(UsageError, match="--rate"):
            rate_seconds(bad)


def test_limits_are_whole_numbers_or_exact_currency_micro_units() -> None:
    assert rule_limit("100000", "total_tokens") == 100_000
    assert rule_limit("12.5", "cost") == 12_500_000 and rule_limit("0.000001", "cost") == 1
    for text, measure in (("1.5", "requests"), ("many", "total_tokens"), ("1e-7", "cost"), ("-1", "cost")):
        with pytest.raises(UsageError, match="--limit"):
            rule_limit(text, measure)  # type: ignore[arg-type]


def test_user_and_agent_are_attribute_selectors() -> None:
    assert selectors(("team=search",), "alice", "planner") == {"team": "search", "user": "alice", "agent": "planner"}
    assert selectors(("user=alice",), "alice", None) == {"user": "alice"}
    with pytest.raises(UsageError, match="--user 'bob' contradicts --attribute user='alice'"):
        selectors(("user=alice",), "bob", None)
    with pytest.raises(UsageError, match="KEY=VALUE"):
        selectors(("team",), None, None)


def test_effective_from_is_kept_only_while_the_rule_counts_the_same() -> None:
    old = rule(thresholds=(0.5,))
    later = NOW + timedelta(days=3)
    changed_limit = rule(limit=5000, action="warn", thresholds=(0.8,), effective_from=later)
    assert kept_effective_from(changed_limit, old).effective_from == NOW
    assert kept_effective_from(changed_limit, old).limit == 5000
    for counts_otherwise in (rule(window="week", effective_from=later), rule(timezone="Europe/Paris", effective_from=later),
                             rule(attributes={"user": "alice"}, effective_from=later),
                             rule(measure="requests", effective_from=later)):
        assert kept_effective_from(counts_otherwise, old).effective_from == later
    assert kept_effective_from(changed_limit, None).effective_from == later
    assert new_effective_from(NOW) == NOW + timedelta(seconds=1)


def test_a_rule_is_one_printable_line() -> None:
    cost = rule(name="monthly", window="month", measure="cost", currency="USD", limit=12_500_000, model="gpt-4o",
                thresholds=(0.8, 0.5), tenant_id=None)
    assert show_rule(cost).startswith("(default) rule monthly: 12.50 USD cost per month (UTC), model=gpt-4o, "
                                      "warn at 50%, 80%, block, from 2026-11-30T12:00:00Z")
    hostile = QuotaRule.model_construct(**{**rule().__dict__, "attributes": {"team": "x\x1b[2J"}})
    line = show_rule(hostile)
    assert "\x1b" not in line and "\n" not in line and "team=x\\x1b[2J" in line


def test_validation_errors_name_the_flag() -> None:
    with pytest.raises(ValidationError) as caught:
        rule(thresholds=(0.5, 1.5), timezone="Nowhere/Else")
    message = rule_problem(caught.value)
    assert "--timezone: unknown time zone 'Nowhere/Else'" in message and "--threshold: Input should be less than 1" in message


@pytest.mark.parametrize("args", [
    ("acme", "--rule", "d", "--limit", "5", "--rate", "1m", "--timezone", "Europe/Paris"),
    ("acme", "--rule", "d", "--limit", "5", "--unknown-model", "refuse"),
    ("acme", "--rule", "d", "--limit", "5", "--input-weight", "2"),
    ("acme", "--rule", "d", "--limit", "5", "--currency", "USD"),
    ("acme", "--rule", "not a name", "--limit", "5"),
    ("acme", "--tokens", "5", "--window", "day"),
    ("acme", "--rule", "d"),
])
def test_bad_rule_flags_are_usage_errors_before_any_kafka_io(args: tuple[str, ...]) -> None:
    result = CliRunner().invoke(tokenguard, ["limits", "set", *args, "--bootstrap-servers", "127.0.0.1:1"])
    assert result.exit_code == EXIT_USAGE and "Kafka" not in result.output, result.output
