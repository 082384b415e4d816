"""Test helpers shared by the integration tests."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from aiokafka import AIOKafkaProducer
from aiokafka.structs import ConsumerRecord

from aggregator.config import AggregatorConfig
from producer.store import CallUsage
from schemas.usage import UsageEvent
from transport.connection import KafkaConnection

REPO = Path(__file__).resolve().parent.parent
_ids = itertools.count()


def make_event(tenant: str, tokens: int, *, period: str = "2026-04", quota: int = 10**12) -> UsageEvent:
    return UsageEvent(
        event_id=f"test{next(_ids):012d}", tenant_id=tenant, period_key=period, total_tokens=tokens,
        input_tokens=tokens // 3, output_tokens=tokens - tokens // 3, quota_tokens=quota,
        event_time=datetime.now(UTC), instance_id="test",
    )


async def send_raw(connection: KafkaConnection, topic: str, records: list[tuple[bytes | None, bytes | None]]) -> None:
    """Produce records exactly as given (keys and values as bytes), in order, to ``topic``."""
    producer = AIOKafkaProducer(**connection.client_kwargs(), acks="all", max_request_size=4 * 1024 * 1024)
    await producer.start()
    try:
        for key, value in records:
            await producer.send_and_wait(topic, value, key=key)
    finally:
        await producer.stop()


class AggregatorProcess:
    """``python -m aggregator`` as a child process, to be killed for real."""

    def __init__(self, config: AggregatorConfig, *, instance_id: str | None = None, env: dict[str, str] | None = None) -> None:
        self.config = config
        self.instance_id = instance_id
        self.env = env or {}
        self.process: asyncio.subprocess.Process | None = None
        self.log_path = REPO / ".cache" / "test-logs" / f"{config.topics.prefix}{instance_id or 'agg'}.log"

    async def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        args = [
            sys.executable, "-m", "aggregator",
            "--bootstrap-servers", self.config.connection.bootstrap_servers,
            "--topic-prefix", self.config.topics.prefix,
            "--partitions", str(self.config.topics.partitions),
            "--group-id", self.config.group_id,
            "--log-level", "INFO",
        ]
        if self.instance_id:
            args += ["--instance-id", self.instance_id]
        log = open(self.log_path, "ab")  # noqa: SIM115, ASYNC230 - handed to the child; a local file
        try:
            self.process = await asyncio.create_subprocess_exec(
                *args, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), **self.env},
                stdout=log, stderr=log, stdin=asyncio.subprocess.DEVNULL,
            )
        finally:
            log.close()

    async def kill(self) -> None:
        """SIGKILL: no flush, no leave-group, no goodbye."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        await self.process.wait()

    async def terminate(self, timeout: float = 30) -> int:
        assert self.process is not None
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(self.process.wait(), timeout)


