"""Prometheus metrics of the middleware side, for applications that keep a registry.

    from prometheus_client import REGISTRY
    register_metrics(store, middleware, registry=REGISTRY)

Read when scraped (a custom collector), so no call pays for them. The same series are available
as OpenTelemetry observable instruments (``register_otel_metrics``), for applications that export
Agent Framework's own telemetry.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal, NamedTuple

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from producer.kafka_store import KafkaQuotaStore
from producer.middleware import TokenGuardMiddleware

Kind = Literal["counter", "gauge"]


class Reading(NamedTuple):
    """One series of the middleware side, as both exporters publish it."""

    name: str
    kind: Kind
    help: str
    values: dict[tuple[tuple[str, str], ...], float]  # labels -> value


def readings(store: KafkaQuotaStore, middlewares: tuple[TokenGuardMiddleware, ...]) -> list[Reading]:
    """Every series, read now: the one list the Prometheus collector and the OpenTelemetry
    instruments both publish, so the two can never disagree."""
    publisher, feed, stats = store.publisher, store.feed, store.stats

    def one(name: str, kind: Kind, text: str, value: float) -> Reading:
        return Reading(name, kind, text, {(): value})

    found = [
        one("tokenguard_publisher_queue_depth", "gauge", "usage events waiting to be sent", publisher.queue_depth),
        one("tokenguard_spool_pending_events", "gauge", "usage events waiting in the on-disk spool", publisher.spool_pending),
    ]
    for name, text, value in (
        ("published", "usage events published", publisher.stats.published),
        ("delivered", "usage events acknowledged by Kafka", publisher.stats.delivered),
        ("spooled", "usage events written to the spool", publisher.stats.spooled),
        ("spool_dropped", "spooled usage events dropped by the drop_oldest policy", publisher.stats.spool_dropped),
        ("send_errors", "batches Kafka did not acknowledge in time", publisher.stats.send_errors),
    ):
        found.append(one(f"tokenguard_publisher_{name}", "counter", text, value))
    found += [
        Reading("tokenguard_notices_skipped", "counter", "notices-topic records skipped as unreadable, per reason",
                {(("reason", reason),): count for reason, count in sorted(feed.skipped.items())}),
        Reading("tokenguard_notices_ignored", "counter",
                "notices and heartbeats ignored for claiming the impossible (offset beyond the usage end, date too far ahead)",
                {(("reason", reason),): count for reason, count in sorted(feed.ignored.items())}),
        one("tokenguard_notices_feed_failed", "gauge", "1 when following the notices topic stopped on an error",
            0 if feed.failed is None else 1),
        one("tokenguard_stale_decisions", "counter", "decisions made while the quota state was stale", stats.stale_decisions),
        one("tokenguard_lag_stale_decisions", "counter", "of those, decisions made while the aggregator was alive but behind",
            stats.lag_stale_decisions),
        one("tokenguard_degraded", "gauge", "1 while the store runs without Kafka (started degraded, usage to the spool)",
            1 if store.degraded else 0),
        one("tokenguard_blocked_calls", "counter", "calls refused before reaching the LLM",
            sum(m.stats.blocked for m in middlewares)),
        one("tokenguard_callback_errors", "counter", "exceptions raised by user callbacks",
            sum(m.stats.callback_errors for m in middlewares)),
        one("tokenguard_callback_timeouts", "counter", "async user callbacks cancelled at callback_timeout_s",
            sum(m.stats.callback_timeouts for m in middlewares)),
        one("tokenguard_estimated_usage", "counter", "usage events recorded from an estimate",
            sum(m.stats.estimated for m in middlewares)),
    ]
    return found


class TokenGuardCollector(Collector):
    def __init__(self, store: KafkaQuotaStore, middlewares: tuple[TokenGuardMiddleware, ...]) -> None:
        self._store = store
        self._middlewares = middlewares

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        for reading in readings(self._store, self._middlewares):
            labels = [name for name, _ in next(iter(reading.values), ())]
            family_type = CounterMetricFamily if reading.kind == "counter" else GaugeMetricFamily
            family = family_type(reading.name, reading.help, labels=labels)
            for key, value in reading.values.items():
                family.add_metric([v for _, v in key], value)
            yield family


def register_metrics(
    store: KafkaQuotaStore, *middlewares: TokenGuardMiddleware, registry: CollectorRegistry = REGISTRY
) -> TokenGuardCollector:
    collector = TokenGuardCollector(store, middlewares)
    registry.register(collector)
    return collector


def register_otel_metrics(store: KafkaQuotaStore, *middlewares: TokenGuardMiddleware, meter: Any = None) -> list[Any]:
    """The same series as OpenTelemetry observable instruments (Agent Framework's telemetry
    stack), read when the SDK collects: ``tokenguard.publisher_published`` and so on (the
    Prometheus names with the prefix dotted). ``meter``:
    default ``opentelemetry.metrics.get_meter("tokenguard")``. Returns the instruments."""
    from opentelemetry.metrics import CallbackOptions, Observation, get_meter

    meter = meter if meter is not None else get_meter("tokenguard")
    instruments = []
    for reading in readings(store, middlewares):
        def observe(options: CallbackOptions, name: str = reading.name) -> list[Observation]:
            current = next(r for r in readings(store, middlewares) if r.name == name)
            return [Observation(value, dict(labels)) for labels, value in current.values.items()]

        otel_name = reading.name.replace("tokenguard_", "tokenguard.", 1)
        create = meter.create_observable_counter if reading.kind == "counter" else meter.create_observable_gauge
        instruments.append(create(otel_name, callbacks=[observe], description=reading.help))
    return instruments
