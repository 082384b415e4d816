"""The OpenTelemetry span a usage event belongs to: read once per recorded call.

Only the producer imports this (opentelemetry-api comes with agent-framework-core); the aggregator
reads ``trace_id`` / ``span_id`` as plain strings and never needs OpenTelemetry.
"""

from __future__ import annotations

from opentelemetry.trace import get_current_span

_NONE: dict[str, str] = {}


def trace_fields() -> dict[str, str]:
    """``{"trace_id": ..., "span_id": ...}`` of the span current in this context, as lowercase
    hex (32 and 16 characters, the W3C form), or an empty dict when no valid span is active, so
    ``CallUsage(..., **trace_fields())`` leaves both fields at their default None.

    Returns a shared empty dict when there is no span: callers must not mutate the result.
    """
    context = get_current_span().get_span_context()
    if not context.is_valid:
        return _NONE
    return {"trace_id": format(context.trace_id, "032x"), "span_id": format(context.span_id, "016x")}
