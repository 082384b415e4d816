"""Telemetry on the real broker: a call made inside a span publishes that span's ids."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest
from agent_framework import Agent
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from aggregator import AggregatorConfig
from aggregator.metrics import TENANT_LIMIT, TENANT_USED
from producer import KafkaQuotaStore, ProducerConfig, TokenGuardMiddleware, UsagePublisher
from producer.scripted import ScriptedChatClient
from schemas.topics import TopicLayout
from schemas.wire import decode_usage
from tests.helpers import eventually, make_event, read_topic, run_agent, run_python, running_aggregator
from tests.integration.test_metrics import get

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


async def test_the_aggregator_exports_the_top_tenants_and_every_blocked_one(
    producer_config: ProducerConfig, aggregator_config: AggregatorConfig
) -> None:
    config = replace(aggregator_config, metrics_port=0, metrics_top_tenants=2)
    async with running_aggregator(config) as aggregator:
        assert aggregator.metrics is not None
        async with UsagePublisher(producer_config) as publisher:
            for tenant, tokens in (("t1", 100), ("t2", 200), ("t3", 300), ("t4", 400)):
                publisher.publish(make_event(tenant, tokens))
            publisher.publish(make_event("blocked", 60, quota=50))
            await publisher.flush()
        await eventually(lambda: aggregator.stats.events == 5, 30, "all applied")
        await asyncio.sleep(0)
        status, text = await get(aggregator.metrics.port, "/metrics")
    assert status == 200
    used = {line for line in text.splitlines() if line.startswith(TENANT_USED + "{")}
    assert used == {f'{TENANT_USED}{{period="2026-04",tenant="{tenant}"}} {value}'
                    for tenant, value in (("t3", "300.0"), ("t4", "400.0"), ("blocked", "60.0"))}
    assert f'{TENANT_LIMIT}{{period="2026-04",tenant="blocked"}} 50.0' in text


async def test_json_logs_are_one_object_per_line(kafka_bootstrap: str, layout: TopicLayout) -> None:
    where = ["--bootstrap-servers", kafka_bootstrap, "--prefix", layout.prefix]
    code, _, err = await run_python("-m", "aggregator.cli", "topics", "create", *where, "--log-level", "info",
                                    env={"TOKENGUARD_LOG_FORMAT": "json"})
    assert code == 0, err
    code, out, err_show = await run_python("-m", "aggregator.cli", "usage", "show", *where, "--log-format", "json",
                                           "--log-level", "debug")
    assert code == 0 and out.startswith("tenant"), err_show
    lines = (err + err_show).splitlines()
    assert len(lines) > 10 and any("aiokafka" in line for line in lines)
    for line in lines:
        parsed = json.loads(line)
        assert set(parsed) == {"time", "level", "logger", "message"}, line


@pytest.mark.parametrize("args", [("usage", "show"), ("limits", "list"), ("prices", "list"), ("verify",), ("replay",)],
                         ids=lambda args: " ".join(args))
async def test_a_command_against_missing_topics_fails_at_once(kafka_bootstrap: str, layout: TopicLayout,
                                                              args: tuple[str, ...]) -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    code, out, err = await run_python("-m", "aggregator.cli", *args, "--bootstrap-servers", kafka_bootstrap,
                                      "--prefix", layout.prefix)
    took = loop.time() - started
    assert code == 1 and out == "", (code, out, err)
    assert err == f"tokenguard {' '.join(args)}: topic {layout.usage} does not exist: run `tokenguard topics create`\n"
    assert took < 10, f"{took:.1f}s"
