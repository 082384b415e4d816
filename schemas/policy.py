"""Quota rules: any number per call, each its own counter, window, measure, limit and action.

A rule lives on the compacted limits topic beside the per-tenant limits (``schemas.limits``): key
``["rule", <tenant>, <name>]`` for one tenant's rule, ``["rule-default", <name>]`` for a rule that
applies to every tenant (each tenant counted apart). A tenant's rule overrides the default rule of
the same name, so "every tenant 100k a day, bigco 1M a day" is two records named ``daily``.

Every rule is counted exactly by the aggregator as a tenant-period of its own: its *counter key*
(``counter_key``) stands where a period key stands in the totals changelog, the notices and the
middleware's snapshot, so the exactness machinery (replay guard, dedup, changelog, corrections)
applies to rules unchanged. The key names the rule, a short hash of what it counts (``basis``:
changing a limit, the thresholds or the action keeps counting; changing the window, the measure
or a selector starts new counters) and the window. Pure: no I/O.
"""

from __future__ import annotations

import hashlib
import json
import sys
from datetime import datetime
from typing import Annotated, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from schemas._types import MAX_LIMIT_TOKENS, MAX_POLICY_KEY_BYTES, Identifier, Timestamp
from schemas.usage import AttributeKey, AttributeValue

RULE_SCHEMA_VERSION: Literal[1] = 1

Measure = Literal["total_tokens", "input_tokens", "output_tokens", "weighted_tokens", "cost", "requests"]
Window = Literal["hour", "day", "week", "month", "year", "rate"]
Action = Literal["block", "warn"]
UnknownModel = Literal["refuse", "default"]

RuleName = Annotated[str, Field(min_length=1, max_length=24, pattern=r"^[A-Za-z0-9_.-]+$")]
MAX_RATE_WINDOW_S = 24 * 3600
# Period keys of rule counters start with this; no period key of a call may (the middleware
# refuses one, the aggregator dead-letters an event carrying one), so none can feed a rule.
COUNTER_PREFIX = "rule:"


class QuotaRule(BaseModel):
    """One rule: which calls it counts (scope and selectors), how (measure), over what window, and
    what happens at its limit (``action``) and on the way there (``thresholds``)."""

    model_config = ConfigDict(frozen=True, strict=True, extra="ignore")

    schema_version: Literal[1] = RULE_SCHEMA_VERSION
    name: RuleName
    tenant_id: Identifier | None = Field(None, description="None: every tenant, each counted apart")
    model: Annotated[str, Field(min_length=1, max_length=256)] | None = Field(
        None, description="count only calls of this model (UsageEvent.model, exactly)")
    attributes: Annotated[dict[AttributeKey, AttributeValue], Field(max_length=8)] = Field(
        default_factory=dict, description="count only calls whose event attributes include all of these")
    measure: Measure = "total_tokens"
    input_weight: Annotated[float, Field(ge=0, le=1000)] = 1.0
    output_weight: Annotated[float, Field(ge=0, le=1000)] = 1.0
    currency: Annotated[str, Field(pattern=r"^[A-Z]{3}$")] | None = None
    unknown_model: UnknownModel = Field(
        "default", description="cost of a model without a price: 'default' prices it at model '*' (else 0, flagged); "
        "'refuse' also makes the middleware refuse calls it cannot price")
    window: Window = "month"
    window_seconds: Annotated[int, Field(ge=1, le=MAX_RATE_WINDOW_S)] | None = None
    timezone: Annotated[str, Field(min_length=1, max_length=64)] = "UTC"
    limit: Annotated[int, Field(ge=0, le=MAX_LIMIT_TOKENS)]
    thresholds: Annotated[tuple[Annotated[float, Field(gt=0.0, lt=1.0)], ...], Field(max_length=8)] = ()
    action: Action = "block"
    effective_from: Timestamp
    updated_at: Timestamp

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        # OSError: with the tzdata package installed, a name that is a folder of it ("America")
        # raises IsADirectoryError instead of ZoneInfoNotFoundError.
        except (ZoneInfoNotFoundError, ValueError, OSError):
            raise ValueError(f"unknown time zone {value!r} (an IANA name such as 'Europe/Paris')") from None
        return value

    @field_validator("input_weight", "output_weight")
    @classmethod
    def _milli(cls, value: float) -> float:
        if abs(round(value * 1000) - value * 1000) > 1e-6:
            raise ValueError("at most 3 decimal places")
        return value

    @field_validator("thresholds")
    @classmethod
    def _ascending(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        return tuple(sorted(set(value)))

    @model_validator(mode="after")
    def _consistent(self) -> QuotaRule:
        if (self.window == "rate") != (self.window_seconds is not None):
            raise ValueError("window 'rate' needs window_seconds, and only it takes them")
        if (self.measure == "cost") != (self.currency is not None):
            raise ValueError("measure 'cost' needs a currency, and only it takes one")
        return self

    @property
    def basis(self) -> str:
        """Six hex digits naming what this rule counts (not its limit, thresholds or action).
        Rules that count alike share one string (100,000 tenants' daily rules: one)."""
        counted = (
            self.measure, self.input_weight, self.output_weight, self.currency, self.unknown_model, self.window,
            self.window_seconds, self.timezone, self.model, tuple(sorted(self.attributes.items())),
            self.effective_from.timestamp(),
        )
        basis = _bases.get(counted)
        if basis is None:
            if len(_bases) >= 100_000:
                _bases.clear()
            digest = hashlib.sha256(json.dumps(counted).encode()).hexdigest()[:6]
            basis = _bases[counted] = sys.intern(digest)
        return basis


_bases: dict[tuple[object, ...], str] = {}


def rule_key(tenant_id: str | None, name: str) -> bytes:
    """The rule's record key on the limits topic."""
    parts = ["rule-default", name] if tenant_id is None else ["rule", tenant_id, name]
    return json.dumps(parts, separators=(",", ":"), ensure_ascii=False).encode()


def parse_rule_key(key: bytes | None) -> tuple[str | None, str] | None:
    """(tenant or None for a default rule, name) of a rule key; None for any other key. Never
    raises: a hostile key costs no more than its size (see ``schemas.rules.tenant_of_limit_key``)."""
    if not key or len(key) > MAX_POLICY_KEY_BYTES or not key.startswith(b'["rule'):
        return None
    try:
        parts = json.loads(key)
    except (ValueError, RecursionError):
        return None
    if not isinstance(parts, list) or not all(isinstance(part, str) for part in parts):
        return None
    if len(parts) == 2 and parts[0] == "rule-default":
        return None, parts[1]
    if len(parts) == 3 and parts[0] == "rule":
        return parts[1], parts[2]
    return None


def is_rule_key(key: bytes | None) -> bool:
    return key is not None and key.startswith(b'["rule')


def counter_key(name: str, basis: str, window_value: str) -> str:
    """The period key of a rule's counter: ``rule:<name>~<basis>:<window>`` (at most 56 characters)."""
    return f"{COUNTER_PREFIX}{name}~{basis}:{window_value}"


def parse_counter_key(period_key: str) -> tuple[str, str, str] | None:
    """(name, basis, window) of a rule counter's period key; None for any other period key."""
    if not period_key.startswith(COUNTER_PREFIX):
        return None
    head, sep, window_value = period_key[len(COUNTER_PREFIX):].partition(":")
    name, tilde, basis = head.partition("~")
    if not sep or not tilde or not name or len(basis) != 6:
        return None
    return name, basis, window_value


def effective(rule: QuotaRule, moment: datetime) -> bool:
    """Whether ``rule`` counts (and governs) a call made at ``moment``."""
    return moment >= rule.effective_from
