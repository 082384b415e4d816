"""The seed's dict payloads (usage record, quota alert); reading counts is ``producer.validation``'s."""

from __future__ import annotations

import inspect
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
