"""Which limit applies to a tenant-period: the one precedence rule the middleware and the aggregator share.

The limits topic holds at most one record per tenant and one default record (``QuotaLimit``). For a
tenant-period, the tenant's own record applies when its period kind is ``any`` or the kind of the
period key (``schemas.periods.period_kind``); else the default record, by the same test; else
none, and the caller's own fallback applies (the aggregator's configured default, then the
smallest quota its events carried; the middleware's ``quota_tokens``).

Also here, since both sides read the topic: what one limits record says (``read_limit_record``),
refusing anything that is not a limit of ours. Pure: no I/O.
"""

from __future__ import annotations

import json
from typing import NamedTuple, Protocol, TypeVar

from schemas.errors import DecodeError
from schemas.limits import QuotaLimit
from schemas.periods import period_kind
from schemas.wire import decode_limit

# A limits key is ["default"] or ["tenant", <id of at most 256 characters>]: JSON of this size is
# far more than any such key takes, and bounds what parsing a hostile key can cost.
MAX_LIMIT_KEY_BYTES = 4096


class PeriodScoped(Protocol):
    """Anything that says for which period kind it holds: a ``QuotaLimit``, a ``TenantLimit``."""

    @property
    def period(self) -> str: ...


R = TypeVar("R", bound=PeriodScoped)


def applies(record: PeriodScoped, kind: str | None) -> bool:
    """Whether ``record`` holds for a period key of ``kind`` (None: a custom key, only ``any`` holds)."""
    return record.period == "any" or record.period == kind


def applicable(own: R | None, default: R | None, period_key: str, *, kind: str | None = None) -> R | None:
    """The record that governs ``period_key``: the tenant's ``own``, else the topic's ``default``,
    each only if its period kind matches; None when neither does. ``kind`` may be passed when the
    caller has already computed ``period_kind(period_key)``."""
    if own is None and default is None:
        return None
    if kind is None:
        kind = period_kind(period_key)
    if own is not None and applies(own, kind):
        return own
    if default is not None and applies(default, kind):
        return default
    return None


class TenantLimit(NamedTuple):
    """A ``QuotaLimit`` as a reader that holds one per tenant keeps it: what the decision needs, no
    more. A tuple of three takes about 200 bytes with its tenant's dict entry; the validated
    model, with its timestamp, about 1 kB (100,000 tenants: ~20 MB against ~117 MB)."""

    limit_tokens: int
    period: str
    warning_ratio: float | None = None

    @classmethod
    def of(cls, limit: QuotaLimit) -> TenantLimit:
        return cls(limit.limit_tokens, limit.period, limit.warning_ratio)


def tenant_of_limit_key(key: bytes | None) -> tuple[bool, str | None]:
    """(valid, tenant id or None for the default) from a limits record key.

    Never raises: a key of deeply nested JSON (``[[[[...]]]]``) would make ``json.loads`` raise
    ``RecursionError``, which once killed the limits follower; it is refused by its size or its
    first bytes before it is parsed, and by the except clause if it still gets there.
    """
    if not key or len(key) > MAX_LIMIT_KEY_BYTES or not key.startswith(b'["'):
        return False, None
    try:
        parts = json.loads(key)
    except (ValueError, RecursionError):
        return False, None
    if parts == ["default"]:
        return True, None
    if isinstance(parts, list) and len(parts) == 2 and parts[0] == "tenant" and isinstance(parts[1], str):
        return True, parts[1]
    return False, None


def read_limit_record(key: bytes | None, value: bytes | None) -> tuple[str | None, QuotaLimit | None]:
    """(tenant id or None for the default, the limit or None for a tombstone) of one limits record.

    ``DecodeError`` (``reason`` and ``detail`` fit for a log line) for a record that is not a limit:
    a key that is not ours (``invalid_key``), a value that does not decode, or a key naming one
    tenant and a value another (``key_value_mismatch``)."""
    valid, tenant_id = tenant_of_limit_key(key)
    if not valid:
        shown = repr(key[:60]) if key is not None else "None"
        raise DecodeError("invalid_key", f"key {shown} ({len(key or b'')} bytes)")
    if value is None:
        return tenant_id, None
    try:
        limit = decode_limit(value)
    except DecodeError as exc:
        raise DecodeError(exc.reason, f"for {tenant_id!r:.80}: {exc.detail}") from None
    if limit.tenant_id != tenant_id:
        raise DecodeError("key_value_mismatch", f"key names {tenant_id!r:.80}, value {limit.tenant_id!r:.80}")
    return tenant_id, limit
