"""``getmany`` that survives a record the Kafka client itself cannot parse.

aiokafka parses a fetched batch lazily, record by record, inside ``getmany``. A record it cannot
parse (a header whose name is not UTF-8: the broker accepts any bytes there; a corrupt batch)
raises out of ``getmany``, and every later call fetches the same batch and raises again: one
record written by any client stops the reader for good. Worse, the records of that batch parsed
before the bad one are consumed but never returned, and the next call moves the position past
them.

``getmany_safe`` turns that into data: it puts every fetched partition back where the caller last
saw it, finds the partition and offset the client cannot parse by reading one record at a time,
reports it as ``Unreadable`` and moves past it. Every other record is returned exactly once, in
order. The slow path runs only after a failure. Records drained from other partitions by the call that
failed are not lost either: every partition is put back where it was before that call.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import CorruptRecordException, IllegalStateError, KafkaError
from aiokafka.structs import ConsumerRecord

log = logging.getLogger(__name__)

Records = dict[TopicPartition, list[ConsumerRecord]]


@dataclass(frozen=True)
class Unreadable:
    """A record the client could not parse; skipped by offset, reported so it is never silent."""

    topic: str
    partition: int
    offset: int
    error: str


def _is_parse_error(exc: BaseException) -> bool:
    """Errors about the bytes of one record, as opposed to the connection, the group or the call."""
    if isinstance(exc, CorruptRecordException):
        return True
    return isinstance(exc, (ValueError, IndexError, struct.error)) and not isinstance(exc, KafkaError)


async def getmany_safe(
    consumer: AIOKafkaConsumer,
    *partitions: TopicPartition,
    timeout_ms: int = 0,
    max_records: int | None = None,
    bound_s: float | None = None,
) -> tuple[Records, list[Unreadable]]:
    """``consumer.getmany(...)``, plus the records it had to skip because they cannot be parsed.

    ``bound_s`` bounds the ordinary call (``TimeoutError`` after it: aiokafka's ``getmany`` ignores
    its own timeout while a group has no assignment). It never cuts the isolation short: that has
    moved positions, and stopping it half way would lose what it read."""
    before = await _positions(consumer)
    try:
        call = consumer.getmany(*partitions, timeout_ms=timeout_ms, max_records=max_records)
        return (await (call if bound_s is None else asyncio.wait_for(call, bound_s))), []
    except Exception as exc:
        if not _is_parse_error(exc):
            raise
        log.warning("a fetched record cannot be parsed (%s: %s); isolating it", type(exc).__name__, exc)
    # The failed call may have consumed other partitions' records too (they were drained before
    # the bad one, then dropped with the exception): every partition goes back to where it was.
    for tp, position in before.items():
        consumer.seek(tp, position)
    return await _isolate(consumer, partitions)


async def _positions(consumer: AIOKafkaConsumer) -> dict[TopicPartition, int]:
    """Each assigned, fetchable partition's position. A partition whose position is still being
    reset is waited for: otherwise the reset would happen inside the call, and records that call
    drains and drops could not be rewound to.

    Reads aiokafka's subscription state directly (pinned below 0.15; ``tests/integration/
    test_transport_fetch.py`` fails if that changes), since this runs before every poll and
    ``position()`` is a coroutine per partition."""
    state = getattr(consumer, "_subscription", None)  # absent on test doubles
    subscription = state.subscription if state is not None else None
    if subscription is None or subscription.assignment is None:
        return {}
    assignment = subscription.assignment
    positions = {}
    for tp in list(assignment.tps):
        tp_state = assignment.state_value(tp)
        if tp_state is None or tp_state.paused:
            continue
        if tp_state.has_valid_position:
            positions[tp] = tp_state.position
        else:
            with contextlib.suppress(IllegalStateError):
                positions[tp] = await consumer.position(tp)
    return positions


async def _rewind(consumer: AIOKafkaConsumer, tps: list[TopicPartition]) -> None:
    """Drop what was fetched and not returned: each partition goes back to the offset after the
    last record handed to the caller (aiokafka's position is not advanced by a call that raised)."""
    for tp in tps:
        consumer.seek(tp, await consumer.position(tp))


async def _isolate(consumer: AIOKafkaConsumer, partitions: tuple[TopicPartition, ...]) -> tuple[Records, list[Unreadable]]:
    paused = consumer.paused()
    tps = [tp for tp in (partitions or tuple(consumer.assignment())) if tp not in paused]
    records: Records = {}
    unreadable: list[Unreadable] = []
    for tp in tps:
        try:
            batch = await consumer.getmany(tp, timeout_ms=1000)
        except Exception as exc:
            if not _is_parse_error(exc):
                raise
            await _rewind(consumer, [tp])
        else:
            if batch.get(tp):
                records[tp] = batch[tp]
            continue
        # This partition holds the record: step one record at a time up to it. Each step returns
        # its record or raises, so nothing before it is lost. Every offset a failing step is sought
        # past is reported: aiokafka parses a stored batch from its start, so a bad record also
        # fails the steps at the offsets after it in the same batch, and those records cannot be
        # had through this client either. Reported, never silently skipped. (In a compacted topic
        # a step may also start in a gap before the bad record; those offsets are reported too.)
        got = records.setdefault(tp, [])
        failed = False
        while True:
            position = await consumer.position(tp)
            try:
                step = await consumer.getmany(tp, timeout_ms=1000, max_records=1)
            except Exception as exc:
                if not _is_parse_error(exc):
                    raise
                error = f"{type(exc).__name__}: {exc}"[:500]
                unreadable.append(Unreadable(tp.topic, tp.partition, position, error))
                log.error("skipped record %s:%d:%d: the Kafka client cannot parse it: %s", tp.topic, tp.partition, position, error)
                consumer.seek(tp, position + 1)
                failed = True
                continue
            got.extend(step.get(tp, []))
            if failed or not step.get(tp):
                # Past the bad record(s): later records come by the normal path. Or nothing more is
                # fetched: the failure was elsewhere, or is not reached yet.
                break
        if not got:
            del records[tp]
    return records, unreadable
