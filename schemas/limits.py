"""Per-tenant limits, set by operators on a compacted topic; the latest record per key wins."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from schemas._types import Identifier, LimitTokens, Timestamp


class QuotaLimit(BaseModel):
    """A tenant's token limit per period; ``tenant_id=None`` is the default for tenants without one."""

    model_config = ConfigDict(frozen=True, strict=True, extra="ignore")

    tenant_id: Identifier | None
    limit_tokens: LimitTokens
    period: Literal["any", "month", "week", "day"] = "any"
    warning_ratio: Annotated[float, Field(gt=0.0, lt=1.0)] | None = None
    updated_at: Timestamp
