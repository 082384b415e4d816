"""The seed's dict payloads (usage record, quota alert) and reading usage out of a chat response."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from producer.store import CallUsage


async def maybe_await(value: Any) -> Any:
    """Callbacks may be sync or async, as in the seed."""
    if inspect.isawaitable(value):
        return await value
    return value


def usage_record(usage: CallUsage, used_tokens_after_call: int) -> dict[str, Any]:
    """The dict ``on_usage`` receives; its keys are the seed's, unchanged."""
    return {
        "user_id": usage.tenant_id,
        "period_key": usage.period_key,
        "model": usage.model,
        "input_tokens": usage.input_tokens,
        "output_tokens": usage.output_tokens,
        "total_tokens": usage.total_tokens,
        "quota_tokens": usage.quota_tokens,
        "used_tokens_after_call": used_tokens_after_call,
        "timestamp_utc": usage.event_time.isoformat(),
        "streaming": usage.streaming,
    }


def quota_alert(tenant_id: str, period_key: str, used: int, limit: int) -> dict[str, Any]:
    """The dict ``on_quota_exceeded`` receives; its keys are the seed's, unchanged."""
    return {
        "user_id": tenant_id,
        "period_key": period_key,
        "used_tokens": used,
        "quota_tokens": limit,
        "reason": "quota_exceeded_before_call",
    }


def _count(value: Any) -> int | None:
    if type(value) is int:
        return value if value >= 0 else None
    if value is None or isinstance(value, bool):
        return None
    try:
        count = int(value)
    except (TypeError, ValueError):
        return None
    return count if count >= 0 else None


def token_counts(details: Mapping[str, Any]) -> dict[str, int | None]:
    """Agent Framework ``UsageDetails`` -> our field names; total falls back to input + output.

    Providers' counts are trusted only as far as being non-negative integers; anything else
    counts as not reported.
    """
    get = details.get
    inp = _count(get("input_token_count"))
    out = _count(get("output_token_count"))
    return {
        "input_tokens": inp,
        "output_tokens": out,
        "total_tokens": _count(get("total_token_count")) or (inp or 0) + (out or 0),
        "cache_creation_input_tokens": _count(get("cache_creation_input_token_count")),
        "cache_read_input_tokens": _count(get("cache_read_input_token_count")),
        "reasoning_output_tokens": _count(get("reasoning_output_token_count")),
    }
