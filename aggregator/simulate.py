"""The policy simulator: replay the usage topic under a proposed rule set, and say who would have
been refused, when, and how much.

``Simulator`` is the pure core: fed the events a tenant made, in the order the fleet made them
(one tenant's events are in one partition, in offset order), it keeps one counter per (tenant,
rule, window), exactly as the aggregator counts (``RuleBook.matching``, ``CompiledRule.amount``
and ``counter``), and judges each call by the **simulated refusal rule**:

    a call is refused iff some blocking rule matching it has a counter >= its limit before the call
    (or is a cost rule that cannot price it and refuses such calls, as the live gate does)

so the call that crosses a limit is admitted, as the live fleet admits it. A refused call adds to
no counter (it would not have been made), and its tokens and its amount in each refusing rule's
unit go to that rule's refused figures. Warn rules never refuse; they record when their limit was
reached and what was spent past it.

This is not the live middleware's rule: that one refuses when ``used >= limit`` *or*
``used + in flight + this call's reservation > limit``, and the reservation (estimated input plus
reserved output) is not on the usage topic. The simulator therefore refuses at most what the live
fleet refuses at the limit itself, and never a call refused only because its estimate did not fit.

``simulate_topic`` is the thin reader: the usage topic from its start (events before ``since`` by
event time are read, deduplicated and skipped), records accepted by the verifier's own intake
(``Recompute``: ``aggregator.intake.accept``, one count per (tenant, event id)), prices from the
limits topic.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from aggregator.limits import load_policies
from aggregator.verify import Recompute
from schemas.policy import QuotaRule, parse_counter_key
from schemas.prices import PriceTable
from schemas.rulebook import CompiledRule, RuleBook
from schemas.topics import TopicLayout
from schemas.usage import UsageEvent
from transport.admin import topic_partitions
from transport.connection import KafkaConnection
from transport.reading import read_ranges


def unit_of(rule: CompiledRule) -> str:
    """What a rule's amounts are: ``tokens``, ``requests`` or ``micro-<currency>``."""
    if rule.measure == "cost":
        return f"micro-{rule.currency}"
    return "requests" if rule.measure == "requests" else "tokens"


@dataclass
class WindowOutcome:
    """One window of one rule for one tenant."""

    window: str
    used: int = 0  # what the admitted calls added, in the rule's unit
    reached_at: datetime | None = None  # event time of the call that brought ``used`` to the limit
    first_refused: datetime | None = None
    refused_calls: int = 0
    refused_tokens: int = 0
    refused_amount: int = 0
    over_calls: int = 0  # warn rules: calls made with the counter already at or over the limit
    over_amount: int = 0


@dataclass
class RuleOutcome:
    """What a rule did to one tenant over the simulated events."""

    tenant_id: str
    rule: str
    action: str
    measure: str
    unit: str
    limit: int
    calls: int = 0  # calls the rule matched (admitted or refused)
    windows: dict[str, WindowOutcome] = field(default_factory=dict)

    def _sum(self, name: str) -> int:
        return sum(getattr(window, name) for window in self.windows.values())

    @property
    def refused_calls(self) -> int:
        return self._sum("refused_calls")

    @property
    def refused_tokens(self) -> int:
        return self._sum("refused_tokens")

    @property
    def refused_amount(self) -> int:
        return self._sum("refused_amount")

    @property
    def over_calls(self) -> int:
        return self._sum("over_calls")

    @property
    def over_amount(self) -> int:
        return self._sum("over_amount")

    @property
    def first_refused(self) -> datetime | None:
        return min((w.first_refused for w in self.windows.values() if w.first_refused), default=None)

    @property
    def reached_at(self) -> datetime | None:
        return min((w.reached_at for w in self.windows.values() if w.reached_at), default=None)

    @property
    def affected(self) -> list[WindowOutcome]:
        """The windows with a refusal (block) or where the limit was reached (warn)."""
        return [w for w in self.windows.values() if w.refused_calls or (self.action == "warn" and w.reached_at)]

    @property
    def peak(self) -> WindowOutcome | None:
        """The window with the most admitted use."""
        return max(self.windows.values(), key=lambda w: w.used, default=None)

    def as_json(self) -> dict[str, Any]:
        def when(value: datetime | None) -> str | None:
            return value.isoformat() if value is not None else None

        peak = self.peak
        return {
            "tenant_id": self.tenant_id, "rule": self.rule, "action": self.action, "measure": self.measure,
            "unit": self.unit, "limit": self.limit, "calls": self.calls,
            "first_refused": when(self.first_refused), "reached_at": when(self.reached_at),
            "refused_calls": self.refused_calls, "refused_tokens": self.refused_tokens,
            "refused_amount": self.refused_amount, "over_calls": self.over_calls, "over_amount": self.over_amount,
            "peak_window": peak.window if peak else None, "peak_used": peak.used if peak else 0,
            "windows": [
                {"window": w.window, "used": w.used, "reached_at": when(w.reached_at),
                 "first_refused": when(w.first_refused), "refused_calls": w.refused_calls,
                 "refused_tokens": w.refused_tokens, "refused_amount": w.refused_amount,
                 "over_calls": w.over_calls, "over_amount": w.over_amount}
                for w in self.affected
            ],
        }