async def eventually(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    """Re-check ``predicate`` every 10 ms until it holds; fail with ``what`` after ``timeout``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout}s")
        await asyncio.sleep(0.01)


async def read_topic(connection: KafkaConnection, topic: str) -> list[ConsumerRecord]:
    """Every record of ``topic`` up to its current end."""
    from transport.admin import topic_partitions
    from transport.reading import read_ranges

    records: list[ConsumerRecord] = []
    partitions = await topic_partitions(connection, topic)
    async for batch in read_ranges(connection, topic, {p: (None, None) for p in partitions}):
        records.extend(batch)
    return records


def call_usage(tenant: str, tokens: int, *, period: str = "2026-04", quota: int = 500) -> CallUsage:
    """What the middleware hands a store after one call, for tests that drive a store directly."""
    return CallUsage(
        tenant_id=tenant, period_key=period, model="m", input_tokens=None, output_tokens=None, total_tokens=tokens,
        cache_creation_input_tokens=None, cache_read_input_tokens=None, reasoning_output_tokens=None,
        quota_tokens=quota, streaming=False, event_time=datetime.now(UTC),
    )


class _RawHeaderName(str):
    """A header name that encodes to bytes that are not UTF-8, as other clients may write."""

    raw: bytes

    def __new__(cls, raw: bytes) -> _RawHeaderName:
        name = super().__new__(cls, "raw")
        name.raw = raw
        return name

    def encode(self, encoding: str = "utf-8", errors: str = "strict") -> bytes:  # type: ignore[override]
        return self.raw


async def send_with_raw_header_name(
    connection: KafkaConnection, topic: str, key: bytes, value: bytes, raw_name: bytes = b"\xff\xfe\x80"
) -> None:
    """Produce one record whose header name is ``raw_name`` (not UTF-8): the broker accepts it,
    aiokafka's reader cannot parse it. aiokafka's own builder refuses such a name, so this swaps in
    its pure-Python builder, which encodes the name through ``str.encode``, for one send."""
    from aiokafka.producer import message_accumulator
    from aiokafka.producer import producer as producer_module
    from aiokafka.record import default_records

    modules = (message_accumulator, producer_module)
    saved = [module.DefaultRecordBatchBuilder for module in modules]
    for module in modules:
        module.DefaultRecordBatchBuilder = default_records._DefaultRecordBatchBuilderPy
    producer = AIOKafkaProducer(**connection.client_kwargs(), acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(topic, value, key=key, headers=[(_RawHeaderName(raw_name), b"x")])
    finally:
        await producer.stop()
        for module, builder in zip(modules, saved, strict=True):
            module.DefaultRecordBatchBuilder = builder


class RawRecord:
    """One record to produce exactly as given: key, value, headers (values may be None) and an
    explicit partition (None: the producer's default partitioner, murmur2 of the key)."""

    __slots__ = ("headers", "key", "partition", "value")

    def __init__(
        self,
        key: bytes | None,
        value: bytes | None,
        headers: list[tuple[str, bytes | None]] | None = None,
        partition: int | None = None,
    ) -> None:
        self.key, self.value, self.headers, self.partition = key, value, list(headers or []), partition


async def send_records(connection: KafkaConnection, topic: str, records: list[RawRecord]) -> list[tuple[int, int]]:
    """Produce ``records`` in order (per partition) and return each one's (partition, offset)."""
    producer = AIOKafkaProducer(
        **connection.client_kwargs(), acks="all", enable_idempotence=True, max_request_size=4 * 1024 * 1024
    )
    await producer.start()
    try:
        futures = [
            await producer.send(topic, r.value, key=r.key, headers=r.headers or None, partition=r.partition)
            for r in records
        ]
        metadata = await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return [(m.partition, m.offset) for m in metadata]


async def send_raw_header_record(
    connection: KafkaConnection, topic: str, key: bytes, value: bytes, partition: int, raw_name: bytes = b"\xff\xfe\x80"
) -> int:
    """Like ``send_with_raw_header_name``, but safe while other producers run in this process
    (that one swaps aiokafka's batch builder for the whole send, and an idempotent producer that
    builds a batch meanwhile fails its sender); returns the record's offset. The pure-Python
    builder is swapped in only for the synchronous ``create_batch()`` call of a producer of its own."""
    from aiokafka.producer import message_accumulator
    from aiokafka.record import default_records

    producer = AIOKafkaProducer(**connection.client_kwargs(), acks="all", enable_idempotence=False)
    await producer.start()
    try:
        saved = message_accumulator.DefaultRecordBatchBuilder
        message_accumulator.DefaultRecordBatchBuilder = default_records._DefaultRecordBatchBuilderPy
        try:
            batch = producer.create_batch()  # no await in between: no other task sees the swap
        finally:
            message_accumulator.DefaultRecordBatchBuilder = saved
        batch.append(timestamp=None, key=key, value=value, headers=[(_RawHeaderName(raw_name), b"x")])
        metadata = await (await producer.send_batch(batch, topic, partition=partition))
    finally:
        await producer.stop()
    return int(metadata.offset)
