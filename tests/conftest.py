"""Shared fixtures. The broker fixture picks, in order: ``KAFKA_BOOTSTRAP_SERVERS``; a testcontainers
Kafka when a Docker engine answers; else the project's own launcher (Maven Central jars on the JVM)."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from aggregator.config import AggregatorConfig
from producer.config import KafkaConnection, ProducerConfig
from schemas.topics import TopicLayout

KAFKA_IMAGE = "apache/kafka:4.1.1"


def _docker_answers() -> bool:
    """A Docker engine answers ``GET /_ping`` on its socket (stdlib only: nothing left open)."""
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    if not host.startswith("unix://"):
        return True  # a remote engine: let testcontainers try it
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(3)
            sock.connect(host.removeprefix("unix://"))
            sock.sendall(b"GET /_ping HTTP/1.0\r\n\r\n")
            reply = sock.recv(64)
        return reply.startswith(b"HTTP/1.") and b" 200 " in reply
    except OSError:
        return False


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    configured = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if configured:
        yield configured
        return
    if _docker_answers():
        from testcontainers.kafka import KafkaContainer

        with KafkaContainer(KAFKA_IMAGE).with_kraft() as container:
            yield container.get_bootstrap_server()
        return
    import localkafka

    broker = localkafka.start(None)
    try:
        yield broker.bootstrap_servers
    finally:
        localkafka.stop(broker.port)


@pytest.fixture
def layout() -> TopicLayout:
    """Fresh topic names per test: tests share one broker but never each other's data."""
    return TopicLayout(prefix=f"t{uuid.uuid4().hex[:10]}.", partitions=3)


@pytest.fixture
def connection(kafka_bootstrap: str) -> KafkaConnection:
    return KafkaConnection(bootstrap_servers=kafka_bootstrap)


@pytest.fixture
def producer_config(connection: KafkaConnection, layout: TopicLayout, tmp_path: Path) -> ProducerConfig:
    return ProducerConfig(
        connection=connection, topics=layout, instance_id="test-a", catch_up_timeout_s=20, spool_dir=tmp_path / "spool"
    )


@pytest.fixture
def aggregator_config(connection: KafkaConnection, layout: TopicLayout) -> AggregatorConfig:
    return AggregatorConfig(
        connection=connection,
        topics=layout,
        group_id=f"{layout.prefix}aggregator",
        aggregator_id="test-aggregator",
        heartbeat_interval_s=0.2,
        # Most tests use fixed past periods (2026-04) for determinism; sealed, every event of them
        # would be an adjustment. The sealing tests turn it on (tests/integration/test_sealing.py).
        seal_periods=False,
    )
