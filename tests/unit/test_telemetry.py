"""Telemetry without a broker: the usage event's trace ids (schema version 2), the aggregator's
per-tenant gauges, the dashboard's queries."""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka.errors import GroupCoordinatorNotAvailableError
from click.testing import CliRunner
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags
from prometheus_client import CollectorRegistry, generate_latest

from aggregator.cli.app import tokenguard
from aggregator.cli.options import CliSettings, ExpectedKafkaNoise, JsonLogFormatter
from aggregator.config import AggregatorConfig
from aggregator.metrics import TENANT_LIMIT, TENANT_USED, ServiceCollector, tenant_series
from aggregator.state import Totals
from aggregator.stats import AggregatorStats
from producer.tracing import trace_fields
from schemas.errors import DecodeError
from schemas.usage import USAGE_SCHEMA_VERSION, UsageEvent
from schemas.wire import decode_usage, encode

TRACE_ID = 0x4BF92F3577B34DA6A3CE929D0E0E4736
SPAN_ID = 0x00F067AA0BA902B7


def span() -> NonRecordingSpan:
    return NonRecordingSpan(SpanContext(TRACE_ID, SPAN_ID, is_remote=False, trace_flags=TraceFlags(TraceFlags.SAMPLED)))


def event(**overrides: object) -> UsageEvent:
    fields: dict[str, object] = {
        "event_id": "0123456789abcdef", "tenant_id": "acme", "period_key": "2026-04", "total_tokens": 5,
        "quota_tokens": 50, "event_time": datetime(2026, 4, 14, tzinfo=UTC), "instance_id": "host-1",
    }
    return UsageEvent(**(fields | overrides))  # type: ignore[arg-type]


def test_no_active_span_means_no_ids() -> None:
    assert trace_fields() == {}


def test_the_active_span_ids_as_w3c_hex() -> None:
    with trace.use_span(span()):
        fields = trace_fields()
    assert fields == {"trace_id": "4bf92f3577b34da6a3ce929d0e0e4736", "span_id": "00f067aa0ba902b7"}
    assert event(**fields).trace_id == fields["trace_id"]


def test_an_invalid_span_context_gives_no_ids() -> None:
    with trace.use_span(trace.INVALID_SPAN):
        assert trace_fields() == {}


def test_new_events_are_version_2_and_carry_the_ids_on_the_wire() -> None:
    assert USAGE_SCHEMA_VERSION == 2
    with trace.use_span(span()):
        original = event(**trace_fields())
    decoded = decode_usage(encode(original))
    assert decoded == original and decoded.schema_version == 2 and decoded.span_id == "00f067aa0ba902b7"


def test_a_version_1_event_without_the_fields_still_decodes() -> None:
    data = encode(event()).replace(b'"schema_version":2', b'"schema_version":1')
    old = decode_usage(data.replace(b',"trace_id":null,"span_id":null', b""))
    assert old.schema_version == 1 and old.trace_id is None and old.span_id is None


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("trace_id", "4BF92F3577B34DA6A3CE929D0E0E4736"),  # upper case is not the W3C form
        ("trace_id", "4bf92f3577b34da6a3ce929d0e0e473"),  # 31 characters
        ("trace_id", "4bf92f3577b34da6a3ce929d0e0e4736ab"),
        ("span_id", "00f067aa0ba902b"),
        ("span_id", "00f067aa0ba902bz"),
        ("span_id", ""),
    ],
)
def test_malformed_ids_are_refused(field: str, value: str) -> None:
    data = encode(event()).replace(f'"{field}":null'.encode(), f'"{field}":"{value}"'.encode())
    with pytest.raises(DecodeError) as info:
        decode_usage(data)
    assert info.value.reason == "invalid_schema"


# -- the aggregator's per-tenant gauges: bounded cardinality, computed at scrape time -------------


def totals_of(*rows: tuple[str, str, int, int, str]) -> dict[tuple[str, str], Totals]:
    return {(tenant, period): Totals(partition=0, used=used, limit=limit, state=state)  # type: ignore[arg-type]
            for tenant, period, used, limit, state in rows}


