"""Prometheus ``/metrics`` and health endpoints for the aggregator, on 127.0.0.1 by default.

The figures are read from the service when scraped (a custom collector), so the consume loop pays
nothing per event for them. ``/healthz`` answers 200 while the consume loop runs (liveness);
``/readyz`` answers 200 once the owned partitions are restored and the lag is under
``ready_lag`` records (readiness: caught up).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from schemas.policy import COUNTER_PREFIX

if TYPE_CHECKING:
    from aggregator.service import AggregatorService
    from aggregator.state import Key, Totals

log = logging.getLogger(__name__)


# Every per-tenant series the aggregator exports; the dashboard's queries are checked against these.
TENANT_USED = "tokenguard_tenant_used_tokens"
TENANT_LIMIT = "tokenguard_tenant_limit_tokens"


def tenant_series(items: Iterable[tuple[Key, Totals]], top: int) -> list[tuple[Key, Totals]]:
    """The tenant-periods the per-tenant gauges show: the ``top`` by tokens used and every one not
    'ok', each once, sorted by tenant and period. Rule counters (``rule:`` period keys, which may
    count cost rather than tokens) are left out.

    One pass with a heap of ``top`` and a floor below which nothing is looked at further: about
    60 ms for a million tenant-periods (tests/unit/test_telemetry.py), at most ``top`` + not-'ok'
    series per scrape."""
    heap: list[tuple[int, Key, Totals]] = []
    others: dict[Key, Totals] = {}
    floor = -1
    for key, totals in items:
        if totals.state != "ok":
            if not key[1].startswith(COUNTER_PREFIX):
                others[key] = totals
            continue
        if totals.used <= floor or top == 0 or key[1].startswith(COUNTER_PREFIX):
            continue
        if len(heap) < top:
            heapq.heappush(heap, (totals.used, key, totals))
        else:
            heapq.heapreplace(heap, (totals.used, key, totals))
        if len(heap) == top:
            floor = heap[0][0]
    others.update((key, totals) for _, key, totals in heap)
    return sorted(others.items())


class ServiceCollector(Collector):
    def __init__(self, service: AggregatorService, *, top_tenants: int | None = None) -> None:
        self._service = service
        self._top = service.config.metrics_top_tenants if top_tenants is None else top_tenants

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        stats = self._service.stats
        counters = {
            "events": ("usage events applied to the totals", stats.events),
            "dead_letters": ("records sent to the dead-letter topic", stats.dead_letters),
            "duplicates_dropped": ("events dropped as repeats of an event id", stats.duplicates_dropped),
            "replays_skipped": ("records skipped because the changelog already held them", stats.replays_skipped),
            "notices": ("quota notices published", stats.notices),
            "commit_failures": ("offset commits skipped after a rebalance", stats.commit_failures),
            "id_conflicts": ("events dead-lettered because their tenant and id were seen with other content",
                             stats.id_conflicts),
            "unreadable_records": ("records the Kafka client could not parse, dead-lettered by offset",
                                   stats.unreadable_records),
            "changelog_rejected": ("changelog records not taken as state on restore (forged or out of bounds)",
                                   stats.changelog_rejected),
            "notice_corrections": ("notices on the topic that contradicted this aggregator, put right",
                                   stats.corrections),
            "notices_reasserted": ("not-ok notices published again on the re-assertion timer", stats.reasserted),
        }
        for name, (text, value) in counters.items():
            yield CounterMetricFamily(f"tokenguard_aggregator_{name}", text, value=value)
        lag = GaugeMetricFamily("tokenguard_aggregator_lag", "usage records not yet applied, per partition", labels=["partition"])
        for partition, value in sorted(self._service.lag().items()):
            lag.add_metric([str(partition)], value)
        yield lag
        yield GaugeMetricFamily("tokenguard_aggregator_blocked_tenants", "tenant-periods over their limit",
                                value=self._service.blocked_count())
        yield GaugeMetricFamily("tokenguard_aggregator_owned_partitions", "usage partitions this process owns",
                                value=len(self._service.owned_partitions))
        yield GaugeMetricFamily("tokenguard_aggregator_restore_seconds", "duration of the last restore",
                                value=stats.last_restore_s)
        yield from self._tenants()

    def _tenants(self) -> Iterator[GaugeMetricFamily]:
        used = GaugeMetricFamily(TENANT_USED, f"tokens used per tenant and period (top {self._top} by use, "
                                 "and every tenant-period not ok)", labels=["tenant", "period"])
        limit = GaugeMetricFamily(TENANT_LIMIT, "the limit governing the tenant-period in the used gauge",
                                  labels=["tenant", "period"])
        # Scraped on the event loop, between batches: the totals do not change during the pass.
        for (tenant, period), totals in tenant_series(self._service.state.totals.items(), self._top):
            used.add_metric([tenant, period], totals.used)
            limit.add_metric([tenant, period], totals.limit)
        yield used
        yield limit


class MetricsServer:
    """A minimal HTTP/1.1 server for three GET paths; anything else is 404."""

    def __init__(self, service: AggregatorService, host: str, port: int, *, ready_lag: int = 1_000) -> None:
        self._service = service
        self._host = host
        self._port = port
        self._ready_lag = ready_lag
        self._registry = CollectorRegistry()
        self._registry.register(ServiceCollector(service))
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        if self._server is None:
            self._server = await asyncio.start_server(self._handle, self._host, self._port)
            log.info("metrics on http://%s:%d/metrics", self._host, self.port)

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            await server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            method, _, rest = request.decode("latin-1").partition(" ")
            path = rest.partition(" ")[0].split("?")[0]
            status, body, content_type = self._respond(method, path)
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
                f"Connection: close\r\n\r\n".encode() + body
            )
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    def _respond(self, method: str, path: str) -> tuple[str, bytes, str]:
        if method != "GET":
            return "405 Method Not Allowed", b"GET only\n", "text/plain"
        if path == "/metrics":
            return "200 OK", generate_latest(self._registry), "text/plain; version=0.0.4; charset=utf-8"
        if path == "/healthz":
            alive = self._service.running
            return ("200 OK", b"ok\n", "text/plain") if alive else ("503 Service Unavailable", b"stopped\n", "text/plain")
        if path == "/readyz":
            lag = sum(self._service.lag().values())
            ready = self._service.running and self._service.owned_partitions and lag < self._ready_lag
            body = f"lag {lag}\n".encode()
            return ("200 OK" if ready else "503 Service Unavailable"), body, "text/plain"
        return "404 Not Found", b"not found\n", "text/plain"
