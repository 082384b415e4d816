from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path

import pytest

from aggregator.config import AggregatorConfig, AggregatorSettings
from producer import KafkaConnection, KafkaQuotaStore, ProducerConfig
from producer.config import ProducerSettings, default_spool_dir
from schemas.topics import TopicLayout
from tests.helpers import REPO
from transport.connection import KafkaSettings, SettingsError


def test_secrets_never_appear_in_reprs_or_logs(caplog: pytest.LogCaptureFixture) -> None:
    env = {
        "KAFKA_BOOTSTRAP_SERVERS": "broker:9093",
        "KAFKA_SECURITY_PROTOCOL": "sasl_ssl",
        "KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
        "KAFKA_SASL_USERNAME": "billing",
        "KAFKA_SASL_PASSWORD": "hunter2-very-secret",
        "KAFKA_SSL_PASSWORD": "keystore-secret",
    }
    connection = KafkaConnection.from_env(env)
    producer_config = ProducerConfig.from_env(env)
    aggregator_config = AggregatorConfig.from_env(env)
    with caplog.at_level(logging.DEBUG):
        logging.getLogger("test").info("config %r %s %r", connection, producer_config, aggregator_config)
    texts = [repr(connection), str(connection), repr(producer_config), repr(aggregator_config),
             repr(KafkaQuotaStore(producer_config)), caplog.text]
    for text in texts:
        assert "hunter2" not in text and "keystore-secret" not in text
    assert connection.security_protocol == "SASL_SSL" and connection.sasl_username == "billing"


def test_client_kwargs_pass_sasl_through() -> None:
    connection = KafkaConnection.from_env({
        "KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "KAFKA_SASL_MECHANISM": "PLAIN",
        "KAFKA_SASL_USERNAME": "u", "KAFKA_SASL_PASSWORD": "p",
    })
    kwargs = connection.client_kwargs()
    assert (kwargs["sasl_mechanism"], kwargs["sasl_plain_username"], kwargs["sasl_plain_password"]) == ("PLAIN", "u", "p")


def test_bad_policies_are_refused_at_construction() -> None:
    with pytest.raises(ValueError, match="stale_policy"):
        ProducerConfig(stale_policy="sometimes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="warning_ratio"):
        AggregatorConfig(warning_ratio=1.5)


# -- settings from the environment: typed, bounded, one readable line per bad value ---------------


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"TOKENGUARD_PARTITIONS": "abc"}, "TOKENGUARD_PARTITIONS"),
        ({"TOKENGUARD_PARTITIONS": "0"}, "TOKENGUARD_PARTITIONS"),
        ({"TOKENGUARD_WARNING_RATIO": "2"}, "TOKENGUARD_WARNING_RATIO"),
        ({"TOKENGUARD_WARNING_RATIO": "nan"}, "TOKENGUARD_WARNING_RATIO"),
        ({"KAFKA_SECURITY_PROTOCOL": "bogus"}, "KAFKA_SECURITY_PROTOCOL"),
        ({"KAFKA_SASL_MECHANISM": "ROT13", "KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "KAFKA_SASL_USERNAME": "u",
          "KAFKA_SASL_PASSWORD": "p"}, "KAFKA_SASL_MECHANISM"),
        ({"KAFKA_SSL_CAFILE": "/no/such/ca.pem"}, "KAFKA_SSL_CAFILE"),
        ({"TOKENGUARD_TOPIC_PREFIX": "tg\x1b[2J"}, "TOKENGUARD_TOPIC_PREFIX"),
        ({"TOKENGUARD_IDEMPOTENCE": "perhaps"}, "TOKENGUARD_IDEMPOTENCE"),
        ({"TOKENGUARD_GROUP_ID": "g\nfake"}, "TOKENGUARD_GROUP_ID"),
        ({"TOKENGUARD_DEFAULT_LIMIT": "-1"}, "TOKENGUARD_DEFAULT_LIMIT"),
        ({"TOKENGUARD_METRICS_PORT": "70000"}, "TOKENGUARD_METRICS_PORT"),
        ({"TOKENGUARD_SESSION_TIMEOUT_MS": "soon"}, "TOKENGUARD_SESSION_TIMEOUT_MS"),
        ({"TOKENGUARD_REASSERT_INTERVAL_S": "inf"}, "TOKENGUARD_REASSERT_INTERVAL_S"),
    ],
)
def test_a_bad_aggregator_variable_is_one_line_naming_it(env: dict[str, str], variable: str) -> None:
    with pytest.raises(SettingsError) as caught:
        AggregatorConfig.from_env(env)
    message = str(caught.value)
    assert message.startswith(variable) and "\n" not in message and "\x1b" not in message, message
    assert [name for name, _ in caught.value.problems] == [variable]
    assert isinstance(caught.value, ValueError), "callers that caught ValueError still do"


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"TOKENGUARD_SPOOL_MAX_BYTES": "1GB"}, "TOKENGUARD_SPOOL_MAX_BYTES"),
        ({"TOKENGUARD_SPOOL_FULL_POLICY": "panic"}, "TOKENGUARD_SPOOL_FULL_POLICY"),
        ({"TOKENGUARD_STALE_AFTER_S": "-1"}, "TOKENGUARD_STALE_AFTER_S"),
        ({"TOKENGUARD_STALE_POLICY": "sometimes"}, "TOKENGUARD_STALE_POLICY"),
        ({"TOKENGUARD_MAX_CLOCK_SKEW_S": "0"}, "TOKENGUARD_MAX_CLOCK_SKEW_S"),
        ({"TOKENGUARD_INSTANCE_ID": "host\x1b[2J"}, "TOKENGUARD_INSTANCE_ID"),
    ],
)
def test_a_bad_middleware_variable_is_one_line_naming_it(env: dict[str, str], variable: str) -> None:
    with pytest.raises(SettingsError) as caught:
        ProducerConfig.from_env(env)
    assert str(caught.value).startswith(variable) and "\n" not in str(caught.value), caught.value


