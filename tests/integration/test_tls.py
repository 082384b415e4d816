"""Every Kafka client of ours over TLS, against the local broker with a throwaway CA made here."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import pytest
from aiokafka.errors import KafkaConnectionError

import localkafka
from aggregator import AggregatorConfig, AggregatorService
from aggregator.changelog import read_changelog
from producer import KafkaConnection, KafkaQuotaStore, ProducerConfig
from schemas.topics import TopicLayout
from tests.helpers import call_usage, eventually, free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # each test starts a broker of its own


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_ca_and_server_cert(folder: Path) -> tuple[Path, Path]:
    """A CA, and a broker certificate for 127.0.0.1 signed by it; returns (ca.pem, keystore.pem)."""
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
            "-subj", "/CN=tokenguard-test-ca", cwd=folder)
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
            "-subj", "/CN=127.0.0.1", cwd=folder)
    (folder / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "server.pem", "-days", "1", "-extfile", "san.ext", cwd=folder)
    openssl("pkcs8", "-topk8", "-nocrypt", "-in", "server.key", "-out", "server.pk8", cwd=folder)
    keystore = folder / "keystore.pem"
    keystore.write_text((folder / "server.pk8").read_text() + (folder / "server.pem").read_text())
    return folder / "ca.pem", keystore


async def refused(attempt: Coroutine[Any, Any, object], why: str, caplog: pytest.LogCaptureFixture) -> None:
    """``attempt`` fails with aiokafka's "Unable to bootstrap" connection error (not a timeout), and
    the client's log says ``why``: the handshake refused it, not a broker that is down."""
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="aiokafka"), pytest.raises(KafkaConnectionError, match="Unable to bootstrap"):
        await asyncio.wait_for(attempt, 20)
    assert why in caplog.text, caplog.text


@pytest.mark.timeout(180)  # a broker of its own: its start alone is bounded at 90 s
async def test_publisher_feed_aggregator_and_admin_over_tls(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        pytest.skip("adds a TLS listener to its own broker: needs the local launcher")
    ca, keystore = make_ca_and_server_cert(tmp_path)
    tls_port = free_port()
    broker = await asyncio.to_thread(localkafka.start, None, tls=localkafka.TlsListener(tls_port, keystore))
    try:
        connection = KafkaConnection(bootstrap_servers=f"127.0.0.1:{tls_port}", security_protocol="SSL", ssl_cafile=str(ca))
        layout = TopicLayout(prefix="tls.", partitions=2)
        aggregator_config = AggregatorConfig(connection=connection, topics=layout, group_id="tls-aggregator",
                                             heartbeat_interval_s=0.2)
        producer_config = ProducerConfig(connection=connection, topics=layout, spool_dir=tmp_path / "spool")
        async with AggregatorService(aggregator_config) as aggregator, KafkaQuotaStore(producer_config) as store:
            await asyncio.wait_for(aggregator.assigned.wait(), 30)
            store.record(call_usage("acme", 700, period="p"))
            await store.feed.wait_until(lambda s: (n := s.notice("acme", "p")) is not None and n.state == "exceeded", 30)
            await eventually(lambda: aggregator.stats.events == 1, 30, "event applied over TLS")
        totals = await read_changelog(connection, layout.totals)
        assert totals[("acme", "p")].used_tokens == 700
        # Without the CA the broker's certificate is refused: the TLS is real.
        untrusted = KafkaConnection(bootstrap_servers=f"127.0.0.1:{tls_port}", security_protocol="SSL")
        await refused(read_changelog(untrusted, layout.totals, [0]), "CERTIFICATE_VERIFY_FAILED", caplog)
    finally:
        await asyncio.to_thread(localkafka.stop, broker.port)


@pytest.mark.timeout(180)
async def test_pipeline_over_sasl_plain_and_a_wrong_password_is_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        pytest.skip("adds a SASL listener to its own broker: needs the local launcher")
    from pydantic import SecretStr

    sasl_port = free_port()
    broker = await asyncio.to_thread(
        localkafka.start, None, sasl=localkafka.SaslPlainListener(sasl_port, (("tokenguard", "s3cret-test-only"),))
    )
    try:
        def connection(password: str) -> KafkaConnection:
            return KafkaConnection(bootstrap_servers=f"127.0.0.1:{sasl_port}", security_protocol="SASL_PLAINTEXT",
                                   sasl_mechanism="PLAIN", sasl_username="tokenguard", sasl_password=SecretStr(password))

        good = connection("s3cret-test-only")
        layout = TopicLayout(prefix="sasl.", partitions=2)
        aggregator_config = AggregatorConfig(connection=good, topics=layout, group_id="sasl-aggregator")
        producer_config = ProducerConfig(connection=good, topics=layout, spool_dir=tmp_path / "spool")
        async with AggregatorService(aggregator_config) as aggregator, KafkaQuotaStore(producer_config) as store:
            await asyncio.wait_for(aggregator.assigned.wait(), 30)
            store.record(call_usage("acme", 3, period="p"))
            await eventually(lambda: aggregator.stats.events == 1, 30, "event applied over SASL")
        assert "s3cret" not in repr(good)
        await refused(read_changelog(connection("wrong"), layout.totals, [0]), "SaslAuthenticationFailed: Authentication failed: Invalid username or password", caplog)
    finally:
        await asyncio.to_thread(localkafka.stop, broker.port)
