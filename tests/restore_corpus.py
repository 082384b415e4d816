"""A changelog to restore, and the restore as it was before it was streamed, for the tests that hold
the streamed restore (``ChangelogFold`` into ``Totals``) to the old one record for record.

The corpus has what a real changelog has (several records per key, out of order and tied, rule
counters, tombstones and keys brought back after them, tenant ids JSON must escape) and what a
hostile one has (bad JSON, empty and oversized values, keys that are not the record's, records on
another partition than their tenant's or their own usage partition, offsets past the usage end).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any, NamedTuple

from aggregator.changelog import admissible
from aggregator.state import Limits, TotalsState
from schemas.errors import DecodeError
from schemas.totals import TotalsRecord
from schemas.wire import MAX_RECORD_BYTES, decode_totals_model, parse_tenant_period_key, tenant_period_key
from transport.partitioning import partition_for

PARTITIONS = 3
PERIOD = "2026-11"
COUNTER = "rule:daily~tokens:2026-11-29"
# Escaped by json.dumps (quote, backslash), or not ASCII, or spaces: the key check's slow and fast paths.
TENANTS = [f"tenant-{i}" for i in range(12)] + ['quo"te', "back\\slash", "café", "中文租户", "emoji-🚀", "with space"]
USAGE_ENDS = {0: 1_000, 1: 1_000, 2: 1_000}


class Raw(NamedTuple):
    """A changelog record as it is produced: the partition it goes to, key and value."""

    partition: int
    key: bytes | None
    value: bytes | None


class Read(NamedTuple):
    """A changelog record as it is read (the fields of a ``ConsumerRecord`` the restore uses)."""

    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


def home(tenant: str) -> int:
    return partition_for(tenant.encode(), PARTITIONS)


def value(tenant: str, period: str = PERIOD, **fields: Any) -> bytes:
    record: dict[str, Any] = {
        "tenant_id": tenant, "period_key": period, "used_tokens": 100, "event_count": 3,
        "limit_tokens": 1_000_000, "state": "ok", "usage_partition": home(tenant), "applied_offset": 10,
        "updated_at": datetime(2026, 11, 29, 12, 0, tzinfo=UTC).isoformat(), "event_quota_tokens": 500_000,
        "first_offset": 2,
    }
    record.update(fields)
    return json.dumps(record).encode()


def corpus() -> list[Raw]:
    """Records in the order they are produced (per partition, the order they are read)."""
    out: list[Raw] = []

    def put(tenant: str, period: str = PERIOD, *, partition: int | None = None, key: bytes | None = None,
            **fields: Any) -> None:
        out.append(Raw(home(tenant) if partition is None else partition,
                       tenant_period_key(tenant, period) if key is None else key, value(tenant, period, **fields)))

    for i, tenant in enumerate(TENANTS):
        put(tenant, applied_offset=10 + i, used_tokens=100 + i, first_offset=10 + i)
        put(tenant, applied_offset=50 + i, used_tokens=500 + i, state="warning", limit_tokens=600 + i % 2)
        put(tenant, applied_offset=30 + i, used_tokens=300 + i)  # behind the one before: loses
        put(tenant, COUNTER, applied_offset=40 + i, used_tokens=7 * i, event_quota_tokens=None, first_offset=None)
    for tenant in TENANTS[:6]:  # a tie: the later record wins
        put(tenant, applied_offset=50 + TENANTS.index(tenant), used_tokens=999, state="exceeded", limit_tokens=999)
    for tenant in TENANTS[::3]:  # tombstones; half the keys come back after theirs
        out.append(Raw(home(tenant), tenant_period_key(tenant, PERIOD), None))
    for tenant in TENANTS[::6]:
        put(tenant, applied_offset=5, used_tokens=55, first_offset=None)
    out.append(Raw(0, b"not a key", None))  # a tombstone whose key parses to nothing
    out.append(Raw(1, b'["one-part"]', None))
    tenant = TENANTS[1]
    p = home(tenant)
    other = (p + 1) % PARTITIONS
    out += [
        Raw(p, tenant_period_key(tenant, PERIOD), b"{not json"),
        Raw(p, tenant_period_key(tenant, PERIOD), b""),
        Raw(p, tenant_period_key(tenant, PERIOD), value(tenant, applied_offset=900, used_tokens=-1)),  # invalid
        Raw(p, tenant_period_key(tenant, PERIOD), value(tenant, applied_offset=900, state="great")),
        Raw(p, tenant_period_key(tenant, PERIOD),  # oversized, and valid JSON otherwise
            value(tenant, applied_offset=900, padding="x" * MAX_RECORD_BYTES)),
        Raw(p, tenant_period_key("someone-else", PERIOD), value(tenant, applied_offset=900)),  # not its key
        Raw(p, json.dumps([tenant, PERIOD]).encode(), value(tenant, applied_offset=900)),  # ", " is not canonical
        Raw(p, tenant_period_key(tenant, PERIOD), value(tenant, applied_offset=900, usage_partition=other)),
        Raw(other, tenant_period_key(tenant, PERIOD),  # consistent, but not the tenant's partition
            value(tenant, applied_offset=900, usage_partition=other)),
        Raw(p, tenant_period_key(tenant, PERIOD), value(tenant, applied_offset=USAGE_ENDS[p])),  # at the end
        Raw(p, tenant_period_key(tenant, PERIOD), value(tenant, applied_offset=2**62)),
    ]
    return out


def as_read(records: Iterable[Raw]) -> list[Read]:
    """What reading the produced records back gives, partition by partition, with offsets."""
    read: list[Read] = []
    offsets: Counter[int] = Counter()
    for raw in records:
        read.append(Read(raw.partition, offsets[raw.partition], raw.key, raw.value))
        offsets[raw.partition] += 1
    return sorted(read, key=lambda r: (r.partition, r.offset))


def old_restore(
    records: Iterable[Any], *, usage_ends: dict[int, int] | None, partition_count: int | None,
    seal_grace_s: float | None = None,
) -> tuple[TotalsState, Counter[str]]:
    """The restore before it was streamed (base commit 3b54bf6): ``read_changelog``'s loop, a
    pydantic model per record held in a dict, then ``TotalsState.restore`` per key."""
    rejected: Counter[str] = Counter()
    latest: dict[tuple[str, str], TotalsRecord] = {}
    for record in records:
        if record.value is None:
            parsed = parse_tenant_period_key(record.key)
            if parsed is not None:
                latest.pop(parsed, None)
            continue
        try:
            totals = decode_totals_model(record.value)
        except DecodeError as exc:
            rejected[exc.reason] += 1
            continue
        why = admissible(record, totals, usage_ends, partition_count)
        if why is not None:
            rejected[why] += 1
            continue
        key = (totals.tenant_id, totals.period_key)
        held = latest.get(key)
        if held is None or totals.applied_offset >= held.applied_offset:
            latest[key] = totals
    state = TotalsState(Limits(), seal_grace_s=seal_grace_s)
    for totals in latest.values():
        state.restore(totals)
    return state, rejected


def snapshot(state: TotalsState) -> dict[str, Any]:
    """Everything a restore sets in a state: the totals, the rule counters indexed, the keys waiting
    to seal (not their order: reading interleaves partitions as the broker's answers come)."""
    return {
        "totals": dict(state.totals),
        "counters": dict(state._counter_ends),
        "sealing": state.sealer.pending() if state.sealer is not None else None,
    }
