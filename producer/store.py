"""Where the middleware reads and records spend: the seed's store protocol and the backend behind it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple, Protocol, runtime_checkable

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


@dataclass(slots=True)
class CallUsage:
    """What one finished call spent, as the middleware read it from the provider's usage details."""

    tenant_id: str
    period_key: str
    model: str | None
    input_tokens: int | None
    output_tokens: int | None
    total_tokens: int
    cache_creation_input_tokens: int | None
    cache_read_input_tokens: int | None
    reasoning_output_tokens: int | None
    quota_tokens: int
    streaming: bool
    event_time: datetime
    estimated: bool = False


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

    def record(self, usage: CallUsage) -> int:
        self.store.add_usage(usage.tenant_id, usage.period_key, usage.total_tokens)
        return self.store.get_usage(usage.tenant_id, usage.period_key)


def as_backend(store: QuotaStore | QuotaBackend) -> QuotaBackend:
    if isinstance(store, QuotaBackend):
        return store
    if callable(getattr(store, "get_usage", None)) and callable(getattr(store, "add_usage", None)):
        return StoreBackend(store)
    raise TypeError(f"quota_store must implement get_usage/add_usage or check/record, got {type(store).__name__}")
