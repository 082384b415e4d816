"""The policy simulator's core and its rules file, without a broker: every figure computed by hand."""

from __future__ import annotations

import itertools
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from aggregator.cli.simulate import report_lines
from aggregator.rulefile import BEGINNING, RuleFileError, load_rules, parse_rules, yaml_available
from aggregator.simulate import Simulator
from schemas.policy import QuotaRule
from schemas.prices import ModelPrice, PriceTable

DAY1 = datetime(2026, 11, 3, 9, 0, tzinfo=UTC)
DAY2 = datetime(2026, 11, 4, 9, 0, tzinfo=UTC)
_ids = itertools.count()


def event(tenant: str, tokens: int, when: datetime, *, model: str = "gpt-x", input_tokens: int | None = None,
          attributes: dict[str, str] | None = None) -> Any:
    from schemas.usage import UsageEvent

    inp = tokens // 3 if input_tokens is None else input_tokens
    return UsageEvent(event_id=f"sim{next(_ids):012d}", tenant_id=tenant, period_key="2026-11", model=model,
                      total_tokens=tokens, input_tokens=inp, output_tokens=tokens - inp, quota_tokens=10**12,
                      event_time=when, instance_id="test", attributes=attributes or {})


def rules(*objects: dict[str, Any]) -> list[QuotaRule]:
    return parse_rules(json.dumps(list(objects)))


def minutes(start: datetime, count: int) -> list[datetime]:
    return [start + timedelta(minutes=i) for i in range(count)]


# -- the refusal rule ---------------------------------------------------------------------------


def test_the_call_that_crosses_is_admitted_and_the_next_refused() -> None:
    sim = Simulator(rules({"name": "daily", "tenant_id": "acme", "window": "day", "limit": 1000}))
    times = minutes(DAY1, 6)
    admitted = [sim.add(event("acme", 300, when)) for when in times]
    assert admitted == [True, True, True, True, False, False]  # 300, 600, 900, 1200 (crosses), refused x2
    report = sim.result()
    [outcome] = report.outcomes
    assert (outcome.tenant_id, outcome.rule, outcome.action, outcome.calls) == ("acme", "daily", "block", 6)
    assert (outcome.refused_calls, outcome.refused_tokens, outcome.refused_amount) == (2, 600, 600)
    assert outcome.first_refused == times[4] and outcome.reached_at == times[3]
    assert [w.window for w in outcome.affected] == ["2026-11-03"] and outcome.peak and outcome.peak.used == 1200
    assert (report.events, report.refused_calls, report.refused_tokens, report.refused_cost) == (6, 2, 600, {})


def test_each_window_starts_again_and_only_windows_with_refusals_are_affected() -> None:
    sim = Simulator(rules({"name": "daily", "window": "day", "limit": 1000}))  # a default rule
    day1, day2 = minutes(DAY1, 5), minutes(DAY2, 3)
    assert [sim.add(event("acme", 300, w)) for w in day1] == [True] * 4 + [False]
    assert [sim.add(event("acme", 300, w)) for w in day2] == [True] * 3  # 900 on day 2: under the limit
    assert sim.add(event("bigco", 300, DAY1)) is True  # every tenant counted apart
    acme, bigco = sim.result().outcomes
    assert [(w.window, w.used, w.refused_calls) for w in acme.windows.values()] == [
        ("2026-11-03", 1200, 1), ("2026-11-04", 900, 0)]
    assert [w.window for w in acme.affected] == ["2026-11-03"] and acme.first_refused == day1[4]
    assert (bigco.tenant_id, bigco.refused_calls, bigco.peak and bigco.peak.used) == ("bigco", 0, 300)


def test_a_rate_window_given_as_shorthand() -> None:
    start = datetime(2026, 11, 3, 9, 0, 0, tzinfo=UTC)  # a multiple of 60 s since the epoch
    sim = Simulator(rules({"name": "burst", "rate": "60s", "limit": 500}))
    times = [start + timedelta(seconds=s) for s in (0, 10, 20, 59, 60, 70)]
    assert [sim.add(event("acme", 300, w)) for w in times] == [True, True, False, False, True, True]
    [outcome] = sim.result().outcomes
    assert (outcome.refused_calls, outcome.refused_tokens, len(outcome.affected)) == (2, 600, 1)
    assert outcome.affected[0].window == f"60s@{int(start.timestamp())}"


