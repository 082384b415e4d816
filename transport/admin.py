"""Create the deployment's topics when missing and check them when present (admin client, thin)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaError

from schemas.topics import TopicLayout, retention_bytes_warning, retention_problem, timestamp_warning
from transport.connection import KafkaConnection
from transport.errors import TopicMismatchError

log = logging.getLogger(__name__)

_ALREADY_EXISTS = 36


async def ensure_topics(connection: KafkaConnection, layout: TopicLayout) -> dict[str, int]:
    """Create missing topics, verify existing ones; return partitions per topic name.

    Safe to run from many processes at once: a topic created by another process in between is
    accepted, then checked like any existing one.
    """
    admin = AIOKafkaAdminClient(**connection.client_kwargs(), client_id="tokenguard-admin")
    await admin.start()
    try:
        specs = layout.specs()
        existing = set(await admin.list_topics())
        missing = [spec for spec in specs if spec.name not in existing]
        if missing:
            replication = layout.replication_factor or await _cluster_replication(admin)
            response = await admin.create_topics(
                [NewTopic(s.name, s.partitions, replication, topic_configs=s.configs) for s in missing]
            )
            for name, code, message in response.topic_errors:
                if code not in (0, _ALREADY_EXISTS):
                    raise TopicMismatchError(f"creating topic {name!r} failed: error {code}: {message}")
            log.info("created topics %s", ", ".join(s.name for s in missing))
        partitions = await _wait_for_leaders(admin, [s.name for s in specs])
        configs = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, s.name) for s in specs])
    finally:
        await admin.close()
    policies = {
        resource[3]: {entry[0]: entry[1] for entry in resource[4]}.get("cleanup.policy")
        for response in configs
        for resource in response.resources
    }
    for spec in specs:
        if spec.name not in partitions:
            raise TopicMismatchError(f"topic {spec.name!r} is not available")
        wanted = spec.configs["cleanup.policy"]
        if policies.get(spec.name) != wanted:
            raise TopicMismatchError(
                f"topic {spec.name!r} has cleanup.policy={policies.get(spec.name)!r}; it needs {wanted!r}"
            )
    if partitions[layout.usage] != partitions[layout.totals]:
        raise TopicMismatchError(
            f"{layout.totals!r} has {partitions[layout.totals]} partitions but {layout.usage!r} has "
            f"{partitions[layout.usage]}: the totals changelog must be co-partitioned with usage"
        )
    return partitions


async def _cluster_replication(admin: AIOKafkaAdminClient) -> int:
    """The replication a topic gets when the layout does not say: three copies once the cluster
    has three brokers (what survives one broker lost with ``min.insync.replicas`` 2), else one
    per broker."""
    cluster = await admin.describe_cluster()
    return min(3, max(1, len(cluster["brokers"])))


async def _wait_for_leaders(admin: AIOKafkaAdminClient, names: list[str], timeout: float = 30.0) -> dict[str, int]:
    """Partitions per topic, once every partition of every topic has a leader.

    Right after creation a topic can be listed before its partitions have leaders; clients that
    start in that window fail their first requests.
    """
    deadline = time.monotonic() + timeout
    while True:
        described = await admin.describe_topics(names)
        ready = {
            d["topic"]: len(d["partitions"])
            for d in described
            if d["error_code"] == 0 and d["partitions"] and all(p["leader"] >= 0 for p in d["partitions"])
        }
        if len(ready) == len(names) or time.monotonic() > deadline:
            return ready
        await asyncio.sleep(0.1)


async def topic_partitions(connection: KafkaConnection, topic: str) -> list[int]:
    """The partition ids of ``topic``; ``TopicMismatchError`` when it does not exist."""
    admin = AIOKafkaAdminClient(**connection.client_kwargs(), client_id="tokenguard-admin")
    await admin.start()
    try:
        described = await admin.describe_topics([topic])
    finally:
        await admin.close()
    found = [d for d in described if d["topic"] == topic and d["error_code"] == 0]
    if not found:
        raise TopicMismatchError(f"topic {topic!r} does not exist; create the topics first (the aggregator does)")
    return sorted(p["partition"] for p in found[0]["partitions"])


async def topic_config(connection: KafkaConnection, topic: str) -> dict[str, str]:
    """``topic``'s configuration as the broker describes it (its own settings and the broker
    defaults it inherits, e.g. ``retention.ms``); ``TopicMismatchError`` when it does not exist."""
    admin = AIOKafkaAdminClient(**connection.client_kwargs(), client_id="tokenguard-admin")
    await admin.start()
    try:
        responses = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)])
    finally:
        await admin.close()
    for response in responses:
        for error_code, _message, _type, name, entries in response.resources:
            if name == topic:
                if error_code != 0:
                    raise TopicMismatchError(f"topic {topic!r}: describing its configuration failed: error {error_code}")
                return {entry[0]: entry[1] for entry in entries if entry[1] is not None}
    raise TopicMismatchError(f"topic {topic!r} does not exist; create the topics first (the aggregator does)")


async def retention_findings(
    connection: KafkaConnection, topic: str, *, longest_period_s: float, seal_grace_s: float
) -> tuple[str | None, str | None]:
    """(problem, warning) about the usage topic's retention, each one line or None: the problem when
    its ``retention.ms`` is shorter than its periods need (``schemas.topics.retention_problem``), the
    warning when a ``retention.bytes`` limit can delete events whatever their age."""
    configs = await topic_config(connection, topic)
    problem = retention_problem(topic, configs, longest_period_s=longest_period_s, seal_grace_s=seal_grace_s,
                                bootstrap=connection.bootstrap_servers)
    warnings = [retention_bytes_warning(topic, configs),
                timestamp_warning(topic, configs, bootstrap=connection.bootstrap_servers)]
    return problem, "; ".join(w for w in warnings if w) or None


async def reached(consumer: AIOKafkaConsumer, ends: dict[TopicPartition, int]) -> bool:
    """True once the consumer's position in every partition is at or past the given end offset."""
    for tp, end in ends.items():
        if await consumer.position(tp) < end:
            return False
    return True


