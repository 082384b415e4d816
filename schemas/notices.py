"""What the aggregator tells every middleware: quota state changes, and heartbeats that prove it is alive."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from schemas._types import Identifier, LimitTokens, Offset, Partition, PeriodKey, ShortText, Timestamp

QuotaState = Literal["ok", "warning", "exceeded"]


class QuotaNotice(BaseModel):
    """The aggregator's exact view of one tenant-period at ``usage_offset`` of ``usage_partition``.

    A middleware adds its own spend above that offset to ``used_tokens`` before deciding, so the
    offset is what makes a notice comparable with local, not-yet-aggregated usage.
    """

    model_config = ConfigDict(frozen=True, strict=True, extra="ignore")

    type: Literal["notice"] = "notice"
    tenant_id: Identifier
    period_key: PeriodKey
    state: QuotaState
    used_tokens: Annotated[int, Field(ge=0)]
    limit_tokens: LimitTokens
    usage_partition: Partition
    usage_offset: Offset
    reason: Annotated[str, Field(max_length=64)] = ""
    aggregator_id: ShortText
    emitted_at: Timestamp


class Heartbeat(BaseModel):
    """Sent per usage partition on a timer, so "no notice" can be told apart from "aggregator silent"."""

    model_config = ConfigDict(frozen=True, strict=True, extra="ignore")

    type: Literal["heartbeat"] = "heartbeat"
    usage_partition: Partition
    usage_offset: Offset
    aggregator_id: ShortText
    emitted_at: Timestamp


NoticeMessage = Annotated[QuotaNotice | Heartbeat, Field(discriminator="type")]
NOTICE_MESSAGE = TypeAdapter(NoticeMessage)
