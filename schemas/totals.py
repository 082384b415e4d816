"""The aggregator's changelog record: exact totals of one tenant-period and how far they reach."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from schemas._types import Identifier, LimitTokens, Offset, Partition, PeriodKey, Timestamp
from schemas.notices import QuotaState


class TotalsRecord(BaseModel):
    """Totals that include every usage record of ``usage_partition`` up to ``applied_offset``.

    Written to the totals topic in the same partition number as the usage it sums, so a restore
    after a crash or a rebalance reads exactly the partitions it was assigned.
    """

    model_config = ConfigDict(frozen=True, strict=True, extra="ignore")

    tenant_id: Identifier
    period_key: PeriodKey
    used_tokens: Annotated[int, Field(ge=0)]
    event_count: Annotated[int, Field(ge=0)]
    limit_tokens: LimitTokens
    state: QuotaState
    usage_partition: Partition
    applied_offset: Offset
    updated_at: Timestamp
    # The quota the key's latest event carried: the limit again if a limits-topic limit is removed.
    event_quota_tokens: LimitTokens | None = None
    # The usage offset of the first event counted (None: written before this field existed). Once
    # the usage partition's log start passes it, some of the key's events are gone from the topic:
    # the totals can no longer be recomputed from it, only kept (``verify`` and ``replay`` know).
    first_offset: Offset | None = None
