"""The aggregator's flush cadence (``AggregatorService._flush_due``): records are applied slice by
slice, the changelog and offset commit wait for the batch window, a notice does not."""

from __future__ import annotations

import time

from aggregator import AggregatorConfig, AggregatorService
from tests.helpers import make_event


def service() -> AggregatorService:
    return AggregatorService(AggregatorConfig(batch_window_ms=50, poll_window_ms=10, batch_max=1_000, seal_periods=False))


def test_a_busy_window_is_not_flushed_before_its_time() -> None:
    aggregator = service()
    assert not aggregator._flush_due(polled=200, applied=400, opened_at=time.monotonic())


def test_the_window_the_size_and_an_idle_slice_each_flush() -> None:
    aggregator = service()
    assert aggregator._flush_due(polled=200, applied=400, opened_at=time.monotonic() - 0.051)
    assert aggregator._flush_due(polled=200, applied=1_000, opened_at=time.monotonic())
    assert aggregator._flush_due(polled=0, applied=400, opened_at=time.monotonic())


def test_a_notice_to_publish_flushes_at_once() -> None:
    aggregator = service()
    aggregator.state.apply(0, 0, make_event("acme", 400, quota=1_000), time.time())
    assert not aggregator._flush_due(polled=1, applied=1, opened_at=time.monotonic())
    aggregator.state.apply(0, 1, make_event("acme", 700, quota=1_000), time.time())  # 1,100 of 1,000: exceeded
    assert aggregator._flush_due(polled=1, applied=2, opened_at=time.monotonic())
