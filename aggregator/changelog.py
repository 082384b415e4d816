"""Reading state back from Kafka: the totals changelog, and the recently processed events.

Both read fixed offset ranges with a group-less consumer, so they never disturb the group. Both
survive any record: what cannot be read is skipped, logged and counted, and reading goes on (a
restore that stopped at a bad record would stop the partition for good, on every restart).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable

from aiokafka.structs import ConsumerRecord

from aggregator.intake import accept, expected_partition
from schemas.errors import DecodeError
from schemas.sealed import SEALED_MESSAGE, SealedTotals
from schemas.totals import TotalsRecord
from schemas.usage import UsageEvent
from schemas.wire import decode_totals, parse_tenant_period_key, tenant_period_key
from transport.admin import topic_partitions
from transport.connection import KafkaConnection
from transport.fetch import Unreadable
from transport.reading import Ranges, read_ranges

log = logging.getLogger(__name__)

def admissible(
    record: ConsumerRecord, totals: TotalsRecord, usage_ends: dict[int, int] | None, partition_count: int | None
) -> str | None:
    """Why a decoded changelog record cannot be state, or None. A record that claims to have
    applied usage beyond its partition's end (forged, or from another cluster) would make every
    later event of its key look like a replay: the tenant frozen for good. So would one on a
    partition other than its tenant's, which the aggregator of that partition would restore."""
    if record.key != tenant_period_key(totals.tenant_id, totals.period_key):
        return "key_mismatch"
    if totals.usage_partition != record.partition:
        return "wrong_partition"
    if partition_count and expected_partition(totals.tenant_id.encode(), partition_count) != record.partition:
        return "wrong_partition"
    if usage_ends is not None and totals.applied_offset >= usage_ends.get(totals.usage_partition, 0):
        return "offset_beyond_end"
    return None


async def read_changelog(
    connection: KafkaConnection,
    topic: str,
    partitions: Iterable[int] | None = None,
    *,
    usage_ends: dict[int, int] | None = None,
    partition_count: int | None = None,
    rejected: Counter[str] | None = None,
) -> dict[tuple[str, str], TotalsRecord]:
    """The state per (tenant, period) in ``partitions`` (all when None).

    Of several records of one key, the one that has applied the furthest wins (the latest on a
    tie: a limit change or a replay rewrites a key at the same offset). Each record is the exact
    sum of its key's events up to its offset, so the furthest one is the most complete, even when a
    member that lost its partitions (a zombie) wrote after the new owner did. Records that cannot be
    state (see ``admissible``; pass ``usage_ends`` to bound offsets and ``partition_count`` to check
    each tenant's partition) are counted in ``rejected``.
    """
    if partitions is None:
        partitions = await topic_partitions(connection, topic)
    rejected = rejected if rejected is not None else Counter()
    latest: dict[tuple[str, str], TotalsRecord] = {}

    def unreadable(skipped: Unreadable) -> None:
        rejected["unreadable"] += 1

    async for records in read_ranges(
        connection, topic, {p: (None, None) for p in partitions}, on_unreadable=unreadable
    ):
        for record in records:
            if record.value is None:
                # A tombstone: the aggregator removed the key (an ended rate window). A record
                # of it written later (by a zombie member) may bring it back; that is harmless,
                # it expires again.
                parsed = parse_tenant_period_key(record.key)
                if parsed is not None:
                    latest.pop(parsed, None)
                continue
            try:
                totals = decode_totals(record.value)
            except DecodeError as exc:
                if rejected[exc.reason] == 0:
                    log.error("undecodable totals record at %s:%d:%d: %s", topic, record.partition, record.offset, exc)
                rejected[exc.reason] += 1
                continue
            why = admissible(record, totals, usage_ends, partition_count)
            if why is not None:
                if rejected[why] == 0:
                    log.error("ignoring totals record at %s:%d:%d: %s", topic, record.partition, record.offset, why)
                rejected[why] += 1
                continue
            key = (totals.tenant_id, totals.period_key)
            held = latest.get(key)
            if held is None or totals.applied_offset >= held.applied_offset:
                latest[key] = totals
    return latest


async def recent_events(
    connection: KafkaConnection, topic: str, committed: dict[int, int], window: int, partitions: int
) -> dict[int, list[UsageEvent]]:
    """Per partition, the events among the last ``window`` usage records before its committed
    offset that the consume loop accepted (``aggregator.intake.accept``), in order: what its
    dedup window held. Records it dead-lettered are skipped here too, so nothing they claim
    (an id, a tenant) can drop a later event."""
    ranges: Ranges = {p: (max(0, offset - window), offset) for p, offset in committed.items() if offset > 0}
    events: dict[int, list[UsageEvent]] = {p: [] for p in ranges}
    async for records in read_ranges(connection, topic, ranges):
        for record in records:
            try:
                events[record.partition].append(accept(record, partitions))
            except DecodeError:
                continue
    return events


async def read_sealed(
    connection: KafkaConnection, topic: str, rejected: Counter[str] | None = None
) -> tuple[dict[tuple[str, str], SealedTotals], dict[tuple[str, str], dict[str, int]]]:
    """The sealed topic as it is now: final totals per sealed (tenant, period), and per such key
    its adjustments (event id -> tokens). Records that do not decode are counted in ``rejected``."""
    rejected = rejected if rejected is not None else Counter()
    sealed: dict[tuple[str, str], SealedTotals] = {}
    adjustments: dict[tuple[str, str], dict[str, int]] = {}
    partitions = await topic_partitions(connection, topic)

    def unreadable(skipped: Unreadable) -> None:
        rejected["unreadable"] += 1

    async for records in read_ranges(connection, topic, {p: (None, None) for p in partitions}, on_unreadable=unreadable):
        for record in records:
            if record.value is None:
                continue
            try:
                message = SEALED_MESSAGE.validate_json(record.value)
            except ValueError:
                rejected["invalid"] += 1
                continue
            key = (message.tenant_id, message.period_key)
            if isinstance(message, SealedTotals):
                sealed[key] = message
            else:
                adjustments.setdefault(key, {})[message.event_id] = message.total_tokens
    return sealed, adjustments
