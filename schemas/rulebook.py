"""The rules as a reader of the limits topic keeps them: compact, matched and measured per call.

Both sides hold one ``RuleBook``: the middleware to decide a call from every rule that matches it,
the aggregator to count each event against every rule that matches it; the verifier and the
simulator recompute with the same code. A rule is kept as a ``CompiledRule`` (a slots object
sharing its window spec with every rule of the same window), not the validated model, so 100,000
tenants' rules fit in tens of megabytes. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Protocol

from schemas.policy import QuotaRule, counter_key
from schemas.prices import UNPRICED, PriceTable
from schemas.rules import PriceRecord, RuleRecord
from schemas.windows import WindowSpec


class Measured(Protocol):
    """What a measure reads of a call: a ``UsageEvent``, a ``UsageDraft`` or a ``CallUsage``."""

    @property
    def model(self) -> str | None: ...
    @property
    def input_tokens(self) -> int | None: ...
    @property
    def output_tokens(self) -> int | None: ...
    @property
    def total_tokens(self) -> int: ...
    @property
    def cache_read_input_tokens(self) -> int | None: ...
    @property
    def reasoning_output_tokens(self) -> int | None: ...


class CompiledRule:
    """A ``QuotaRule`` reduced to what matching, measuring and judging need."""

    __slots__ = (
        "_last",
        "attributes",
        "basis",
        "blocks",
        "currency",
        "effective_ts",
        "input_milli",
        "limit",
        "measure",
        "model",
        "name",
        "output_milli",
        "points",
        "tenant_id",
        "thresholds",
        "unknown_model",
        "window",
    )

    def __init__(self, rule: QuotaRule) -> None:
        self.name = rule.name
        self.tenant_id = rule.tenant_id
        self.basis = rule.basis
        self.model = rule.model
        self.attributes: tuple[tuple[str, str], ...] = tuple(sorted(rule.attributes.items()))
        self.measure = rule.measure
        weighted = rule.measure == "weighted_tokens"
        self.input_milli = round(rule.input_weight * 1000) if weighted else 0  # small ints are shared
        self.output_milli = round(rule.output_weight * 1000) if weighted else 0
        self.currency = rule.currency
        self.unknown_model = rule.unknown_model
        self.window = WindowSpec.of(rule.window, rule.window_seconds, rule.timezone)
        self.limit = rule.limit
        self.thresholds = rule.thresholds
        self.points = tuple(reached_at(self.limit, threshold) for threshold in rule.thresholds)
        self.blocks = rule.action == "block"
        self.effective_ts = rule.effective_from.timestamp()
        self._last: tuple[str, str] | None = None  # (window value, counter key) of the last call

    def __repr__(self) -> str:
        return f"CompiledRule({self.name!r}, tenant={self.tenant_id!r}, limit={self.limit}, basis={self.basis})"

    def matches(self, model: str | None, attributes: Mapping[str, str]) -> bool:
        """Whether a call of ``model`` with ``attributes`` is in this rule's scope (the tenant is
        matched by the book). A model selector does not match a call whose model is unknown."""
        if self.model is not None and model != self.model:
            return False
        return not self.attributes or all(attributes.get(key) == value for key, value in self.attributes)

    def counter(self, ts: float) -> tuple[str, float]:
        """(counter key, the window's end in epoch seconds) for a call at ``ts``."""
        value, end = self.window.at(ts)
        last = self._last
        if last is not None and last[0] == value:
            return last[1], end
        key = counter_key(self.name, self.basis, value)
        self._last = (value, key)
        return key, end

    def amount(self, usage: Measured, prices: PriceTable | None, when: datetime) -> int | None:
        """What ``usage`` adds to this rule's counter, an integer in the rule's unit (tokens,
        micro-units of its currency, or requests). None for a cost rule that cannot price the call
        and is told to refuse such calls (``unknown_model='refuse'``): the caller decides."""
        measure = self.measure
        if measure == "total_tokens":
            return usage.total_tokens
        if measure == "requests":
            return 1
        if measure == "input_tokens":
            return known_or_rest(usage.input_tokens, usage.output_tokens, usage.total_tokens)
        if measure == "output_tokens":
            return known_or_rest(usage.output_tokens, usage.input_tokens, usage.total_tokens)
        if measure == "weighted_tokens":
            if usage.input_tokens is None and usage.output_tokens is None:
                scaled = usage.total_tokens * max(self.input_milli, self.output_milli)
            else:
                scaled = (known_or_rest(usage.input_tokens, usage.output_tokens, usage.total_tokens) * self.input_milli
                          + known_or_rest(usage.output_tokens, usage.input_tokens, usage.total_tokens) * self.output_milli)
            return -(-scaled // 1000)
        return self._cost(usage, prices, when)

    def _cost(self, usage: Measured, prices: PriceTable | None, when: datetime) -> int | None:
        """Priced exactly as every other reader prices it (``PriceTable.cost``), at ``when``."""
        cost = prices.cost(
            usage.model, when, input_tokens=usage.input_tokens, output_tokens=usage.output_tokens,
            total_tokens=usage.total_tokens, cached_input_tokens=usage.cache_read_input_tokens,
            reasoning_tokens=usage.reasoning_output_tokens,
        ) if prices is not None else UNPRICED
        if cost.priced == "unpriced" or cost.currency != self.currency:
            return None if self.unknown_model == "refuse" else 0
        if cost.priced == "default" and self.unknown_model == "refuse":
            return None
        return cost.micros

    def level(self, used: int) -> int:
        """How many of the thresholds ``used`` has reached (for warnings once per threshold)."""
        points = self.points
        if not points:
            return 0
        return sum(1 for point in points if used >= point)


def known_or_rest(count: int | None, other: int | None, total: int) -> int:
    """A call's input (or output) tokens: as reported, else what the total leaves beside the
    other count (all of it when neither is reported: a rule on either kind never counts less
    than the call can have spent of it)."""
    if count is not None:
        return count
    return max(0, total - (other or 0))


def reached_at(limit: int, ratio: float) -> int:
    """The smallest used that reaches ``ratio`` of ``limit``, in integers: ``10 * 0.7`` is
    7.000000000000001 in floating point, and 7 of 10 must reach 70%. The ratio is taken to 6
    decimal places."""
    return -(-limit * round(ratio * 1_000_000) // 1_000_000)


class RuleBook:
    """Every rule on the limits topic: per tenant its own, plus the defaults. One event loop owns it."""

    def __init__(self, prices: PriceTable | None = None) -> None:
        self.prices = prices if prices is not None else PriceTable()
        self.per_tenant: dict[str, tuple[CompiledRule, ...]] = {}
        self.defaults: dict[str, CompiledRule] = {}

    def __len__(self) -> int:
        return sum(len(rules) for rules in self.per_tenant.values()) + len(self.defaults)

    def set(self, rule: QuotaRule) -> CompiledRule:
        compiled = CompiledRule(rule)
        if rule.tenant_id is None:
            self.defaults[rule.name] = compiled
        else:
            others = tuple(r for r in self.per_tenant.get(rule.tenant_id, ()) if r.name != rule.name)
            self.per_tenant[rule.tenant_id] = (*others, compiled)
        return compiled

    def take(self, change: RuleRecord | PriceRecord) -> None:
        """Apply one rule or price record of the limits topic (a tombstone deletes): what both
        sides' limits feeds do with them."""
        if isinstance(change, RuleRecord):
            if change.rule is None:
                self.delete(change.tenant_id, change.name)
            else:
                self.set(change.rule)
        elif change.price is None:
            self.prices.delete(change.model, change.effective_from)
        else:
            self.prices.set(change.price)

    def delete(self, tenant_id: str | None, name: str) -> None:
        if tenant_id is None:
            self.defaults.pop(name, None)
            return
        rules = tuple(r for r in self.per_tenant.get(tenant_id, ()) if r.name != name)
        if rules:
            self.per_tenant[tenant_id] = rules
        else:
            self.per_tenant.pop(tenant_id, None)

    def for_tenant(self, tenant_id: str) -> tuple[CompiledRule, ...]:
        """The tenant's own rules and the default rules it does not override by name."""
        own = self.per_tenant.get(tenant_id, ())
        defaults = self.defaults
        if not defaults:
            return own
        if not own:
            return tuple(defaults.values())
        names = {rule.name for rule in own}
        return own + tuple(rule for name, rule in defaults.items() if name not in names)

    def governing(self, tenant_id: str, name: str) -> CompiledRule | None:
        """The rule of that name that applies to ``tenant_id``: its own, else the default."""
        for rule in self.per_tenant.get(tenant_id, ()):
            if rule.name == name:
                return rule
        return self.defaults.get(name)

    def matching(self, tenant_id: str, model: str | None, attributes: Mapping[str, str], ts: float) -> list[CompiledRule]:
        """The rules that count a call of ``tenant_id`` at ``ts`` (epoch seconds). A tenant's rule
        overrides the default of its name only once it is in force (``effective_from``)."""
        own = [rule for rule in self.per_tenant.get(tenant_id, ()) if ts >= rule.effective_ts]
        defaults = self.defaults
        if defaults:
            names = {rule.name for rule in own}
            own += [rule for name, rule in defaults.items() if name not in names and ts >= rule.effective_ts]
        return [rule for rule in own if rule.matches(model, attributes)]

    def counted(self, tenant_id: str, usage: Measured, attributes: Mapping[str, str],
                when: datetime) -> list[tuple[CompiledRule, str, int]]:
        """(rule, counter key, amount) of every rule that counts ``usage``: what the aggregator adds
        and the middleware spends locally. A call a cost rule cannot price counts 0 there."""
        ts = when.timestamp()
        prices = self.prices
        return [(rule, rule.counter(ts)[0], rule.amount(usage, prices, when) or 0)
                for rule in self.matching(tenant_id, usage.model, attributes, ts)]

    def counters(self, tenant_id: str, usage: Measured, attributes: Mapping[str, str],
                 when: datetime) -> list[tuple[str, int]]:
        """(counter key, amount) of every rule that counts ``usage`` (``counted`` without the rule)."""
        return [(key, amount) for _, key, amount in self.counted(tenant_id, usage, attributes, when)]
