"""Which limit applies to a tenant-period: the one precedence rule the middleware and the aggregator share.

The limits topic holds at most one record per tenant and one default record (``QuotaLimit``). For a
tenant-period, the tenant's own record applies when its period kind is ``any`` or the kind of the
period key (``schemas.periods.period_kind``); else the default record, by the same test; else
none, and the caller's own fallback applies (the aggregator's configured default, then the
smallest quota its events carried; the middleware's ``quota_tokens``).

Also here, since both sides read the topic: what one record of it says (``read_policy_record``: a
tenant limit, a quota rule of ``schemas.policy`` or a price of ``schemas.prices``), refusing
anything that is not one of ours. Pure: no I/O.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import NamedTuple, Protocol, TypeVar

from schemas._types import MAX_POLICY_KEY_BYTES
from schemas.errors import DecodeError
from schemas.limits import QuotaLimit
from schemas.periods import period_kind
from schemas.policy import QuotaRule, is_rule_key, parse_rule_key
from schemas.prices import ModelPrice, is_price_key, read_price_record
from schemas.wire import decode_limit, decode_rule

MAX_LIMIT_KEY_BYTES = MAX_POLICY_KEY_BYTES


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


def read_rule_record(key: bytes | None, value: bytes | None) -> tuple[str | None, str, QuotaRule | None]:
    """(tenant or None, name, the rule or None for a tombstone) of one rule record; ``DecodeError``
    for a key that is not a rule's, a value that does not decode, or one naming another rule."""
    parsed = parse_rule_key(key)
    if parsed is None:
        shown = repr(key[:60]) if key is not None else "None"
        raise DecodeError("invalid_key", f"key {shown} ({len(key or b'')} bytes)")
    tenant_id, name = parsed
    if value is None:
        return tenant_id, name, None
    try:
        rule = decode_rule(value)
    except DecodeError as exc:
        raise DecodeError(exc.reason, f"for rule {name!r:.40} of {tenant_id!r:.80}: {exc.detail}") from None
    if (rule.tenant_id, rule.name) != (tenant_id, name):
        raise DecodeError("key_value_mismatch", f"key names {(tenant_id, name)!r:.120}, "
                                                f"value {(rule.tenant_id, rule.name)!r:.120}")
    return tenant_id, name, rule


class LimitRecord(NamedTuple):
    tenant_id: str | None
    limit: QuotaLimit | None


class RuleRecord(NamedTuple):
    tenant_id: str | None
    name: str
    rule: QuotaRule | None


class PriceRecord(NamedTuple):
    model: str
    effective_from: datetime
    price: ModelPrice | None


PolicyRecord = LimitRecord | RuleRecord | PriceRecord


def read_policy_record(key: bytes | None, value: bytes | None) -> PolicyRecord:
    """What one record of the limits topic says (``None`` values are tombstones). ``DecodeError``
    for anything that is not a limit, a rule or a price of ours."""
    if is_rule_key(key):
        return RuleRecord(*read_rule_record(key, value))
    if is_price_key(key):
        return PriceRecord(*read_price_record(key, value))
    return LimitRecord(*read_limit_record(key, value))
