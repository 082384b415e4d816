"""A notice does not wait for the aggregator's batch window: under steady load (every poll slice
finds records, so only the window would close the batch), the notice of a tenant that crosses its
limit reaches a middleware's snapshot in a fraction of the window."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

from aggregator import AggregatorConfig
from producer import ProducerConfig, UsagePublisher, ensure_topics
from tests.helpers import eventually, make_event, notices_feed, running_aggregator

WINDOW_MS = 6_000


async def test_a_notice_is_published_long_before_the_batch_window_closes(
    aggregator_config: AggregatorConfig, producer_config: ProducerConfig
) -> None:
    config = replace(aggregator_config, batch_window_ms=WINDOW_MS)
    await ensure_topics(config.connection, config.topics)
    stop = asyncio.Event()

    async def load(publisher: UsagePublisher) -> None:
        index = 0
        while not stop.is_set():
            publisher.publish(make_event(f"load-{index % 30}", 10))
            index += 1
            await asyncio.sleep(0.001)

    async with (
        running_aggregator(config) as aggregator,
        notices_feed(producer_config) as (feed, _),
        UsagePublisher(replace(producer_config, spool_dir=None)) as publisher,
    ):
        background = asyncio.create_task(load(publisher))
        try:
            await eventually(lambda: aggregator.stats.events > 500, 20, "the load reaching the aggregator")
            flushes = aggregator.stats.flushes
            began = time.monotonic()
            publisher.publish(make_event("probe", 1_500, quota=1_000))
            await feed.wait_until(lambda s: not s.decide("probe", "2026-04", 10**12).allowed, timeout=WINDOW_MS / 1000)
            took = time.monotonic() - began
            flushed = aggregator.stats.flushes - flushes
        finally:
            stop.set()
            await background
    assert took < WINDOW_MS / 1000 / 3, f"the notice took {took:.2f}s; the batch window is {WINDOW_MS} ms"
    # The load alone did not flush slice by slice: the changelog and commit kept the window's cadence.
    assert flushed <= 3, f"{flushed} flushes in {took:.2f}s under steady load"
