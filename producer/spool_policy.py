"""The spool policy: when usage events go to disk, how they come back, and what a full spool does.

``producer.spool`` is the file format (segments, locks, adoption of stopped processes' folders);
this is how the publisher uses it:

- **Spill.** Events Kafka did not take (a batch not acknowledged within ``send_timeout_s``, or
  still queued when the publisher stops) are written to the spool, encoded as on the wire. While
  anything is spooled, new events follow it there, so a tenant's events reach Kafka in the order
  they were spent.
- **Deliver.** The oldest spooled events are sent a batch at a time; a batch leaves the spool only
  once every event in it was acknowledged (a crash in between sends it again, and the aggregator
  drops the repeats by event id). Offsets are reported only for this process's own events: those
  adopted from a stopped process were never in this process's snapshot.
- **Full** (``spool_full_policy``). ``block``: the events the spool refuses stay in memory, and
  the store refuses new calls (``UsageSpoolFullError``) until delivery has brought the spool under
  half its size. ``drop_oldest``: the oldest segment is deleted to make room, counted and logged
  as an error; when nothing is left to drop, the events are refused as under ``block``.

Without a spool directory, ``NoSpool`` stands in: it refuses every spill, so the publisher keeps
the events in memory (and loses them if the process stops).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Literal

from producer.encoding import encode_event
from producer.spool import Spool, SpoolFull
from schemas.errors import DecodeError
from schemas.wire import UsageLike, decode_usage

if TYPE_CHECKING:
    from producer.publisher import PublisherStats

log = logging.getLogger(__name__)

# Sends events, reporting offsets only for the ids in the set; returns the events not acknowledged.
SendOwn = Callable[[list[UsageLike], set[str]], Awaitable[list[UsageLike]]]


class SpoolPolicy:
    """Spill, deliver and the full policy over one ``Spool``; counts into the publisher's stats."""

    def __init__(self, spool: Spool, full_policy: Literal["block", "drop_oldest"], stats: PublisherStats) -> None:
        self.spool = spool
        self.full_policy = full_policy
        self.stats = stats
        self.full = False  # the last spill was refused; cleared when delivery makes room
        self._own: set[str] = set()  # ids of this process's events in the spool: their offsets are reported

    @property
    def pending(self) -> int:
        return self.spool.pending

    def open(self) -> None:
        self.spool.open()

    def close(self) -> None:
        if self.spool.pending:
            log.warning("%d usage events stay in the spool at %s for the next start", self.spool.pending, self.spool.root)
        self.spool.close()

    def spill(self, events: list[UsageLike], encoded: dict[str, bytes] | None = None) -> list[UsageLike]:
        """Write ``events`` to the spool, in order; return those refused (the caller keeps them).
        ``encoded``: values already encoded, by event id (the publisher's; taken out as used)."""
        if not events:
            return []
        given = encoded if encoded else {}
        lines = [given.pop(event.event_id, b"") or encode_event(event) for event in events]
        while True:
            try:
                self.spool.append(lines)
                break
            except SpoolFull:
                if self.full_policy == "drop_oldest" and self.spool.pending:
                    lost = self.spool.drop_oldest_segment()
                    self.stats.spool_dropped += lost
                    log.error("usage spool full: DROPPED the %d oldest spooled usage events (policy drop_oldest)", lost)
                    continue
                self.stats.spool_refused += len(events)
                if not self.full:
                    log.error("usage spool full (%d bytes): new calls are blocked until Kafka takes it", self.spool.size_bytes)
                self.full = True
                return events
        self.full = False
        self.stats.spooled += len(events)
        self._own.update(event.event_id for event in events)
        return []

    async def deliver(self, send: SendOwn, batch_max: int) -> bool:
        """Send the oldest spooled events; True when they were all acknowledged (and left the spool)."""
        lines = self.spool.peek(batch_max)
        events: list[UsageLike] = []
        for line in lines:
            try:
                events.append(decode_usage(line))
            except DecodeError as exc:  # a torn last line after a crash: nothing to deliver
                log.error("unreadable spooled usage event skipped: %s", exc)
        if await send(events, self._own):
            return False
        self.spool.consume(len(lines))
        self._own.difference_update(event.event_id for event in events)
        if self.full and self.spool.size_bytes < self.spool.max_bytes // 2:
            self.full = False
        return True


class NoSpool:
    """No spool directory configured: nothing is ever spooled, every spill is refused."""

    full = False
    pending = 0

    def open(self) -> None:
        pass

    def close(self) -> None:
        pass

    def spill(self, events: list[UsageLike], encoded: dict[str, bytes] | None = None) -> list[UsageLike]:
        return events

    async def deliver(self, send: SendOwn, batch_max: int) -> bool:
        return True  # never called: nothing is pending
