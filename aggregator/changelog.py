"""Read the totals changelog back: to restore owned partitions, or to see every tenant's totals."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from aiokafka import AIOKafkaConsumer, TopicPartition

from aggregator.errors import RestoreError
from producer.config import KafkaConnection
from producer.kafka_admin import topic_partitions
from schemas.errors import DecodeError
from schemas.totals import TotalsRecord
from schemas.wire import decode_totals

log = logging.getLogger(__name__)


async def read_changelog(
    connection: KafkaConnection, topic: str, partitions: Iterable[int] | None = None, *, timeout_s: float = 60.0
) -> dict[tuple[str, str], TotalsRecord]:
    """The latest record per (tenant, period) in ``partitions`` (all when None), read to the end
    the topic had when the call began."""
    if partitions is None:
        partitions = await topic_partitions(connection, topic)
    consumer = AIOKafkaConsumer(
        **connection.client_kwargs(),
        client_id="tokenguard-changelog-reader",
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=50,
    )
    await consumer.start()
    latest: dict[tuple[str, str], TotalsRecord] = {}
    try:
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        if not tps:
            return latest
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        pending = {tp for tp in tps if ends[tp] > 0}
        undecodable = 0
        deadline = time.monotonic() + timeout_s
        while pending:
            if time.monotonic() > deadline:
                raise RestoreError(f"reading {topic} did not reach its end within {timeout_s}s")
            batches = await consumer.getmany(*pending, timeout_ms=200, max_records=50_000)
            for records in batches.values():
                for record in records:
                    try:
                        totals = decode_totals(record.value)
                    except DecodeError as exc:
                        undecodable += 1
                        log.error("undecodable totals record at %s:%d: %s", topic, record.offset, exc)
                        continue
                    latest[(totals.tenant_id, totals.period_key)] = totals
            for tp in list(pending):
                if await consumer.position(tp) >= ends[tp]:
                    pending.discard(tp)
        return latest
    finally:
        await consumer.stop()
