"""Closed periods for billing: the final totals of a tenant-period, and the events that came late.

A tenant-period *seals* once its period has ended everywhere and a grace for late events has
passed (``seal_time``): the aggregator writes one ``SealedTotals`` to the sealed topic (compacted,
co-partitioned with usage), removes the key from its changelog and its memory, and from then on an
event of that period is not added to it: it is an ``Adjustment``, one record per late event. A
billing consumer takes the sealed total as the period's bill and each adjustment as a line after it.

Which events a sealed total holds is decided by the usage records' broker timestamps (the usage
topic's ``LogAppendTime``): those appended at or before the seal time. The aggregator seals a key
only once its partition has passed that time, so the verifier can recompute both from the topic.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from schemas._types import Identifier, Offset, Partition, PeriodKey, ShortText, Timestamp, TokenCount
from schemas.periods import period_kind, window_end

# A period key says its period but not the time zone of the function that made it: a zone east of
# UTC ends its periods before UTC does, one west up to 12 hours later. 14 hours covers every zone.
ANY_ZONE_S = 14 * 3600


class SealedTotals(BaseModel):
    """The final totals of one tenant-period: every event appended at or before ``seal_time``."""

    model_config = ConfigDict(frozen=True, strict=True, extra="ignore")

    type: Literal["sealed"] = "sealed"
    tenant_id: Identifier
    period_key: PeriodKey
    used_tokens: Annotated[int, Field(ge=0)]
    event_count: Annotated[int, Field(ge=0)]
    usage_partition: Partition
    applied_offset: Offset
    first_offset: Offset | None = None
    seal_time: Timestamp
    aggregator_id: ShortText
    sealed_at: Timestamp


class Adjustment(BaseModel):
    """One event of a sealed tenant-period that the usage topic took after its seal time."""

    model_config = ConfigDict(frozen=True, strict=True, extra="ignore")

    type: Literal["adjustment"] = "adjustment"
    tenant_id: Identifier
    period_key: PeriodKey
    event_id: Annotated[str, Field(min_length=1, max_length=64)]
    total_tokens: TokenCount
    usage_partition: Partition
    usage_offset: Offset
    event_time: Timestamp
    appended_at: Timestamp
    aggregator_id: ShortText
    recorded_at: Timestamp


SealedMessage = Annotated[SealedTotals | Adjustment, Field(discriminator="type")]
SEALED_MESSAGE = TypeAdapter(SealedMessage)


def seal_time(period_key: str, grace_s: float) -> float | None:
    """When ``period_key`` seals (epoch seconds): its end in UTC, plus ``ANY_ZONE_S``, plus the
    grace for late events. None for a custom period key, whose end is unknown: it never seals."""
    kind = period_kind(period_key)
    end = window_end(period_key, kind=kind, tz=UTC) if kind is not None else None
    return None if end is None else end.timestamp() + ANY_ZONE_S + grace_s


def sealed_key(tenant_id: str, period_key: str) -> bytes:
    return json.dumps(["sealed", tenant_id, period_key], separators=(",", ":"), ensure_ascii=False).encode()


def adjustment_key(tenant_id: str, period_key: str, event_id: str) -> bytes:
    """One key per late event: compaction keeps every adjustment, and a re-sent one replaces itself."""
    return json.dumps(["adjustment", tenant_id, period_key, event_id], separators=(",", ":"), ensure_ascii=False).encode()


def utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)
