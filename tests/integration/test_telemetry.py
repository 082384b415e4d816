"""Telemetry on the real broker: a call made inside a span publishes that span's ids."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from agent_framework import Agent
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from producer import KafkaQuotaStore, ProducerConfig, TokenGuardMiddleware
from producer.scripted import ScriptedChatClient
from schemas.wire import decode_usage
from tests.helpers import eventually, read_topic, run_agent

pytestmark = pytest.mark.integration


@pytest.fixture
async def store(producer_config: ProducerConfig) -> AsyncIterator[KafkaQuotaStore]:
    async with KafkaQuotaStore(producer_config) as kafka_store:
        yield kafka_store


def tracer_span(name: str) -> trace.Span:
    """A span as an application's tracer starts it: the SDK's when installed, else (this
    environment has only opentelemetry-api) a span context the API carries as the current span."""
    try:
        from opentelemetry.sdk.trace import TracerProvider  # type: ignore[import-not-found]
    except ImportError:
        context = SpanContext(0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331, is_remote=False,
                              trace_flags=TraceFlags(TraceFlags.SAMPLED))
        return NonRecordingSpan(context)
    return TracerProvider().get_tracer(__name__).start_span(name)  # type: ignore[no-any-return]


@pytest.mark.parametrize("stream", [False, True], ids=["run", "stream"])
async def test_a_call_inside_a_span_carries_its_ids_to_the_usage_topic(store: KafkaQuotaStore, stream: bool) -> None:
    guard = TokenGuardMiddleware(quota_store=store, quota_tokens=1_000_000, user_id_getter=lambda _: "acme")
    agent = Agent(ScriptedChatClient(reply_words=5), middleware=[guard])
    await run_agent(agent, "outside any span", stream=stream)
    span = tracer_span("agent call")
    with trace.use_span(span, end_on_exit=True):
        await run_agent(agent, "inside the span", stream=stream)
    await eventually(lambda: store.publisher.stats.published >= 2, what="both usage events published")
    await store.publisher.flush()
    outside, inside = [decode_usage(r.value) for r in await read_topic(store.config.connection, store.config.topics.usage)]
    context = span.get_span_context()
    assert (inside.trace_id, inside.span_id) == (format(context.trace_id, "032x"), format(context.span_id, "016x"))
    assert inside.schema_version == 2 and inside.streaming is stream
    assert (outside.trace_id, outside.span_id) == (None, None)