def test_every_bad_value_is_named_at_once() -> None:
    with pytest.raises(SettingsError) as caught:
        AggregatorConfig.from_env({"TOKENGUARD_PARTITIONS": "abc", "TOKENGUARD_WARNING_RATIO": "2"})
    assert {name for name, _ in caught.value.problems} == {"TOKENGUARD_PARTITIONS", "TOKENGUARD_WARNING_RATIO"}


def test_values_given_in_code_or_by_flags_win_and_are_named_by_field() -> None:
    env = {"TOKENGUARD_PARTITIONS": "12", "TOKENGUARD_GROUP_ID": "from-env"}
    config = AggregatorConfig.from_env(env, partitions=3, group_id=None)
    assert (config.topics.partitions, config.group_id) == (3, "from-env"), "None is no override"
    with pytest.raises(SettingsError) as caught:
        AggregatorSettings.read(env, partitions=0)
    assert [name for name, _ in caught.value.problems] == ["partitions"]


def test_a_sasl_protocol_without_credentials_is_refused_and_the_password_never_shown() -> None:
    with pytest.raises(SettingsError, match="KAFKA_SASL_USERNAME") as caught:
        KafkaConnection.from_env({"KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "KAFKA_SASL_PASSWORD": "hunter2"})
    assert "hunter2" not in str(caught.value)


def test_empty_variables_are_unset_except_the_spool_dir(tmp_path: Path) -> None:
    empty = {name: "" for name in (*AggregatorSettings.variables().values(), *ProducerSettings.variables().values())}
    assert AggregatorConfig.from_env(empty).topics == TopicLayout()
    producer_config = ProducerConfig.from_env(empty)
    assert producer_config.spool_dir is None, "an empty TOKENGUARD_SPOOL_DIR means no spool"
    assert producer_config.instance_id and producer_config.idempotence
    assert ProducerConfig.from_env({}).spool_dir == default_spool_dir()
    assert ProducerConfig.from_env({"TOKENGUARD_SPOOL_DIR": str(tmp_path)}).spool_dir == tmp_path


def test_a_given_mapping_is_the_whole_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKENGUARD_PARTITIONS", "9")
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", "elsewhere:9092")
    assert AggregatorConfig.from_env({}).topics.partitions == TopicLayout().partitions
    assert AggregatorConfig.from_env().topics.partitions == 9
    assert ProducerConfig.from_env().connection.bootstrap_servers == "elsewhere:9092"


def test_variable_names_are_exact() -> None:
    assert AggregatorConfig.from_env({"tokenguard_partitions": "9"}).topics.partitions == TopicLayout().partitions


def test_settings_and_configs_stay_in_step() -> None:
    """Every setting reaches its config field, and the documented variables are the ones read."""
    from aggregator.cli.options import CliSettings

    variables = {*CliSettings.variables().values(), *ProducerSettings.variables().values()}
    readme = (REPO / "README.md").read_text()
    table = readme[readme.index("## Configuration"):readme.index("## Performance")]
    documented = set(re.findall(r"`((?:KAFKA|TOKENGUARD)_[A-Z_]+)`", table))
    assert documented and documented <= variables, documented - variables
    config_fields = {f.name for f in dataclasses.fields(AggregatorConfig)} | {"bootstrap_servers"}
    for name in set(AggregatorSettings.model_fields) - set(KafkaSettings.model_fields) - {"topic_prefix", "partitions"}:
        assert name in config_fields, name


def test_configs_stay_dataclasses() -> None:
    config = AggregatorConfig.from_env({"TOKENGUARD_GROUP_ID": "g"})
    assert dataclasses.replace(config, warning_ratio=0.5).group_id == "g"
    producer_config = ProducerConfig(connection=KafkaConnection(bootstrap_servers="b:1"), instance_id="i", spool_dir=None)
    assert dataclasses.replace(producer_config, stale_after_s=2.0).connection.bootstrap_servers == "b:1"
