"""What the tests share, in one place: builders of usage events, calls and records; producing
records exactly as given and reading topics back; waiting for a condition; aggregators in this
process and as child processes; our commands as child processes.

The fixtures (the broker, fresh topic names per test, the configs) are in ``tests/conftest.py``."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.partitioner import murmur2
from aiokafka.structs import ConsumerRecord

from aggregator.changelog import read_changelog
from aggregator.config import AggregatorConfig
from aggregator.service import AggregatorService
from aggregator.verify import VerifyReport, verify
from producer import InMemoryQuotaStore, QuotaExceededError, TokenGuardMiddleware
from producer.config import ProducerConfig
from producer.notices_feed import NoticesFeed
from producer.snapshot import QuotaSnapshot
from producer.store import CallUsage
from schemas.totals import TotalsRecord
from schemas.usage import UsageEvent
from transport.admin import topic_partitions
from transport.connection import KafkaConnection
from transport.reading import read_ranges

REPO = Path(__file__).resolve().parent.parent
_ids = itertools.count()

# --------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------


def make_event(tenant: str, tokens: int, *, period: str = "2026-04", quota: int = 10**12) -> UsageEvent:
    """A valid usage event with a fresh id; a third of ``tokens`` input, the rest output."""
    return UsageEvent(
        event_id=f"test{next(_ids):012d}", tenant_id=tenant, period_key=period, total_tokens=tokens,
        input_tokens=tokens // 3, output_tokens=tokens - tokens // 3, quota_tokens=quota,
        event_time=datetime.now(UTC), instance_id="test",
    )


def call_usage(tenant: str, tokens: int, *, period: str = "2026-04", quota: int = 500) -> CallUsage:
    """What the middleware hands a store after one call, for tests that drive a store directly."""
    return CallUsage(
        tenant_id=tenant, period_key=period, model="m", input_tokens=None, output_tokens=None, total_tokens=tokens,
        cache_creation_input_tokens=None, cache_read_input_tokens=None, reasoning_output_tokens=None,
        quota_tokens=quota, streaming=False, event_time=datetime.now(UTC),
    )


@dataclass
class FakeRecord:
    """A consumed record as far as the intake rules read one (no broker needed)."""

    partition: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes | None]] = field(default_factory=list)


def instance(config: ProducerConfig, name: str) -> ProducerConfig:
    """``config`` for another member of the fleet."""
    return replace(config, instance_id=name)


def partition_of(key: str | bytes, partitions: int) -> int:
    """Where Kafka's default partitioner (murmur2 of the key) puts ``key``, computed here, not by
    the product, so tests hold the product to the rule rather than to itself."""
    raw = key.encode() if isinstance(key, str) else key
    return (murmur2(raw) & 0x7FFFFFFF) % partitions


def tenant_on(partition: int, partitions: int, prefix: str) -> str:
    """The first tenant id ``<prefix><n>`` whose usage lands on ``partition``."""
    return next(f"{prefix}{i}" for i in itertools.count() if partition_of(f"{prefix}{i}", partitions) == partition)


# --------------------------------------------------------------------------------------------
# Calls through the middleware
# --------------------------------------------------------------------------------------------


async def run_agent(agent: Any, prompt: str = "Hello!", *, stream: bool = False, middleware: list[Any] | None = None) -> Any:
    """One call of ``agent`` to its end (streaming: every update, then the final response)."""
    if not stream:
        return await agent.run(prompt, middleware=middleware)
    response = agent.run(prompt, stream=True, middleware=middleware)
    async for _ in response:
        pass
    return await response.get_final_response()


async def cost_of_one_call(agent: Any) -> int:
    """The tokens the middleware records for one call of ``agent``."""
    records: list[dict[str, Any]] = []
    probe = TokenGuardMiddleware(quota_store=InMemoryQuotaStore(), quota_tokens=10**9, on_usage=records.append)
    await agent.run("Hello!", middleware=[probe])
    return int(records[0]["total_tokens"])


async def admitted_of(agent: Any, guard: TokenGuardMiddleware, calls: int = 100) -> int:
    """How many of ``calls`` concurrent calls of ``agent`` through ``guard`` were let through (the
    others raised ``QuotaExceededError``)."""

    async def one() -> bool:
        try:
            await agent.run("Hello!", middleware=[guard])
            return True
        except QuotaExceededError:
            return False

    return sum(await asyncio.gather(*(one() for _ in range(calls))))


# --------------------------------------------------------------------------------------------
# Topics: create, write exactly, read back
# --------------------------------------------------------------------------------------------


async def create_topic(connection: KafkaConnection, name: str, partitions: int = 1) -> None:
    admin = AIOKafkaAdminClient(**connection.client_kwargs())
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, partitions, 1)])
    finally:
        await admin.close()


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


async def send_raw(connection: KafkaConnection, topic: str, records: list[tuple[bytes | None, bytes | None]]) -> None:
    """Produce (key, value) pairs exactly as given, in order, on the key's default partition."""
    await send_records(connection, topic, [RawRecord(key, value) for key, value in records])