def test_a_warn_rule_never_refuses_and_says_when_it_was_reached() -> None:
    sim = Simulator(rules({"name": "soft", "window": "day", "limit": 500, "action": "warn"}))
    times = minutes(DAY1, 3)
    assert [sim.add(event("acme", 300, w)) for w in times] == [True, True, True]
    report = sim.result()
    [outcome] = report.outcomes
    assert (outcome.action, outcome.refused_calls, outcome.reached_at) == ("warn", 0, times[1])  # 600 >= 500
    assert (outcome.over_calls, outcome.over_amount) == (1, 300)  # the third call, made at 600
    assert report.refused_calls == 0 and len(outcome.affected) == 1


def _prices() -> PriceTable:
    table = PriceTable()
    table.set(ModelPrice(model="gpt-x", currency="USD", input_per_mtok=2_000_000, output_per_mtok=10_000_000,
                         effective_from=BEGINNING, updated_at=BEGINNING))
    return table


def test_a_cost_rule_counts_the_price_table_and_reports_refused_cost() -> None:
    sim = Simulator(rules({"name": "spend", "measure": "cost", "currency": "USD", "window": "month",
                           "limit_currency": "1.00"}), _prices())
    # 100,000 input at $2/M + 50,000 output at $10/M = $0.20 + $0.50 = $0.70 = 700,000 micros a call
    times = minutes(DAY1, 3)
    assert [sim.add(event("acme", 150_000, w, input_tokens=100_000)) for w in times] == [True, True, False]
    report = sim.result()
    [outcome] = report.outcomes
    assert (outcome.unit, outcome.limit, outcome.peak and outcome.peak.used) == ("micro-USD", 1_000_000, 1_400_000)
    assert (outcome.refused_calls, outcome.refused_tokens, outcome.refused_amount) == (1, 150_000, 700_000)
    assert report.refused_cost == {"USD": 700_000}
    assert "USD 0.70" in report_lines(report)[1] and "cost refused USD 0.70" in report_lines(report)[-1]


def test_a_cost_rule_that_refuses_unknown_models_refuses_an_unpriced_call() -> None:
    sim = Simulator(rules({"name": "spend", "measure": "cost", "currency": "USD", "limit": 10**9,
                           "unknown_model": "refuse"}), _prices())
    assert sim.add(event("acme", 100, DAY1, model="mystery")) is False
    assert sim.add(event("acme", 100, DAY1, model="gpt-x")) is True
    [outcome] = sim.result().outcomes
    assert (outcome.refused_calls, outcome.refused_tokens, outcome.refused_amount) == (1, 100, 0)


def test_a_refused_call_adds_to_no_counter() -> None:
    sim = Simulator(rules(
        {"name": "daily", "window": "day", "limit": 1000},
        {"name": "calls", "measure": "requests", "window": "day", "limit": 100, "action": "warn"},
        {"name": "mini", "model": "gpt-mini", "window": "day", "limit": 10},  # matches no call here
    ))
    for when in minutes(DAY1, 6):
        sim.add(event("acme", 300, when))
    calls, daily = sim.result().outcomes
    assert (calls.rule, calls.calls, calls.peak and calls.peak.used) == ("calls", 6, 4)  # 2 refused: not counted
    assert (daily.peak and daily.peak.used, daily.refused_calls) == (1200, 2)


def test_one_call_refused_by_two_rules_counts_once_in_the_totals() -> None:
    sim = Simulator(rules({"name": "a", "window": "day", "limit": 100}, {"name": "b", "window": "month", "limit": 100}))
    assert [sim.add(event("acme", 150, w)) for w in minutes(DAY1, 2)] == [True, False]
    report = sim.result()
    assert [(o.rule, o.refused_calls, o.refused_tokens) for o in report.outcomes] == [("a", 1, 150), ("b", 1, 150)]
    assert (report.refused_calls, report.refused_tokens) == (1, 150)