def test_tenant_series_are_the_top_n_by_use_plus_every_one_not_ok() -> None:
    totals = totals_of(
        ("big", "2026-04", 900, 10_000, "ok"), ("bigger", "2026-04", 950, 10_000, "ok"),
        ("small", "2026-04", 10, 10_000, "ok"), ("blocked", "2026-04", 5, 5, "exceeded"),
        ("warned", "2026-04", 8, 10, "warning"), ("acme", "rule:daily~tenant:day", 10**9, 10, "exceeded"),
    )
    chosen = [key for key, _ in tenant_series(totals.items(), 2)]
    assert chosen == [("big", "2026-04"), ("bigger", "2026-04"), ("blocked", "2026-04"), ("warned", "2026-04")]
    assert [key for key, _ in tenant_series(totals.items(), 0)] == [("blocked", "2026-04"), ("warned", "2026-04")]
    assert len(tenant_series(totals.items(), 50)) == 5, "rule counters (rule: period keys) are not tenant gauges"


def test_the_collector_exports_used_and_limit_per_tenant_period() -> None:
    rows = [(f"t{i:04d}", "2026-04", i, 1_000, "ok") for i in range(1_000)] + [("blocked", "2026-04", 1, 1, "exceeded")]
    service = fake_service(totals_of(*rows), top=3)
    text = generate_latest(registry_of(service)).decode()
    used = [line for line in text.splitlines() if line.startswith(TENANT_USED + "{")]
    assert used == [f'{TENANT_USED}{{period="2026-04",tenant="{t}"}} {v}'
                    for t, v in (("blocked", "1.0"), ("t0997", "997.0"), ("t0998", "998.0"), ("t0999", "999.0"))]
    assert f'{TENANT_LIMIT}{{period="2026-04",tenant="blocked"}} 1.0' in text


def test_a_scrape_of_a_million_tenant_periods_stays_cheap() -> None:
    """The cost is one pass over the totals and a heap of N: measured, not guessed."""
    rows = {(f"t{i}", "2026-04"): Totals(partition=0, used=i % 977, limit=10**6) for i in range(1_000_000)}
    started = time.perf_counter()
    chosen = tenant_series(rows.items(), 50)
    took = time.perf_counter() - started
    assert len(chosen) == 50 and took < 5, f"{took:.2f}s"
    print(f"tenant_series over 1,000,000 tenant-periods: {took * 1000:.0f} ms")


def fake_service(totals: dict[tuple[str, str], Totals], *, top: int) -> Any:
    """What the collector reads of an ``AggregatorService``: a null object, no broker."""
    return SimpleNamespace(
        stats=AggregatorStats(), state=SimpleNamespace(totals=totals), owned_partitions={0}, lag=lambda: {0: 0},
        blocked_count=lambda: sum(1 for t in totals.values() if t.state == "exceeded"),
        config=AggregatorConfig(metrics_top_tenants=top),
    )


def registry_of(service: Any) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(ServiceCollector(service))
    return registry


def test_the_top_tenants_setting_has_a_variable_and_a_flag() -> None:
    assert AggregatorConfig.from_env({"TOKENGUARD_METRICS_TOP_TENANTS": "7"}).metrics_top_tenants == 7
    assert AggregatorConfig().metrics_top_tenants == 50
    with pytest.raises(ValueError, match="TOKENGUARD_METRICS_TOP_TENANTS"):
        AggregatorConfig.from_env({"TOKENGUARD_METRICS_TOP_TENANTS": "-1"})
    help_text = CliRunner().invoke(tokenguard, ["aggregator", "--help"], terminal_width=400).output
    assert "--metrics-top-tenants" in help_text and "TOKENGUARD_METRICS_TOP_TENANTS" in help_text


# -- logs: JSON lines on request, aiokafka's expected start-up errors below WARNING ---------------


