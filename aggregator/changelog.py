"""Reading state back from Kafka: the totals changelog, and the recently processed events.

Both read fixed offset ranges with a group-less consumer, so they never disturb the group. Both
survive any record: what cannot be read is skipped, logged and counted, and reading goes on (a
restore that stopped at a bad record would stop the partition for good, on every restart).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Generic, Protocol, TypeVar

from aiokafka.structs import ConsumerRecord

from aggregator.intake import accept, expected_partition
from schemas.errors import DecodeError
from schemas.sealed import SEALED_MESSAGE, SealedTotals
from schemas.totals import TotalsRecord
from schemas.usage import UsageEvent
from schemas.wire import FastTotalsRecord, decode_totals, parse_tenant_period_key, tenant_period_key, totals_model
from transport.admin import topic_partitions
from transport.connection import KafkaConnection
from transport.fetch import Unreadable
from transport.murmur import partition_of, partitions_of
from transport.reading import Ranges, read_ranges

log = logging.getLogger(__name__)

Key = tuple[str, str]


class Applied(Protocol):
    """What a fold keeps per key: it compares the next record's offset with the held one's."""

    @property
    def applied_offset(self) -> int: ...


V = TypeVar("V", bound=Applied)


def admissible(
    record: ConsumerRecord, totals: FastTotalsRecord, usage_ends: dict[int, int] | None, partition_count: int | None
) -> str | None:
    """Why a decoded changelog record cannot be state, or None. A record that claims to have
    applied usage beyond its partition's end (forged, or from another cluster) would make every
    later event of its key look like a replay: the tenant frozen for good. So would one on a
    partition other than its tenant's, which the aggregator of that partition would restore.

    The reference statement of the rules; ``Admission`` applies the same ones per record at a
    fraction of the cost (tests hold the two together)."""
    if record.key != tenant_period_key(totals.tenant_id, totals.period_key):
        return "key_mismatch"
    if totals.usage_partition != record.partition:
        return "wrong_partition"
    if partition_count and expected_partition(totals.tenant_id.encode(), partition_count) != record.partition:
        return "wrong_partition"
    if usage_ends is not None and totals.applied_offset >= usage_ends.get(totals.usage_partition, 0):
        return "offset_beyond_end"
    return None


class Admission:
    """``admissible`` for a stream of records, with the same answers at a fraction of its cost:
    the home partitions of a batch's tenants are hashed together (``learn``: Kafka's murmur2 for
    all of them at once, ``transport.murmur.partitions_of``) and held in a bounded cache, instead
    of aiokafka's byte-at-a-time murmur2 once per record (a restore of a million tenants hashes a
    million ids)."""

    __slots__ = ("_homes", "partition_count", "usage_ends")

    HOMES_HELD = 16_384

    def __init__(self, usage_ends: dict[int, int] | None, partition_count: int | None) -> None:
        self.usage_ends = usage_ends
        self.partition_count = partition_count
        self._homes: dict[str, int] = {}

    def learn(self, tenants: Iterable[str]) -> None:
        """Hash the home partitions of ``tenants`` not held yet, all at once."""
        if not self.partition_count:
            return
        homes = self._homes
        fresh = [tenant for tenant in dict.fromkeys(tenants) if tenant not in homes]
        if len(homes) + len(fresh) > self.HOMES_HELD:
            homes.clear()
        homes.update(zip(fresh, partitions_of([t.encode() for t in fresh], self.partition_count), strict=True))

    def why(self, key: bytes | None, partition: int, totals: FastTotalsRecord) -> str | None:
        tenant = totals.tenant_id
        if key != tenant_period_key(tenant, totals.period_key):
            return "key_mismatch"
        if totals.usage_partition != partition:
            return "wrong_partition"
        if self.partition_count:
            home = self._homes.get(tenant)
            if home is None:
                if len(self._homes) >= self.HOMES_HELD:
                    self._homes.clear()
                home = self._homes[tenant] = partition_of(tenant.encode(), self.partition_count)
            if home != partition:
                return "wrong_partition"
        if self.usage_ends is not None and totals.applied_offset >= self.usage_ends.get(totals.usage_partition, 0):
            return "offset_beyond_end"
        return None


class ChangelogFold(Generic[V]):
    """The winner of each (tenant, period) among changelog records read in order, as ``take``
    makes it: pure, no I/O; ``fold_changelog`` feeds it the records it reads. Nothing per record
    outlives its batch but what ``take`` makes of the current winner.

    Of several records of one key, the one that has applied the furthest wins (the latest on a
    tie: a limit change or a replay rewrites a key at the same offset). Each record is the exact
    sum of its key's events up to its offset, so the furthest one is the most complete, even when a
    member that lost its partitions (a zombie) wrote after the new owner did. A tombstone removes
    the key. Records that cannot be state (see ``admissible``; pass ``usage_ends`` to bound offsets
    and ``partition_count`` to check each tenant's partition) are counted in ``rejected``, and each
    reason is logged once.
    """

    PERIODS_HELD = 10_000
    CHUNK = 500

    def __init__(
        self,
        take: Callable[[FastTotalsRecord], V],
        *,
        usage_ends: dict[int, int] | None = None,
        partition_count: int | None = None,
        rejected: Counter[str] | None = None,
        topic: str = "",
    ) -> None:
        self.latest: dict[Key, V] = {}
        self.rejected = rejected if rejected is not None else Counter()
        self._take = take
        self._admission = Admission(usage_ends, partition_count)
        self._periods: dict[str, str] = {}  # one text per period key, however many keys share it
        self._topic = topic

    def add(self, records: Sequence[ConsumerRecord]) -> None:
        """Fold a batch of records, in order, ``CHUNK`` at a time. Each chunk is decoded first, so
        that its tenants' home partitions are hashed together; then each record is taken or
        refused in turn. (A chunk's decoded records all live until its end: a small chunk keeps
        that memory small.)"""
        for start in range(0, len(records), self.CHUNK):
            self._add(records[start:start + self.CHUNK])

    def _add(self, records: Sequence[ConsumerRecord]) -> None:
        decoded: list[FastTotalsRecord | DecodeError | None] = []
        for record in records:
            if record.value is None:
                decoded.append(None)
                continue
            try:
                decoded.append(decode_totals(record.value))
            except DecodeError as exc:
                decoded.append(exc)
        self._admission.learn(t.tenant_id for t in decoded if t is not None and not isinstance(t, DecodeError))
        latest, rejected, take, periods = self.latest, self.rejected, self._take, self._periods
        why_not = self._admission.why
        for record, totals in zip(records, decoded, strict=True):
            if totals is None:
                # A tombstone: the aggregator removed the key (an ended rate window). A record
                # of it written later (by a zombie member) may bring it back; that is harmless,
                # it expires again.
                parsed = parse_tenant_period_key(record.key)
                if parsed is not None:
                    latest.pop(parsed, None)
                continue
            if isinstance(totals, DecodeError):
                if rejected[totals.reason] == 0:
                    log.error("undecodable totals record at %s:%d:%d: %s", self._topic, record.partition, record.offset,
                              totals)
                rejected[totals.reason] += 1
                continue
            why = why_not(record.key, record.partition, totals)
            if why is not None:
                if rejected[why] == 0:
                    log.error("ignoring totals record at %s:%d:%d: %s", self._topic, record.partition, record.offset, why)
                rejected[why] += 1
                continue
            period = periods.get(totals.period_key)
            if period is None:
                period = totals.period_key
                if len(periods) < self.PERIODS_HELD:
                    periods[period] = period
            key = (totals.tenant_id, period)
            held = latest.get(key)
            if held is None or totals.applied_offset >= held.applied_offset:
                latest[key] = take(totals)

    def unreadable(self, skipped: Unreadable) -> None:
        """A record the client could not parse (``transport.fetch``): skipped, counted."""
        self.rejected["unreadable"] += 1


async def fold_changelog(
    connection: KafkaConnection,
    topic: str,
    partitions: Iterable[int] | None,
    take: Callable[[FastTotalsRecord], V],
    *,
    usage_ends: dict[int, int] | None = None,
    partition_count: int | None = None,
    rejected: Counter[str] | None = None,
) -> dict[Key, V]:
    """``take`` of the winning record per (tenant, period) in ``partitions`` (all when None), by
    ``ChangelogFold``'s rules, built as the records stream in."""
    if partitions is None:
        partitions = await topic_partitions(connection, topic)
    fold = ChangelogFold(take, usage_ends=usage_ends, partition_count=partition_count, rejected=rejected, topic=topic)
    async for records in read_ranges(
        connection, topic, {p: (None, None) for p in partitions}, on_unreadable=fold.unreadable
    ):
        fold.add(records)
    return fold.latest


async def read_changelog(
    connection: KafkaConnection,
    topic: str,
    partitions: Iterable[int] | None = None,
    *,
    usage_ends: dict[int, int] | None = None,
    partition_count: int | None = None,
    rejected: Counter[str] | None = None,
) -> dict[Key, TotalsRecord]:
    """The winning record per (tenant, period) in ``partitions`` (all when None), as models, by
    ``ChangelogFold``'s rules: for the readers that show or compare records (verify, replay, the
    CLI). The aggregator's restore folds straight into its compact state instead
    (``aggregator.recovery``): a model per key costs several times what the state does."""
    return await fold_changelog(
        connection, topic, partitions, totals_model,
        usage_ends=usage_ends, partition_count=partition_count, rejected=rejected,
    )


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
