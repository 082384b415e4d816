"""Kafka -> snapshot: every middleware process reads every partition of the notices topic.

The topic is compacted, so reading it from the beginning at start rebuilds the current state of
every tenant-period; afterwards each notice and heartbeat updates the snapshot as it arrives.

Anyone who can write the topic can write a notice, so what a record claims is bounded before it is
believed (ACLs keep forgers out; these bounds keep a forgery from lasting):

- a heartbeat or notice dated more than ``max_clock_skew_s`` ahead of this clock is ignored;
- a notice whose ``usage_offset`` is not below its usage partition's end offset covers records that
  do not exist: ignored. The end offsets are asked of the broker (with the follower's consumer)
  only when a notice claims more than the highest end known, at most every ``REFRESH_INTERVAL_S``;
  such a notice waits for that check (a genuine one arrives just after the usage it covers, so it usually needs
  one) while the feed goes on with the records behind it. Notices rank by offset, so applying one
  a moment late, after others, gives the same snapshot.

Ignored records are counted per reason in ``ignored``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable

from aiokafka.structs import ConsumerRecord

from producer.config import ProducerConfig
from producer.errors import WaitTimeoutError
from producer.snapshot import QuotaSnapshot, from_the_future, within_end
from schemas.errors import DecodeError
from schemas.notices import Heartbeat, QuotaNotice
from schemas.wire import decode_notice, parse_tenant_period_key
from transport.admin import topic_partitions
from transport.follower import TopicFollower

log = logging.getLogger(__name__)

# The broker is asked for the usage topic's end offsets at most this often. A genuine notice usually
# needs one check (it covers usage just written), so this is added to every notice's propagation:
# at 1 s the demo's smallest tenant overshot its limit by a third; at 50 ms a flood of forged
# notices costs at most 20 cheap ListOffsets requests a second.
REFRESH_INTERVAL_S = 0.05
# Notices waiting for that check; past this the feed waits for the check before reading on, so a
# flood of forged notices costs one interval per this many, never unbounded memory.
MAX_PENDING = 10_000


class NoticesFeed:
    """Keeps a ``QuotaSnapshot`` current with the aggregator's notices and heartbeats."""

    def __init__(self, config: ProducerConfig, snapshot: QuotaSnapshot) -> None:
        self._snapshot = snapshot
        self._connection = config.connection
        self._usage_topic = config.topics.usage
        self._max_clock_skew_s = config.max_clock_skew_s
        self._follower = TopicFollower(
            config.connection,
            config.topics.notices,
            self._take,
            client_id=f"tokenguard-notices-{config.instance_id}",
            catch_up_s=config.catch_up_timeout_s,
            strict=False,
        )
        self._ends: dict[int, int] = {}
        self._usage_partitions: set[int] = set()
        self._refreshed_at = -float("inf")  # monotonic
        self._pending: list[QuotaNotice] = []
        self._removed: tuple[tuple[str, str], ...] = ()  # tenant-periods most recently tombstoned
        self._has_pending = asyncio.Event()
        self._checking = asyncio.Lock()
        self._checker: asyncio.Task[None] | None = None
        self._check_failing = False
        self.ignored: Counter[str] = Counter()
        self.end_offset_refreshes = 0

    @property
    def undecodable(self) -> int:
        """Records skipped because they are not a notice or heartbeat (or not parseable at all)."""
        return sum(self._follower.skipped.values())

    @property
    def skipped(self) -> dict[str, int]:
        """Skipped records per reason."""
        return dict(self._follower.skipped)

    @property
    def failed(self) -> BaseException | None:
        """Why following the notices topic stopped, if it did. The snapshot then hears no more
        heartbeats, so the staleness policy takes over within ``stale_after_s``."""
        return self._follower.failed

    async def start(self) -> None:
        """Start reading; return once the topic has been read to where it ended at start (every
        notice read by then checked and applied or ignored)."""
        await self._follower.start()
        if self._pending:
            try:
                await self._check_pending()
            except Exception:
                log.warning("notices read at start not yet checked against the usage topic's end offsets", exc_info=True)
        self._checker = asyncio.create_task(self._check_forever(), name="tokenguard-notices-offsets")

    def observe_end(self, partition: int, offset: int) -> None:
        """The broker stored a record at ``offset`` of usage partition ``partition`` (this process's
        own usage, acknowledged): the partition's end is past it. A notice within what is known so
        needs no question to the broker, so a process that publishes for a tenant takes the notices
        that cover its own usage at once."""
        if offset >= self._ends.get(partition, 0):
            self._ends[partition] = offset + 1

    async def stop(self) -> None:
        """Idempotent."""
        checker, self._checker = self._checker, None
        if checker is not None:
            checker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await checker
        await self._follower.stop()
        self._pending = []

    async def __aenter__(self) -> NoticesFeed:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def wait_until(self, predicate: Callable[[QuotaSnapshot], bool], timeout: float) -> None:
        """Wait until ``predicate(snapshot)`` holds, re-checking after every batch of notices."""
        try:
            await self._follower.wait_until(lambda: predicate(self._snapshot), timeout)
        except TimeoutError:
            raise WaitTimeoutError(f"the notices did not reach the awaited state within {timeout}s") from None

    async def _take(self, records: list[ConsumerRecord]) -> None:
        snapshot = self._snapshot
        for record in records:
            if record.value is None:
                self._tombstone(record.key)
                continue
            try:
                message = decode_notice(record.value)
            except DecodeError as exc:
                self._follower.skip(partition=record.partition, offset=record.offset, reason=exc.reason, detail=exc.detail)
                continue
            if from_the_future(message.emitted_at, time.time(), self._max_clock_skew_s):
                self._ignore(record, "dated_in_the_future", f"emitted_at {message.emitted_at.isoformat()}")
                continue
            if isinstance(message, Heartbeat):
                snapshot.apply_heartbeat(message)
            elif within_end(message.usage_partition, message.usage_offset, self._ends):
                snapshot.apply_notice(message)
            else:
                self._pending.append(message)
                self._has_pending.set()
                if len(self._pending) >= MAX_PENDING:
                    try:
                        await self._check_pending()
                    except Exception:
                        log.warning("checking %d held notices against the usage end offsets failed", len(self._pending),
                                    exc_info=True)

    def _tombstone(self, key: bytes | None) -> None:
        """An aggregator removed a notice it found no owner of (a forged one, usually)."""
        parsed = parse_tenant_period_key(key)
        if parsed is None:
            return
        self._pending = [n for n in self._pending if (n.tenant_id, n.period_key) != parsed]
        self._removed = (*self._removed[-999:], parsed)  # a new tuple: _check_pending compares identity
        self._snapshot.forget_notice(*parsed)

    def _ignore(self, record: ConsumerRecord | None, reason: str, detail: str) -> None:
        self.ignored[reason] += 1
        where = f"{record.topic}:{record.partition}:{record.offset}" if record is not None else "notice"
        level = logging.WARNING if self.ignored[reason] == 1 else logging.DEBUG
        log.log(level, "ignored %s (%s): %s", where, reason, detail)

    async def _check_forever(self) -> None:
        try:
            # Learned before the first notice needs them: the usage topic's partitions (a metadata
            # request of its own) and the follower's consumer's metadata for that topic would
            # otherwise add ~150 ms to the first notice's check.
            async with self._checking:
                self._usage_partitions = set(await topic_partitions(self._connection, self._usage_topic))
                await self._refresh_ends(set())
        except asyncio.CancelledError:
            raise
        except Exception:
            log.debug("learning the usage topic's end offsets at start failed; the first notice asks again", exc_info=True)
        while True:
            await self._has_pending.wait()
            try:
                await self._check_pending()
                self._check_failing = False
            except asyncio.CancelledError:
                raise
            except Exception:
                log.log(logging.DEBUG if self._check_failing else logging.WARNING,
                        "checking notices against the usage topic's end offsets failed; retrying", exc_info=True)
                self._check_failing = True
            self._follower.batches.set()  # waiters re-check the snapshot

    async def _check_pending(self) -> None:
        """Ask the broker for the usage topic's end offsets (at most every ``REFRESH_INTERVAL_S``), then apply the
        held notices that are within them and ignore the rest."""
        async with self._checking:
            if not self._pending:
                self._has_pending.clear()
                return
            wait = self._refreshed_at + REFRESH_INTERVAL_S - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)  # the rate limit on asking the broker
            held, self._pending = self._pending, []
            self._has_pending.clear()
            self._refreshed_at = time.monotonic()
            removed_before = self._removed
            try:
                await self._refresh_ends({notice.usage_partition for notice in held})
            except Exception:
                self._pending = held + self._pending  # not judged: kept for the next round
                self._has_pending.set()
                raise
            if self._removed is not removed_before:
                # Tombstones read while the ends were fetched remove held notices written before them.
                gone = set(self._removed) - set(removed_before)
                held = [n for n in held if (n.tenant_id, n.period_key) not in gone]
            for notice in held:
                if within_end(notice.usage_partition, notice.usage_offset, self._ends):
                    self._snapshot.apply_notice(notice)
                else:
                    end = self._ends.get(notice.usage_partition)
                    self._ignore(None, "offset_beyond_end", (
                        f"{notice.tenant_id!r:.80}/{notice.period_key!r:.40} claims usage offset {notice.usage_offset} "
                        f"of partition {notice.usage_partition}, whose end is {end}"
                    ))

    async def _refresh_ends(self, partitions: set[int]) -> None:
        if not partitions <= self._usage_partitions:
            self._usage_partitions = set(await topic_partitions(self._connection, self._usage_topic))
        ends = await self._follower.end_offsets(self._usage_topic, sorted(self._usage_partitions))
        self.end_offset_refreshes += 1
        for partition, end in ends.items():
            self._ends[partition] = max(end, self._ends.get(partition, 0))
