"""Bounded field types shared by the models: hostile input must fail validation, not grow memory."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, AwareDatetime, Field

# One LLM call above this is a bug or an attack, not usage: it is dead-lettered, never summed.
MAX_TOKENS_PER_EVENT = 100_000_000
MAX_LIMIT_TOKENS = 10**15
# A limits-topic key (a limit, rule or price key) is a short JSON array: this is far more than any
# takes, and bounds what parsing a hostile key can cost.
MAX_POLICY_KEY_BYTES = 4096


def _printable(value: str) -> str:
    if not value.isprintable():
        raise ValueError("must not contain control characters")
    return value


Identifier = Annotated[str, Field(min_length=1, max_length=256), AfterValidator(_printable)]
# A period key ends up in record keys, metrics labels and the operator's terminal: printable only.
PeriodKey = Annotated[str, Field(min_length=1, max_length=64), AfterValidator(_printable)]
ShortText = Annotated[str, Field(min_length=1, max_length=128), AfterValidator(_printable)]
TokenCount = Annotated[int, Field(ge=0, le=MAX_TOKENS_PER_EVENT)]
LimitTokens = Annotated[int, Field(ge=0, le=MAX_LIMIT_TOKENS)]
Offset = Annotated[int, Field(ge=-1)]
Partition = Annotated[int, Field(ge=0)]
Timestamp = AwareDatetime