@dataclass
class SimulationReport:
    """Per (tenant, rule) outcomes, and the totals over distinct calls."""

    outcomes: list[RuleOutcome]
    events: int = 0  # events simulated (accepted, not repeats, at or after ``since``)
    refused_calls: int = 0  # distinct calls refused (one call refused by two rules counts once)
    refused_tokens: int = 0
    refused_cost: dict[str, int] = field(default_factory=dict)  # currency -> micro-units, priced as billing does
    before_since: int = 0
    records: int = 0
    duplicates: int = 0
    invalid: dict[str, int] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {
            "rules": [outcome.as_json() for outcome in self.outcomes],
            "totals": {
                "events": self.events, "refused_calls": self.refused_calls, "refused_tokens": self.refused_tokens,
                "refused_cost_micros": dict(sorted(self.refused_cost.items())), "before_since": self.before_since,
                "records": self.records, "duplicates": self.duplicates, "invalid": dict(sorted(self.invalid.items())),
            },
        }


class Simulator:
    """Judges events under ``rules`` by the simulated refusal rule (see the module docstring)."""

    def __init__(self, rules: Iterable[QuotaRule], prices: PriceTable | None = None, *,
                 since: datetime | None = None) -> None:
        self.book = RuleBook(prices)
        for rule in rules:
            self.book.set(rule)
        self.since = since
        self._counters: dict[tuple[str, str], int] = {}  # (tenant, counter key) -> admitted amount
        self._outcomes: dict[tuple[str, str], RuleOutcome] = {}
        self.report = SimulationReport(outcomes=[])

    def add(self, event: UsageEvent) -> bool:
        """Judge one call; True when admitted (and counted), False when refused or before ``since``."""
        if self.since is not None and event.event_time < self.since:
            self.report.before_since += 1
            return False
        self.report.events += 1
        when = event.event_time
        ts = when.timestamp()
        tenant = event.tenant_id
        judged = []
        refusing = []
        for rule in self.book.matching(tenant, event.model, event.attributes, ts):
            key = rule.counter(ts)[0]
            amount = rule.amount(event, self.book.prices, when)
            used = self._counters.get((tenant, key), 0)
            window = self._window(tenant, rule, key)
            judged.append((rule, key, amount or 0, used, window))
            if rule.blocks and (amount is None or used >= rule.limit):
                refusing.append((amount or 0, window))
        if refusing:
            for amount, window in refusing:
                window.refused_calls += 1
                window.refused_tokens += event.total_tokens
                window.refused_amount += amount
                if window.first_refused is None:
                    window.first_refused = when
            self._refused(event)
            return False
        for rule, key, amount, used, window in judged:
            after = used + amount
            self._counters[(tenant, key)] = after
            window.used = after
            if not rule.blocks and used >= rule.limit:
                window.over_calls += 1
                window.over_amount += amount
            if window.reached_at is None and after >= rule.limit:
                window.reached_at = when
        return True

    def result(self) -> SimulationReport:
        """The report so far, outcomes ordered by tenant then rule."""
        self.report.outcomes = [self._outcomes[key] for key in sorted(self._outcomes)]
        return self.report

    def _window(self, tenant: str, rule: CompiledRule, key: str) -> WindowOutcome:
        outcome = self._outcomes.get((tenant, rule.name))
        if outcome is None:
            action = "block" if rule.blocks else "warn"
            outcome = self._outcomes[(tenant, rule.name)] = RuleOutcome(
                tenant, rule.name, action, rule.measure, unit_of(rule), rule.limit)
        outcome.calls += 1
        parsed = parse_counter_key(key)
        window_value = parsed[2] if parsed else key
        window = outcome.windows.get(window_value)
        if window is None:
            window = outcome.windows[window_value] = WindowOutcome(window_value)
        return window

    def _refused(self, event: UsageEvent) -> None:
        report = self.report
        report.refused_calls += 1
        report.refused_tokens += event.total_tokens
        cost = self.book.prices.cost_of(event)
        if cost.currency is not None:
            report.refused_cost[cost.currency] = report.refused_cost.get(cost.currency, 0) + cost.micros


async def simulate_topic(connection: KafkaConnection, layout: TopicLayout, rules: Iterable[QuotaRule], *,
                         since: datetime | None = None, prices: PriceTable | None = None) -> SimulationReport:
    """Replay the whole usage topic (as it is when reading starts) under ``rules``; prices: the
    limits topic's (``load_policies``) unless given."""
    partitions = await topic_partitions(connection, layout.usage)
    if prices is None:
        prices = (await load_policies(connection, layout.limits)).rules.prices
    simulator = Simulator(rules, prices, since=since)
    intake = Recompute(len(partitions))
    ranges = {p: (None, None) for p in partitions}
    async for records in read_ranges(connection, layout.usage, ranges, on_unreadable=intake.unreadable):
        for record in records:  # one partition's records in offset order: a tenant's calls in order
            event = intake.add(record)
            if event is not None:
                simulator.add(event)
    report = simulator.result()
    report.records, report.duplicates, report.invalid = intake.records, intake.duplicates, dict(intake.invalid)
    return report


__all__ = ["RuleOutcome", "SimulationReport", "Simulator", "WindowOutcome", "simulate_topic", "unit_of"]