def test_since_skips_earlier_events_and_selectors_and_effective_from_apply() -> None:
    sim = Simulator(rules({"name": "eu", "attributes": {"region": "eu"}, "window": "day", "limit": 0,
                           "effective_from": "2026-11-03T09:02:00"}), since=DAY1 + timedelta(minutes=1))
    times = minutes(DAY1, 4)
    judged = [sim.add(event("acme", 10, w, attributes={"region": "eu"})) for w in times]
    assert judged == [False, True, False, False]  # before --since; before effective_from; limit 0 refuses
    assert sim.add(event("acme", 10, times[3], attributes={"region": "us"})) is True
    report = sim.result()
    assert (report.before_since, report.events, report.refused_calls) == (1, 4, 2)


# -- the rules file -----------------------------------------------------------------------------


def test_rule_file_conveniences() -> None:
    now = datetime(2026, 11, 1, tzinfo=UTC)
    burst, spend = parse_rules(json.dumps({"rules": [
        {"name": "burst", "tenant_id": "acme", "rate": "5m", "limit": 20000},
        {"name": "spend", "measure": "cost", "currency": "EUR", "limit_currency": "12.50", "thresholds": [0.8]},
    ]}), now=now)
    assert (burst.window, burst.window_seconds, burst.effective_from, burst.updated_at) == ("rate", 300, BEGINNING, now)
    assert (spend.limit, spend.tenant_id, spend.thresholds, spend.window) == (12_500_000, None, (0.8,), "month")


@pytest.mark.parametrize(("rule", "message"), [
    ({"name": "x", "limt": 5}, "rule 0 ('x'): limt: unknown field"),
    ({"name": "x"}, "rule 0 ('x'): limit: Field required"),
    ({"name": "x", "limit": -1}, "rule 0 ('x'): limit: Input should be greater than or equal to 0"),
    ({"name": "x", "limit": 5, "rate": "5 minutes"}, "rule 0 ('x'): rate: '5 minutes' is not a window length"),
    ({"name": "x", "limit": 5, "rate": "5m", "window": "day"}, "rule 0 ('x'): rate: give either rate or window"),
    ({"name": "x", "measure": "cost", "currency": "USD", "limit_currency": "0.0000001"}, "more than 6 decimal places"),
    ({"name": "x", "limit_currency": "1"}, "limit_currency: only a rule with measure 'cost'"),
    ({"name": "x", "limit": 5, "effective_from": "yesterday"}, "effective_from: 'yesterday' is not an ISO 8601 time"),
    ({"name": "x", "limit": 5, "window": "rate"}, "rule 0 ('x'): rule: window 'rate' needs window_seconds"),
    ({"name": "x", "limit": 5, "timezone": "Mars/Olympus"}, "timezone: unknown time zone"),
    ("daily", "rule 0: expected an object, got str"),
])
def test_a_bad_rule_is_one_line_naming_it_and_the_field(rule: object, message: str) -> None:
    with pytest.raises(RuleFileError) as caught:
        parse_rules(json.dumps([rule]), source="r.json")
    text = str(caught.value)
    assert message in text and text.startswith("r.json: ") and "\n" not in text, text
    assert isinstance(caught.value, ValueError)


def test_a_bad_file_is_one_line_too(tmp_path: Path) -> None:
    for content, message in [("{", "not valid JSON"), ('{"x": []}', "expected a list of rules"),
                             ('[{"name": "d", "limit": 1}, {"name": "d", "limit": 2}]', "a second rule named 'd'")]:
        path = tmp_path / "rules.json"
        path.write_text(content)
        with pytest.raises(RuleFileError, match=message):
            load_rules(path)
    with pytest.raises(RuleFileError, match="cannot read rules file"):
        load_rules(tmp_path / "missing.json")


@pytest.mark.skipif(not yaml_available(), reason="PyYAML is not installed: JSON only")
def test_a_yaml_file(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text("rules:\n  - name: daily\n    tenant_id: acme\n    window: day\n    limit: 1000\n"
                    "    effective_from: 2026-11-01\n  - {name: burst, rate: 1m, limit: 50}\n")
    daily, burst = load_rules(path)
    assert (daily.limit, daily.effective_from, burst.window_seconds) == (1000, datetime(2026, 11, 1, tzinfo=UTC), 60)
    path.write_text("- name: [unclosed\n")
    with pytest.raises(RuleFileError, match="not valid YAML"):
        load_rules(path)
