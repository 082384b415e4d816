"""Degraded start without a broker: Kafka unreachable (a closed local port), the store starts
within its bound with decisions by the staleness policy and usage on disk, or, strict, raises a
TokenGuardError chained from the Kafka client's error."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import pytest
from aiokafka.errors import KafkaError

from producer import KafkaQuotaStore, ProducerConfig, TokenGuardError
from producer.config import KafkaConnection
from producer.errors import KafkaUnavailableError
from producer.spool import Spool
from schemas.topics import TopicLayout
from schemas.wire import decode_usage
from tests.helpers import call_usage, free_port


def unreachable(tmp_path: Path, **changes: object) -> ProducerConfig:
    config = ProducerConfig(
        connection=KafkaConnection(bootstrap_servers=f"127.0.0.1:{free_port()}"),
        topics=TopicLayout(prefix="degraded.", partitions=3),
        instance_id="degraded-unit", spool_dir=tmp_path / "spool", start_timeout_s=2.0,
    )
    return replace(config, **changes)  # type: ignore[arg-type]


def test_settings_from_the_environment() -> None:
    config = ProducerConfig.from_env({"TOKENGUARD_START_TIMEOUT_S": "7.5", "TOKENGUARD_STRICT_START": "true"})
    assert config.start_timeout_s == 7.5 and config.strict_start is True
    default = ProducerConfig.from_env({})
    assert default.start_timeout_s == 5.0 and default.strict_start is False
    with pytest.raises(ValueError, match="TOKENGUARD_START_TIMEOUT_S"):
        ProducerConfig.from_env({"TOKENGUARD_START_TIMEOUT_S": "0"})


async def test_unreachable_kafka_starts_degraded_and_stop_keeps_the_usage_on_disk(tmp_path: Path) -> None:
    store = KafkaQuotaStore(unreachable(tmp_path))
    began = time.monotonic()
    await store.start()
    assert time.monotonic() - began < store.config.start_timeout_s + 1
    assert store.degraded and store.stats.degraded_starts == 1 and store.publisher.offline
    decision = store.check("acme", "2026-04", 1_000)
    assert decision.allowed and store.is_stale("acme"), "no heartbeat yet: stale, keep_known admits"
    store.record(call_usage("acme", 600, period="2026-04", quota=1_000))
    assert store.snapshot.used("acme", "2026-04") == 600 and store.check("acme", "2026-04", 1_000).allowed
    store.record(call_usage("acme", 500, period="2026-04", quota=1_000))
    assert not store.check("acme", "2026-04", 1_000).allowed, "keep_known counts this process's own spend"
    stopping = time.monotonic()
    await store.stop()
    assert time.monotonic() - stopping < 2, "stop() while degraded is prompt"
    assert not store.degraded and store.stats.degraded_s > 0
    spool = Spool(tmp_path / "spool", 256 * 1024 * 1024)
    spool.open()
    events = [decode_usage(line) for line in spool.peek(100)]
    spool.close()
    assert sorted(e.total_tokens for e in events) == [500, 600], "every recorded call is spooled"


@pytest.mark.parametrize("why", ["strict_start", "no_spool"])
async def test_strict_start_raises_a_tokenguard_error_within_the_bound(tmp_path: Path, why: str) -> None:
    config = unreachable(tmp_path, strict_start=True) if why == "strict_start" else unreachable(tmp_path, spool_dir=None)
    store = KafkaQuotaStore(config)
    began = time.monotonic()
    with pytest.raises(KafkaUnavailableError) as raised:
        await store.start()
    assert time.monotonic() - began < config.start_timeout_s + 1
    assert isinstance(raised.value, TokenGuardError) and not isinstance(raised.value, KafkaError)
    assert isinstance(raised.value.__cause__, KafkaError | OSError)
    assert config.connection.bootstrap_servers in str(raised.value)
    assert not store.degraded
    await store.stop()
