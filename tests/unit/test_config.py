from __future__ import annotations

import logging

import pytest

from aggregator.config import AggregatorConfig
from producer import KafkaConnection, KafkaQuotaStore, ProducerConfig


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
