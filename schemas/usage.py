"""The usage event: one per LLM call, the durable record billing reads and replays."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from schemas._types import Identifier, LimitTokens, PeriodKey, ShortText, Timestamp, TokenCount

# Additive changes only: a new optional field bumps the version; old versions must still decode.
USAGE_SCHEMA_VERSION: Literal[1] = 1

AttributeKey = Annotated[str, Field(min_length=1, max_length=64)]
AttributeValue = Annotated[str, Field(max_length=256)]


class UsageEvent(BaseModel):
    """What one LLM call spent, for one tenant in one period.

    Keyed on the wire by ``tenant_id`` so a tenant's events stay in order in one partition.
    ``event_id`` lets every consumer drop the duplicates that at-least-once delivery creates.
    """

    model_config = ConfigDict(frozen=True, strict=True, extra="ignore")

    event_id: Annotated[str, Field(min_length=8, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
    schema_version: Literal[1] = USAGE_SCHEMA_VERSION
    tenant_id: Identifier
    period_key: PeriodKey
    model: Annotated[str, Field(max_length=256)] | None = None
    input_tokens: TokenCount | None = None
    output_tokens: TokenCount | None = None
    total_tokens: TokenCount
    cache_creation_input_tokens: TokenCount | None = None
    cache_read_input_tokens: TokenCount | None = None
    reasoning_output_tokens: TokenCount | None = None
    quota_tokens: LimitTokens
    event_time: Timestamp
    streaming: bool = False
    estimated: bool = False
    instance_id: ShortText
    attributes: Annotated[dict[AttributeKey, AttributeValue], Field(max_length=32)] = Field(default_factory=dict)
