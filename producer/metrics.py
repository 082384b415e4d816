"""Prometheus metrics of the middleware side, for applications that keep a registry.

    from prometheus_client import REGISTRY
    register_metrics(store, middleware, registry=REGISTRY)

Read when scraped (a custom collector), so no call pays for them.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from producer.kafka_store import KafkaQuotaStore
from producer.middleware import TokenGuardMiddleware


class TokenGuardCollector(Collector):
    def __init__(self, store: KafkaQuotaStore, middlewares: tuple[TokenGuardMiddleware, ...]) -> None:
        self._store = store
        self._middlewares = middlewares

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        publisher = self._store.publisher
        yield GaugeMetricFamily("tokenguard_publisher_queue_depth", "usage events waiting to be sent", value=publisher.queue_depth)
        yield GaugeMetricFamily("tokenguard_spool_pending_events", "usage events waiting in the on-disk spool",
                                value=publisher.spool_pending)
        for name, text, value in (
            ("published", "usage events published", publisher.stats.published),
            ("delivered", "usage events acknowledged by Kafka", publisher.stats.delivered),
            ("spooled", "usage events written to the spool", publisher.stats.spooled),
            ("spool_dropped", "spooled usage events dropped by the drop_oldest policy", publisher.stats.spool_dropped),
            ("send_errors", "batches Kafka did not acknowledge in time", publisher.stats.send_errors),
        ):
            yield CounterMetricFamily(f"tokenguard_publisher_{name}", text, value=value)
        feed = self._store.feed
        skipped = CounterMetricFamily("tokenguard_notices_skipped", "notices-topic records skipped as unreadable, per reason",
                                      labels=["reason"])
        for reason, count in sorted(feed.skipped.items()):
            skipped.add_metric([reason], count)
        yield skipped
        ignored = CounterMetricFamily(
            "tokenguard_notices_ignored",
            "notices and heartbeats ignored for claiming the impossible (offset beyond the usage end, date too far ahead)",
            labels=["reason"],
        )
        for reason, count in sorted(feed.ignored.items()):
            ignored.add_metric([reason], count)
        yield ignored
        yield GaugeMetricFamily("tokenguard_notices_feed_failed", "1 when following the notices topic stopped on an error",
                                value=0 if feed.failed is None else 1)
        yield CounterMetricFamily("tokenguard_stale_decisions", "decisions made while the quota state was stale",
                                  value=self._store.stats.stale_decisions)
        blocked = sum(m.stats.blocked for m in self._middlewares)
        yield CounterMetricFamily("tokenguard_blocked_calls", "calls refused before reaching the LLM", value=blocked)
        yield CounterMetricFamily("tokenguard_callback_errors", "exceptions raised by user callbacks",
                                  value=sum(m.stats.callback_errors for m in self._middlewares))
        yield CounterMetricFamily("tokenguard_callback_timeouts", "async user callbacks cancelled at callback_timeout_s",
                                  value=sum(m.stats.callback_timeouts for m in self._middlewares))
        yield CounterMetricFamily("tokenguard_estimated_usage", "usage events recorded from an estimate",
                                  value=sum(m.stats.estimated for m in self._middlewares))


def register_metrics(
    store: KafkaQuotaStore, *middlewares: TokenGuardMiddleware, registry: CollectorRegistry = REGISTRY
) -> TokenGuardCollector:
    collector = TokenGuardCollector(store, middlewares)
    registry.register(collector)
    return collector