async def committed_offsets(connection: KafkaConnection, group_id: str, topic: str | None = None) -> dict[int, int]:
    """A consumer group's committed offsets per partition (of ``topic``, or of the only topic it reads).

    Through the admin client, so it is safe inside a rebalance callback, where the group's own
    consumer cannot make coordinator requests.
    """
    admin = AIOKafkaAdminClient(**connection.client_kwargs(), client_id="tokenguard-admin")
    await admin.start()
    deadline = time.monotonic() + 30
    try:
        while True:
            try:
                offsets = await admin.list_consumer_group_offsets(group_id)
                break
            except KafkaError as exc:
                # A broker's first group creates the offsets topic; until then there is no coordinator.
                if not exc.retriable or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)
    finally:
        await admin.close()
    return {
        tp.partition: meta.offset for tp, meta in offsets.items() if (topic is None or tp.topic == topic) and meta.offset >= 0
    }


async def close_consumer(consumer: AIOKafkaConsumer) -> None:
    """``consumer.stop()``, minus one aiokafka quirk: while the broker is unreachable its fetch task
    sits in a retry back-off, and stop() cancels it and re-raises that task's CancelledError."""
    try:
        await consumer.stop()
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise  # we are being cancelled ourselves
        log.debug("aiokafka consumer stop() surfaced its fetch task's cancellation; ignored")


async def start_consumer(consumer: AIOKafkaConsumer) -> AIOKafkaConsumer:
    """``consumer.start()``; if it fails (broker unreachable, TLS refused) the half-started consumer
    is closed before the error propagates, instead of leaking its connections."""
    try:
        await consumer.start()
    except BaseException:
        await close_consumer(consumer)
        raise
    return consumer


class LastWarning(logging.Handler):
    """The last warning a logger emitted: aiokafka's own account of why a connection failed."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.last: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.WARNING:
            self.last = record.getMessage()


@contextlib.contextmanager
def aiokafka_quieted() -> Iterator[LastWarning]:
    """aiokafka's per-attempt warnings kept out of the log while a probe runs (the caller says it in
    one line of its own), the last one kept for that line."""
    capture = LastWarning()
    logger = logging.getLogger("aiokafka")
    logger.addHandler(capture)
    propagate, logger.propagate = logger.propagate, False
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield capture
    finally:
        logger.removeHandler(capture)
        logger.propagate = propagate
        logger.setLevel(level)