def record(name: str, level: int, msg: str, *args: object, exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("boom")
        except ValueError:
            exc_info = sys.exc_info()
    return logging.LogRecord(name, level, __file__, 1, msg, args, exc_info)


def test_json_log_lines_have_time_level_logger_message_and_never_a_secret() -> None:
    formatter = JsonLogFormatter(secrets=["hunter2-secret", ""])
    line = formatter.format(record("aggregator.service", logging.ERROR, "login with %s failed", "hunter2-secret", exc=True))
    assert "\n" not in line and "hunter2" not in line
    parsed = json.loads(line)
    assert set(parsed) == {"time", "level", "logger", "message"}
    assert (parsed["level"], parsed["logger"]) == ("ERROR", "aggregator.service")
    assert parsed["message"].startswith("login with *** failed\nTraceback") and "ValueError: boom" in parsed["message"]
    assert datetime.fromisoformat(parsed["time"]).tzinfo is not None


def test_the_log_format_setting_has_a_variable_and_a_flag_on_every_kafka_command() -> None:
    assert CliSettings.read({"TOKENGUARD_LOG_FORMAT": "JSON"}).log_format == "json"
    with pytest.raises(ValueError, match="TOKENGUARD_LOG_FORMAT"):
        CliSettings.read({"TOKENGUARD_LOG_FORMAT": "xml"})
    for args in (["--help"], ["usage", "show", "--help"], ["aggregator", "--help"]):
        assert "--log-format [text|json]" in CliRunner().invoke(tokenguard, args, terminal_width=400).output


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_only_the_expected_start_up_errors_are_lowered_and_only_at_start() -> None:
    clock = Clock()
    noise = ExpectedKafkaNoise(60, clock=clock)
    logging.getLogger("aiokafka").setLevel(logging.INFO)
    try:
        coordinator = record("aiokafka.consumer.group_coordinator", logging.ERROR, "Group Coordinator Request failed: %s",
                             GroupCoordinatorNotAvailableError())
        assert noise.filter(coordinator) and (coordinator.levelno, coordinator.levelname) == (logging.INFO, "INFO")
        leaderless = record("aiokafka.cluster", logging.WARNING,
                            "Topic %s is not available during auto-create initialization", "t.usage")
        assert noise.filter(leaderless) and leaderless.levelno == logging.INFO
        other_error = record("aiokafka.consumer.group_coordinator", logging.ERROR,
                             "Group Coordinator Request failed: %s", ValueError("something else"))
        unexpected = record("aiokafka.cluster", logging.ERROR, "Topic %s not found in cluster metadata", "t.usage")
        for kept in (other_error, unexpected):
            assert noise.filter(kept) and kept.levelno == logging.ERROR
        logging.getLogger("aiokafka").setLevel(logging.WARNING)
        quiet = record("aiokafka.consumer.group_coordinator", logging.ERROR, "Group Coordinator Request failed: %s",
                       GroupCoordinatorNotAvailableError())
        assert not noise.filter(quiet), "lowered below the level shown: dropped"
        clock.now = 61
        late = record("aiokafka.consumer.group_coordinator", logging.ERROR, "Group Coordinator Request failed: %s",
                      GroupCoordinatorNotAvailableError())
        assert noise.filter(late) and late.levelno == logging.ERROR, "past the start-up window it is a real problem"
    finally:
        logging.getLogger("aiokafka").setLevel(logging.NOTSET)


# -- the Grafana dashboard names only series the aggregator exports -------------------------------

DASHBOARD = Path(__file__).resolve().parent.parent.parent / "examples" / "grafana-dashboard.json"
PROMQL_WORDS = {"sum", "by", "rate", "topk", "or", "max", "min", "avg", "without", "increase", "on", "ignoring"}


def test_every_dashboard_query_names_a_series_the_aggregator_exports() -> None:
    rows = [("acme", "2026-04", 10, 100, "ok"), ("blocked", "2026-04", 5, 5, "exceeded")]
    text = generate_latest(registry_of(fake_service(totals_of(*rows), top=5))).decode()
    exported = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}
    exprs = [target["expr"] for panel in json.loads(DASHBOARD.read_text())["panels"] for target in panel["targets"]]
    assert exprs
    for expr in exprs:
        without_labels = re.sub(r"\{[^}]*\}|\[[^\]]*\]|\"[^\"]*\"", "", expr)
        names = {word for word in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", without_labels) if word not in PROMQL_WORDS}
        names -= {"partition", "tenant", "period"}  # grouping labels
        assert names, expr
        assert names <= exported, (expr, names - exported)
