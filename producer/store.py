"""Where the middleware reads and records spend: the seed's store protocol and the backend behind it."""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, Protocol, TypeAlias, runtime_checkable

from schemas.usage import FIXED_FIELDS, USAGE_FIELDS, plain_class
from schemas.wire import UsageDraft

UsageCallback = Callable[[dict[str, Any]], Any]


class QuotaStore(Protocol):
    """The seed's storage protocol: implement it to keep totals in Redis, Postgres, ..."""

    def get_usage(self, user_id: str, period_key: str) -> int: ...

    def add_usage(self, user_id: str, period_key: str, tokens: int) -> None: ...


class InMemoryQuotaStore:
    """Totals in a dict, for one process and one event loop (no await between read and write)."""

    def __init__(self) -> None:
        self._totals: dict[tuple[str, str], int] = {}

    def get_usage(self, user_id: str, period_key: str) -> int:
        return self._totals.get((user_id, period_key), 0)

    def add_usage(self, user_id: str, period_key: str, tokens: int) -> None:
        key = (user_id, period_key)
        self._totals[key] = self._totals.get(key, 0) + int(tokens)


class Decision(NamedTuple):
    """Whether a call may go ahead, and the figures the alert payload reports.

    ``final`` means no further rule applies (a fail-open decision while the quota state is stale);
    ``reason`` names why a call was refused, in the alert payload's ``reason``.
    """

    allowed: bool
    used: int
    limit: int
    reason: str = "quota_exceeded_before_call"
    final: bool = False


LimitSource = Literal["notice", "limits_topic", "middleware_default"]
"""Where a governing limit came from: the aggregator's notice, the limits topic (the tenant's record
or the topic's default record), or the middleware's own ``quota_tokens``."""

HeadroomState = Literal["ok", "warning", "exceeded", "unavailable"]


@dataclass(frozen=True, slots=True)
class Headroom:
    """What a tenant may still spend in a period, as this process sees it now
    (``TokenGuardMiddleware.headroom``): for an agent to plan, e.g. to size ``max_tokens``.

    ``used`` counts this process's calls in flight (their reservations) as the decision does;
    ``remaining`` is ``max(0, limit - used)``. ``state``: ``exceeded`` when the next call would be
    refused for the quota, ``unavailable`` when it would be refused because the quota state is
    unknown (``fail_closed``), ``warning`` at or past the middleware's ``warning_ratio``, else
    ``ok``. ``source``: see ``LimitSource`` (None for a custom backend that does not say).
    ``retry_after_s``: seconds until the period key's window ends; None when unknown.
    ``rules``: every quota rule that matches such a call, each with its own used, limit,
    remaining and ``retry_after_s`` (a blocking rule without room makes ``state`` ``exceeded``).
    """

    tenant_id: str
    period_key: str
    period_kind: str | None
    used: int
    limit: int
    remaining: int
    state: HeadroomState
    source: LimitSource | None
    retry_after_s: float | None
    rules: tuple[RuleView, ...] = ()


# What a store adds to what the middleware read: the event's identity and origin, in ``draft_of``'s
# order. The fixed fields (the schema's version) fill themselves in; every other field of
# ``UsageEvent`` is the middleware's to fill in.
STORE_OWN: tuple[str, ...] = ("event_id", "instance_id", "attributes")
STORE_FIELDS: frozenset[str] = frozenset(STORE_OWN) | FIXED_FIELDS
CALL_FIELDS: tuple[str, ...] = tuple(name for name in USAGE_FIELDS if name not in STORE_FIELDS)
if STORE_FIELDS - set(USAGE_FIELDS):
    raise TypeError(f"not fields of UsageEvent: {sorted(STORE_FIELDS - set(USAGE_FIELDS))}")

_CALL_USAGE_DOC = """What one finished call spent, as the middleware read it from the provider's usage details.

``UsageEvent``'s fields less those a store adds (``STORE_FIELDS``), generated from the model
(``schemas.usage.plain_class``): keyword arguments, the model's defaults, nothing validated.
"""

if TYPE_CHECKING:
    from producer.rule_gate import RuleView

if TYPE_CHECKING:
    # Generated, so a type checker cannot know its fields; tests/unit/test_usage_type.py does.
    CallUsage: TypeAlias = Any
else:
    CallUsage = plain_class("CallUsage", CALL_FIELDS, module=__name__, doc=_CALL_USAGE_DOC, positional=False)

# A draft's positional arguments are the model's fields but the fixed ones, in the model's order:
# the store's own values followed by the call's, put in that order by one precomputed getter.
_DRAFT_ARGS = tuple(name for name in USAGE_FIELDS if name not in FIXED_FIELDS)
_call_values = operator.attrgetter(*CALL_FIELDS)
_in_draft_order = operator.itemgetter(*((*STORE_OWN, *CALL_FIELDS).index(name) for name in _DRAFT_ARGS))
_new_draft: Callable[..., UsageDraft] = UsageDraft


def draft_of(usage: CallUsage, event_id: str, instance_id: str, attributes: dict[str, str]) -> UsageDraft:
    """The usage event for ``usage`` plus a store's own fields, built as a ``UsageDraft``.

    On every call's path: two C-level getters and a positional constructor, no field named here.
    """
    return _new_draft(*_in_draft_order((event_id, instance_id, attributes, *_call_values(usage))))


@runtime_checkable
class QuotaBackend(Protocol):
    """What the middleware needs: a decision before the call and a place to record after it.

    ``KafkaQuotaStore`` implements it directly; a seed-style ``QuotaStore`` is adapted by
    ``StoreBackend``. Both methods are synchronous: they run on every call's hot path.
    """

    def check(self, tenant_id: str, period_key: str, quota_tokens: int) -> Decision: ...

    def record(self, usage: CallUsage) -> int:
        """Record the call; return the tenant's used tokens after it, as this process sees them."""
        ...


class StoreBackend:
    """Adapts a seed ``QuotaStore`` (get_usage/add_usage) to ``QuotaBackend``, with the seed's rule."""

    def __init__(self, store: QuotaStore) -> None:
        self.store = store

    def check(self, tenant_id: str, period_key: str, quota_tokens: int) -> Decision:
        used = self.store.get_usage(tenant_id, period_key)
        return Decision(allowed=used < quota_tokens, used=used, limit=quota_tokens)

    def peek(self, tenant_id: str, period_key: str, quota_tokens: int) -> Decision:
        """``check`` without side effects (for ``headroom``): the same here."""
        return self.check(tenant_id, period_key, quota_tokens)

    def source_of(self, tenant_id: str, period_key: str) -> LimitSource:
        """A seed store knows no limit but the middleware's ``quota_tokens``."""
        return "middleware_default"

    def record(self, usage: CallUsage) -> int:
        self.store.add_usage(usage.tenant_id, usage.period_key, usage.total_tokens)
        return self.store.get_usage(usage.tenant_id, usage.period_key)


def as_backend(store: QuotaStore | QuotaBackend) -> QuotaBackend:
    if isinstance(store, QuotaBackend):
        return store
    if callable(getattr(store, "get_usage", None)) and callable(getattr(store, "add_usage", None)):
        return StoreBackend(store)
    raise TypeError(f"quota_store must implement get_usage/add_usage or check/record, got {type(store).__name__}")
