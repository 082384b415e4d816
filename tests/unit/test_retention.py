"""The usage topic's retention against its periods: the arithmetic, the default layout and the one-line message."""

from __future__ import annotations

import pytest

from aggregator.cli import CliSettings
from aggregator.config import AggregatorConfig, AggregatorSettings
from aggregator.errors import AggregatorError, RetentionError
from schemas.topics import (
    DEFAULT_LONGEST_PERIOD_S,
    DEFAULT_SEAL_GRACE_S,
    TopicLayout,
    default_usage_retention_ms,
    required_retention_ms,
    retention_bytes_warning,
    retention_problem,
)
from transport.connection import SettingsError

DAY_MS = 86_400_000
MONTH = {"longest_period_s": 31 * 86_400.0, "seal_grace_s": 21_600.0}


def test_required_retention_is_two_longest_periods_plus_the_grace() -> None:
    assert required_retention_ms(31 * 86_400, 21_600) == 62 * DAY_MS + 6 * 3_600_000  # 62.25 days
    assert required_retention_ms(86_400, 0) == 2 * DAY_MS
    assert required_retention_ms(366 * 86_400, 21_600) == 732 * DAY_MS + 21_600_000


def test_the_default_layout_keeps_a_month_and_its_grace_and_the_month_before() -> None:
    assert (DEFAULT_LONGEST_PERIOD_S, DEFAULT_SEAL_GRACE_S) == (31 * 86_400, 21_600)
    assert TopicLayout().usage_retention_ms == 63 * DAY_MS  # 62.25 days rounded up to whole days
    assert TopicLayout().usage_retention_ms >= AggregatorConfig().required_retention_ms
    usage = TopicLayout().specs()[0]
    assert usage.configs["retention.ms"] == str(63 * DAY_MS)
    assert retention_problem(usage.name, usage.configs, **MONTH) is None


def test_the_settings_derive_the_topics_retention_from_the_longest_period() -> None:
    config = AggregatorSettings.read({"TOKENGUARD_LONGEST_PERIOD_S": "31622400", "TOKENGUARD_SEAL_GRACE_S": "3600"}).config()
    assert (config.longest_period_s, config.seal_grace_s, config.allow_short_retention) == (31_622_400, 3600, False)
    assert config.topics.usage_retention_ms == default_usage_retention_ms(31_622_400, 3600) == 733 * DAY_MS
    assert AggregatorSettings.read({}).config().topics.usage_retention_ms == 63 * DAY_MS
    assert CliSettings.read({"TOKENGUARD_ALLOW_SHORT_RETENTION": "yes"}).config().allow_short_retention


@pytest.mark.parametrize(("variable", "value"), [
    ("TOKENGUARD_LONGEST_PERIOD_S", "0"), ("TOKENGUARD_LONGEST_PERIOD_S", "-5"), ("TOKENGUARD_LONGEST_PERIOD_S", "1e12"),
    ("TOKENGUARD_SEAL_GRACE_S", "-1"), ("TOKENGUARD_SEAL_GRACE_S", "soon"), ("TOKENGUARD_ALLOW_SHORT_RETENTION", "maybe"),
])
def test_invalid_retention_settings_name_their_variable(variable: str, value: str) -> None:
    with pytest.raises(SettingsError, match=variable):
        AggregatorSettings.read({variable: value})


@pytest.mark.parametrize("fields", [{"longest_period_s": 0.0}, {"seal_grace_s": -1.0}, {"longest_period_s": 1e12}])
def test_the_config_refuses_impossible_periods(fields: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="longest_period_s"):
        AggregatorConfig(**fields)


@pytest.mark.parametrize("retention", ["-1", str(63 * DAY_MS), str(62 * DAY_MS + 6 * 3_600_000)])
def test_infinite_or_long_enough_retention_is_no_problem(retention: str) -> None:
    assert retention_problem("tokenguard.usage", {"retention.ms": retention}, **MONTH) is None


def test_a_short_retention_is_one_line_saying_what_why_and_how_to_fix() -> None:
    line = retention_problem("tokenguard.usage", {"retention.ms": str(30 * DAY_MS)}, **MONTH, bootstrap="kafka:9092")
    assert line is not None and "\n" not in line
    assert line.startswith("topic 'tokenguard.usage' keeps events 30 days (retention.ms=2592000000) but needs at least "
                           "62.25 days: the longest period (31 days) plus the seal grace (6 h)"), line
    assert "verify or replay the previous one" in line
    assert ("kafka-configs --bootstrap-server kafka:9092 --alter --entity-type topics --entity-name tokenguard.usage "
            f"--add-config retention.ms={63 * DAY_MS}") in line
    assert line.endswith("or set TOKENGUARD_ALLOW_SHORT_RETENTION=true to start anyway")
    just_short = retention_problem("t", {"retention.ms": str(62 * DAY_MS + 6 * 3_600_000 - 1)}, **MONTH)
    assert just_short is not None
    assert retention_problem("t", {"retention.ms": "soon"}, **MONTH) == "topic 't' has retention.ms='soon', not a number of milliseconds"
    # The broker always describes retention.ms; a topic it does not describe is not judged here.
    assert retention_problem("t", {}, **MONTH) is None


def test_a_retention_bytes_limit_is_a_warning() -> None:
    assert retention_bytes_warning("t", {"retention.bytes": "-1"}) is None
    assert retention_bytes_warning("t", {}) is None
    warning = retention_bytes_warning("t", {"retention.bytes": "1073741824"})
    assert warning is not None and "\n" not in warning
    assert "retention.bytes=1073741824" in warning and "whatever their age" in warning and "-1" in warning


def test_the_retention_error_is_an_aggregator_error_so_the_cli_exits_1_with_its_line() -> None:
    from aggregator.cli import EXIT_PROBLEM, exit_code
    from transport.connection import KafkaConnection

    assert issubclass(RetentionError, AggregatorError)
    assert exit_code(RetentionError("topic 'x' keeps"), KafkaConnection()) == (EXIT_PROBLEM, "topic 'x' keeps")


def test_a_usage_topic_on_producer_timestamps_is_warned_about() -> None:
    from schemas.topics import timestamp_warning

    assert timestamp_warning("t.usage", {"message.timestamp.type": "LogAppendTime"}) is None
    for configs in ({"message.timestamp.type": "CreateTime"}, {}):
        line = timestamp_warning("t.usage", configs, bootstrap="k:9092")
        assert line is not None and "\n" not in line
        assert "--add-config message.timestamp.type=LogAppendTime" in line and "k:9092" in line
