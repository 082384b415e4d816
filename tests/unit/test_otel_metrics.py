"""The middleware's series as OpenTelemetry instruments: the same values the Prometheus collector
publishes (one list feeds both). No OpenTelemetry SDK is installed here, so a meter that records
what is created stands in for it; the callbacks are the real ones."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry

from producer import InMemoryQuotaStore, KafkaQuotaStore, ProducerConfig, TokenGuardMiddleware
from producer.metrics import register_metrics, register_otel_metrics


class RecordingMeter:
    def __init__(self) -> None:
        self.created: dict[str, tuple[str, Any]] = {}

    def create_observable_counter(self, name: str, callbacks: list[Any], description: str = "") -> str:
        self.created[name] = ("counter", callbacks[0])
        return name

    def create_observable_gauge(self, name: str, callbacks: list[Any], description: str = "") -> str:
        self.created[name] = ("gauge", callbacks[0])
        return name


def test_every_series_is_an_instrument_with_the_prometheus_value() -> None:
    store = KafkaQuotaStore(ProducerConfig(spool_dir=None))
    middleware = TokenGuardMiddleware(quota_store=InMemoryQuotaStore(), quota_tokens=10)
    middleware.stats.blocked, store.stats.stale_decisions = 3, 7
    store.feed._follower.skip(partition=0, offset=5, reason="invalid_json", detail="x")  # type: ignore[attr-defined]
    registry = CollectorRegistry()
    register_metrics(store, middleware, registry=registry)
    meter = RecordingMeter()
    register_otel_metrics(store, middleware, meter=meter)
    assert meter.created["tokenguard.blocked_calls"][0] == "counter"
    assert meter.created["tokenguard.publisher_queue_depth"][0] == "gauge"
    for otel_name, (_, callback) in meter.created.items():
        prometheus_name = otel_name.replace("tokenguard.", "tokenguard_", 1)
        for observation in callback(None):
            sample = prometheus_name + ("_total" if meter.created[otel_name][0] == "counter" else "")
            assert registry.get_sample_value(sample, dict(observation.attributes or {})) == observation.value, otel_name
    blocked = meter.created["tokenguard.blocked_calls"][1](None)
    assert [o.value for o in blocked] == [3]
    middleware.stats.blocked = 4  # read when collected, not when registered
    assert [o.value for o in meter.created["tokenguard.blocked_calls"][1](None)] == [4]
    skipped = meter.created["tokenguard.notices_skipped"][1](None)
    assert [(dict(o.attributes or {}), o.value) for o in skipped] == [({"reason": "invalid_json"}, 1)]