class _RawHeaderName(str):
    """A header name that encodes to bytes that are not UTF-8, as other clients may write."""

    raw: bytes

    def __new__(cls, raw: bytes) -> _RawHeaderName:
        name = super().__new__(cls, "raw")
        name.raw = raw
        return name

    def encode(self, encoding: str = "utf-8", errors: str = "strict") -> bytes:  # type: ignore[override]
        return self.raw


async def send_raw_header_record(
    connection: KafkaConnection,
    topic: str,
    key: bytes,
    value: bytes,
    partition: int | None = None,
    raw_name: bytes = b"\xff\xfe\x80",
) -> int:
    """Produce one record whose header name is ``raw_name`` (not UTF-8), on ``partition`` (None: the
    key's default partition); return its offset. The broker accepts such a record, aiokafka's reader
    cannot parse it, and aiokafka's own batch builder refuses to write it: the pure-Python builder,
    which encodes the name through ``str.encode``, is swapped in for the synchronous
    ``create_batch()`` call of a producer of its own only, so producers running meanwhile in this
    process are never affected."""
    from aiokafka.producer import message_accumulator
    from aiokafka.record import default_records

    if partition is None:
        partition = partition_of(key, len(await topic_partitions(connection, topic)))
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


async def read_topic(connection: KafkaConnection, topic: str) -> list[ConsumerRecord]:
    """Every record of ``topic`` up to its current end."""
    records: list[ConsumerRecord] = []
    partitions = await topic_partitions(connection, topic)
    async for batch in read_ranges(connection, topic, {p: (None, None) for p in partitions}):
        records.extend(batch)
    return records


def reason_of(letter: ConsumerRecord) -> str:
    """The reason a dead letter gives."""
    return bytes(dict(letter.headers)["tokenguard.error.reason"]).decode()


# --------------------------------------------------------------------------------------------
# Waiting
# --------------------------------------------------------------------------------------------


async def eventually(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    """Re-check ``predicate`` every 10 ms until it holds; fail with ``what`` after ``timeout``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout}s")
        await asyncio.sleep(0.01)


async def wait_for_totals(
    config: AggregatorConfig, expected: Mapping[tuple[str, str], int], timeout: float = 30
) -> dict[tuple[str, str], TotalsRecord]:
    """Read the totals changelog (the aggregator's durable output) until its used tokens per
    (tenant, period) are ``expected``; return its records."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        records = await read_changelog(config.connection, config.topics.totals)
        seen = {key: record.used_tokens for key, record in records.items()}
        if seen == expected:
            return records
        if loop.time() > deadline:
            raise AssertionError(f"the changelog did not reach the expected totals within {timeout}s: {seen}")
        await asyncio.sleep(0.2)


async def verified(config: AggregatorConfig, wait_s: float = 120) -> VerifyReport:
    """The independent verifier's report, once it says the group caught up with no difference."""
    report = await verify(config.connection, config.topics, config.group_id, wait_s=wait_s,
                          seal_grace_s=config.seal_grace_s if config.seal_periods else None)
    assert report.lag == 0, f"the aggregator group did not catch up: lag {report.lag}"
    assert report.differences == [], "\n".join(map(str, report.differences[:20]))
    return report


# --------------------------------------------------------------------------------------------
# Aggregators and other processes
# --------------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def running_aggregator(config: AggregatorConfig, timeout: float = 30) -> AsyncIterator[AggregatorService]:
    """An aggregator in this process that owns its partitions (restored); stopped on the way out."""
    async with AggregatorService(config) as aggregator:
        await asyncio.wait_for(aggregator.assigned.wait(), timeout)
        yield aggregator


@contextlib.asynccontextmanager
async def notices_feed(config: ProducerConfig) -> AsyncIterator[tuple[NoticesFeed, QuotaSnapshot]]:
    """What a middleware believes: a started notices feed over a fresh snapshot (caught up)."""
    snapshot = QuotaSnapshot()
    feed = NoticesFeed(config, snapshot)
    await feed.start()
    try:
        yield feed, snapshot
    finally:
        await feed.stop()


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
            "--seal-periods" if self.config.seal_periods else "--no-seal-periods",
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

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


async def run_python(*args: str, env: Mapping[str, str] | None = None, timeout: float = 60) -> tuple[int, str, str]:
    """``python <args>`` in the repository, with ``env`` over this environment; (exit code, stdout,
    stderr). A process that outlives ``timeout`` is killed and fails the test."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, *args, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise AssertionError(f"python {' '.join(args)} did not finish within {timeout}s") from None
    return await process.wait(), out.decode(), err.decode()


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
