"""The aiokafka producer as the publisher drives it: its settings, usage events sent as one batch
per partition, and a close that cannot hang while the broker is away."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from producer.config import ProducerConfig
from producer.encoding import encode_event
from schemas.wire import UsageLike, usage_headers, usage_key

log = logging.getLogger(__name__)

# Events the broker acknowledged: (partition, offset of the first, the events in offset order).
Acked = tuple[int, int, list[UsageLike]]


def new_producer(config: ProducerConfig) -> AIOKafkaProducer:
    return AIOKafkaProducer(
        **config.connection.client_kwargs(),
        client_id=f"tokenguard-{config.instance_id}",
        acks="all",
        enable_idempotence=config.idempotence,
        linger_ms=config.linger_ms,
        max_batch_size=512 * 1024,
        request_timeout_ms=int(config.send_timeout_s * 1000),
    )


async def send_batches(
    producer: AIOKafkaProducer, topic: str, events: list[UsageLike], partition_of: Callable[[str], int],
    encoded: dict[str, bytes] | None = None, while_waiting: Callable[[], None] | None = None,
) -> tuple[list[Acked], list[UsageLike]]:
    """Send ``events`` grouped by their tenant's partition; return what was acknowledged and what failed.

    A tenant's events keep their order: they share a partition, and its chunks are sent in order.
    ``encoded``: values already encoded, by event id (taken out as they are used; the others are
    encoded here). ``while_waiting``: run once the batches are handed to the Kafka client and it
    has had a turn to write them, before waiting for their acknowledgements (the broker works
    meanwhile).
    """
    by_partition: dict[int, list[UsageLike]] = {}
    for event in events:
        by_partition.setdefault(partition_of(event.tenant_id), []).append(event)
    in_flight: list[tuple[asyncio.Future[object], int, list[UsageLike]]] = []
    failed: list[UsageLike] = []
    for partition, items in by_partition.items():
        for chunk, batch in _batches(producer, items, encoded if encoded is not None else {}):
            if batch is None:
                log.error("usage event %s does not fit in a batch; it stays queued", chunk[0].event_id)
                failed.extend(chunk)
                continue
            try:
                future = await producer.send_batch(batch, topic, partition=partition)
            except KafkaError as exc:
                log.warning("sending %d usage events failed: %r", len(chunk), exc)
                failed.extend(chunk)
                continue
            in_flight.append((future, partition, chunk))
    if while_waiting is not None and in_flight:
        await asyncio.sleep(0)  # the client's sender task writes the request
        while_waiting()
    results = await asyncio.gather(*(future for future, _, _ in in_flight), return_exceptions=True)
    acked: list[Acked] = []
    for (_, partition, chunk), result in zip(in_flight, results, strict=True):
        if isinstance(result, BaseException):
            log.warning("usage batch of %d events to partition %d failed: %r", len(chunk), partition, result)
            failed.extend(chunk)
            continue
        acked.append((partition, result.offset, chunk))  # type: ignore[attr-defined]
    return acked, failed


def _batches(
    producer: AIOKafkaProducer, items: list[UsageLike], encoded: dict[str, bytes]
) -> Iterable[tuple[list[UsageLike], object]]:
    """Consecutive chunks of ``items`` with a closed batch holding each (None: would not fit)."""
    start = 0
    take = encoded.pop
    while start < len(items):
        batch = producer.create_batch()
        append = batch.append
        count = 0
        for event in items[start:]:
            value = take(event.event_id, None) if encoded else None
            if value is None:
                value = encode_event(event)
            if append(key=usage_key(event.tenant_id), value=value, timestamp=None, headers=usage_headers(event)) is None:
                encoded[event.event_id] = value  # the next batch takes it
                break
            count += 1
        if count == 0:
            yield items[start : start + 1], None
            start += 1
            continue
        batch.close()
        yield items[start : start + count], batch
        start += count


async def close_within(producer: AIOKafkaProducer, timeout: float) -> None:
    """``producer.stop()``, bounded. An idempotent aiokafka producer's stop() waits for every
    pending batch, forever while the broker is away; by then those events are in our spool, so
    past ``timeout`` its tasks are cancelled and its connections closed instead."""
    stopping = asyncio.ensure_future(producer.stop())
    try:
        await asyncio.wait_for(asyncio.shield(stopping), timeout)
        return
    except TimeoutError:
        log.warning("the Kafka producer did not close within %.0fs (broker away); abandoning its pending batches", timeout)
    sender_task = getattr(getattr(producer, "_sender", None), "sender_task", None)
    for task in (stopping, sender_task):
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
    await producer.client.close()
