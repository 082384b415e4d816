"""The quota rules at the call: every rule that matches a call must have room for it.

A rule's counter is a tenant-period of the snapshot keyed by the rule's counter key
(``schemas.policy.counter_key``): the aggregator's notice of it, if any, plus this process's own
spend that the notice does not cover yet, exactly as for the middleware's period key. On top, the
calls of this process in flight hold reservations in each rule's measure, so concurrent calls
cannot all pass one check; and a call is refused when its own reservation does not fit:
``used + in flight + this call's reservation > limit``. Warn-only rules never refuse. Pure (one
event loop owns it); the store feeds it the rules and the snapshot.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from datetime import datetime
from typing import NamedTuple

from producer.inflight import InFlight, Reservation
from producer.snapshot import QuotaSnapshot
from schemas.rulebook import CompiledRule, Measured, RuleBook
from schemas.windows import rate_window_end

# How long a rate window's counter stays in the snapshot after the window ended.
KEEP_ENDED_S = 60.0


@dataclass(frozen=True, slots=True)
class RuleView:
    """One rule as a call sees it now: for refusals, warnings and ``headroom``."""

    name: str
    counter: str
    measure: str
    used: int
    limit: int
    remaining: int
    retry_after_s: float
    blocks: bool
    level: int

    def as_dict(self) -> dict[str, object]:
        return {
            "rule": self.name, "window": self.counter, "measure": self.measure, "used": self.used,
            "limit": self.limit, "remaining": self.remaining, "retry_after_s": round(self.retry_after_s, 3),
            "action": "block" if self.blocks else "warn",
        }


class Reserve(NamedTuple):
    """A call before it is made, as the rules measure it: its estimated input and reserved output."""

    model: str | None
    input_tokens: int
    output_tokens: int
    total_tokens: int
    cache_read_input_tokens: int | None = None
    reasoning_output_tokens: int | None = None


class Verdict(NamedTuple):
    """``refused``: the blocking rules without room (empty when allowed); ``views``: every rule
    that matched; ``holds``: the reservations taken when allowed."""

    allowed: bool
    refused: tuple[RuleView, ...]
    holds: tuple[Reservation, ...]
    views: tuple[RuleView, ...] = ()
    reason: str = "rule_exceeded"


ALLOWED = Verdict(True, (), ())


class RuleGate:
    """Judges calls against a ``RuleBook`` using a ``QuotaSnapshot``'s counters."""

    def __init__(self, book: RuleBook, snapshot: QuotaSnapshot) -> None:
        self.book = book
        self.snapshot = snapshot
        self._in_flight = InFlight()
        self._ends: list[tuple[float, str, str]] = []  # (window end, tenant, counter): min-heap
        self._tracked: set[tuple[str, str]] = set()

    def applies(self, tenant_id: str) -> bool:
        """Whether any rule can match a call of ``tenant_id`` (cheap: the hot path asks first)."""
        return bool(self.book.defaults) or tenant_id in self.book.per_tenant

    def _used(self, rule: CompiledRule, tenant_id: str, now: float) -> tuple[str, float, int]:
        """(counter key, window end, used): the notice, this process's spend since, and its calls
        in flight; a notice that the counter is exceeded at this very limit counts as the limit."""
        counter, end = rule.counter(now)
        snapshot = self.snapshot
        used = snapshot.used(tenant_id, counter) + self._in_flight.tokens((tenant_id, counter))
        notice = snapshot.notice(tenant_id, counter)
        if notice is not None:
            self._track(tenant_id, counter)  # known from a notice only: expired like our own
            if notice.state == "exceeded" and notice.limit_tokens == rule.limit and used < rule.limit:
                used = rule.limit
        return counter, end, used

    def view(self, rule: CompiledRule, tenant_id: str, now: float, own: int = 0) -> RuleView:
        counter, end, used = self._used(rule, tenant_id, now)
        return RuleView(
            name=rule.name, counter=counter, measure=rule.measure, used=used, limit=rule.limit,
            remaining=max(0, rule.limit - used - own), retry_after_s=max(0.0, end - now), blocks=rule.blocks,
            level=rule.level(used),
        )

    def admit(self, tenant_id: str, reserve: Reserve, attributes: dict[str, str], now: datetime, *,
              views: bool = False) -> Verdict:
        """Whether every blocking rule matching the call has room for its reservation; if so, the
        reservations are held (``release`` them when the call ends). ``views``: report every
        matching rule's view in the verdict (for clamping), not only the refusing ones'."""
        ts = now.timestamp()
        rules = self.book.matching(tenant_id, reserve.model, attributes, ts)
        if not rules:
            return ALLOWED
        self._expire(ts)
        refused: list[RuleView] = []
        unpriced: list[RuleView] = []
        wanted = []
        prices = self.book.prices
        for rule in rules:
            own = rule.amount(reserve, prices, now)
            if own is None:  # a cost rule that cannot price this call, and refuses such calls
                if rule.blocks:
                    unpriced.append(self.view(rule, tenant_id, ts))
                own = 0
                counter = rule.counter(ts)[0]
            else:
                counter, _, used = self._used(rule, tenant_id, ts)
                if rule.blocks and (used >= rule.limit or used + own > rule.limit):
                    refused.append(self.view(rule, tenant_id, ts, own))
            wanted.append(((tenant_id, counter), own))
        seen = tuple(self.view(rule, tenant_id, ts) for rule in rules) if views or refused or unpriced else ()
        if refused:
            return Verdict(False, tuple(refused), (), seen)
        if unpriced:
            return Verdict(False, tuple(unpriced), (), seen, "unpriced_model")
        return Verdict(True, (), tuple(self._in_flight.reserve(key, own) for key, own in wanted), seen)

    def release(self, holds: tuple[Reservation, ...]) -> None:
        for hold in holds:
            self._in_flight.release(hold)

    def spend(self, tenant_id: str, usage: Measured, attributes: dict[str, str],
              when: datetime) -> tuple[list[tuple[str, int]], list[RuleView]]:
        """Count a finished call locally in every rule it matches (as the aggregator will count
        it). Returns (counter, amount) of each, for the acknowledgement, and the rules whose
        thresholds (or limit) this call crossed, for warnings."""
        ts = when.timestamp()
        spent: list[tuple[str, int]] = []
        crossed: list[RuleView] = []
        snapshot = self.snapshot
        for rule in self.book.matching(tenant_id, usage.model, attributes, ts):
            amount = rule.amount(usage, self.book.prices, when) or 0
            counter, _ = rule.counter(ts)
            before = snapshot.used(tenant_id, counter)
            snapshot.add_local(tenant_id, counter, amount)
            if rule.window.kind == "rate":
                self._track(tenant_id, counter)
            spent.append((counter, amount))
            after = before + amount
            if (rule.points and rule.level(after) > rule.level(before)) or before < rule.limit <= after:
                crossed.append(self.view(rule, tenant_id, ts))
        return spent, crossed

    def views(self, tenant_id: str, model: str | None, attributes: dict[str, str], now: datetime) -> list[RuleView]:
        """Every rule matching a call of ``model`` now, as it stands (for ``headroom``)."""
        ts = now.timestamp()
        return [self.view(rule, tenant_id, ts) for rule in self.book.matching(tenant_id, model, attributes, ts)]

    def _track(self, tenant_id: str, counter: str) -> None:
        key = (tenant_id, counter)
        if key in self._tracked:
            return
        end = rate_window_end(counter.rpartition(":")[2])
        if end is not None:
            self._tracked.add(key)
            heapq.heappush(self._ends, (end, tenant_id, counter))

    def _expire(self, now: float) -> None:
        """Drop the snapshot's counters of rate windows that ended over ``KEEP_ENDED_S`` ago."""
        ends = self._ends
        while ends and ends[0][0] + KEEP_ENDED_S < now:
            _, tenant_id, counter = heapq.heappop(ends)
            self._tracked.discard((tenant_id, counter))
            self.snapshot.drop(tenant_id, counter)
