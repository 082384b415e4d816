"""The local quota snapshot: the decision every call makes without touching the network.

Per (tenant, period) it holds the aggregator's last notice and this process's own spend that the
notice does not include yet: events not yet acknowledged by Kafka, and events acknowledged at an
offset above the one the notice covers. A call is blocked when the notice says ``exceeded`` or when
``notice.used + local spend >= limit``: one instance stops itself as soon as its own view crosses,
and the aggregator's notice stops all the others. Pure logic, no I/O.

The limit is the notice's when there is one. Without a notice (the aggregator sends none while a
tenant is 'ok'), it is the tenant's limit from the limits topic (``limits``, a table the limits
feed keeps current), and only when no limits record applies the middleware's own ``quota_tokens``.

When a usage partition's aggregator is silent past ``stale_after_s``, ``judge_stale`` applies the
staleness policy to that decision (``keep_known`` by default: what was known stays known).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal, Protocol, get_args

from producer.store import Decision, LimitSource
from schemas.notices import Heartbeat, QuotaNotice
from schemas.policy import COUNTER_PREFIX
from schemas.windows import window_value_end

StalePolicy = Literal["keep_known", "local_only", "fail_open", "fail_closed"]
STALE_POLICIES: tuple[str, ...] = get_args(StalePolicy)
STALE_REASON = "quota_state_stale"


def judge_stale(policy: StalePolicy, decision: Decision) -> Decision:
    """The decision for a tenant-period whose aggregator is stale (silent past ``stale_after_s``, or
    never heard from), given the snapshot's own ``decision`` (``QuotaSnapshot.decide``). Pure.

    - ``keep_known`` (the default) and ``local_only`` (its former name, kept as an alias: the same
      rule, not a copy of it): the snapshot's decision unchanged. A tenant known to be over when the
      aggregator fell silent stays refused: a notice in state ``exceeded`` keeps refusing, and so
      does ``used + this process's own spend since >= limit``, the limit being the one that governs
      per the snapshot (the notice's, else the limits table's, else ``quota_tokens``). A tenant
      under its limit is admitted until this process's own spend takes it over. The decision stays
      non-final, so the middleware's in-flight reservations and headroom rules still apply. A
      refusal keeps the snapshot's reason (``quota_exceeded_before_call``, raised as
      ``QuotaExceededError``): the tenant is refused because it is known to be over, not because
      the state is unknown, and the alert says so.
    - ``fail_open``: admit every call (final: no further rule applies), even a tenant known to be
      over. Explicit opt-in, for fleets that prefer availability to the bound.
    - ``fail_closed``: refuse every call with reason ``quota_state_stale``
      (``QuotaUnavailableError``).
    """
    if policy == "fail_open":
        return Decision(True, decision.used, decision.limit, final=True)
    if policy == "fail_closed":
        return Decision(False, decision.used, decision.limit, reason=STALE_REASON, final=True)
    if policy in ("keep_known", "local_only"):
        return decision
    raise ValueError(f"unknown stale_policy {policy!r}")


def within_end(usage_partition: int, usage_offset: int, ends: Mapping[int, int]) -> bool:
    """Whether a notice's ``usage_offset`` can be real: below its usage partition's end offset
    (the offset the next record will get). A notice "covering" records that do not exist yet is
    forged or corrupt, and would outrank every genuine notice until the partition got that far
    (2**62: never). A partition missing from ``ends`` is not known to exist: not within."""
    end = ends.get(usage_partition)
    return end is not None and usage_offset < end


def from_the_future(emitted_at: datetime, now: float, max_clock_skew_s: float) -> bool:
    """Whether a heartbeat or notice is dated further ahead of ``now`` (epoch seconds) than clocks
    can disagree. Staleness is measured from ``emitted_at``, so one dated 9999 would keep its
    partition fresh for ever, and notices rank by it among equal offsets."""
    return emitted_at.timestamp() - now > max_clock_skew_s


class LimitLookup(Protocol):
    """Where the snapshot finds a tenant's limit when it holds no notice (``LimitsTable``)."""

    def limit_for(self, tenant_id: str, period_key: str) -> int | None:
        """The limit that governs this tenant-period; None when no limits record applies."""
        ...


@dataclass(slots=True)
class _Entry:
    notice: QuotaNotice | None = None
    unacked: int = 0
    acked: deque[tuple[int, int, int]] = field(default_factory=deque)  # (partition, offset, tokens)
    acked_tokens: int = 0

    def local(self) -> int:
        return self.unacked + self.acked_tokens

    def forget_covered(self) -> None:
        """Drop acknowledged spend that the notice already counts."""
        notice = self.notice
        if notice is None:
            return
        kept: deque[tuple[int, int, int]] = deque()
        for partition, offset, tokens in self.acked:
            if partition == notice.usage_partition and offset <= notice.usage_offset:
                self.acked_tokens -= tokens
            else:
                kept.append((partition, offset, tokens))
        self.acked = kept


@dataclass(frozen=True, slots=True)
class PartitionHealth:
    usage_offset: int
    emitted_at: float  # the aggregator's wall clock, epoch seconds


class QuotaSnapshot:
    """Notices plus local spend, per tenant-period. Not thread-safe: one event loop owns it."""

    def __init__(self, limits: LimitLookup | None = None) -> None:
        self.limits = limits
        self._entries: dict[tuple[str, str], _Entry] = {}
        self._health: dict[int, PartitionHealth] = {}
        self.notices_applied = 0

    def _entry(self, tenant_id: str, period_key: str) -> _Entry:
        key = (tenant_id, period_key)
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = _Entry()
        return entry

    def decide(self, tenant_id: str, period_key: str, default_limit: int) -> Decision:
        """Whether a call may go ahead. ``default_limit`` (the middleware's ``quota_tokens``) is
        the limit only when there is neither a notice nor a limits record for the tenant-period."""
        entry = self._entries.get((tenant_id, period_key))
        if entry is None:
            limit = self.limit_for(tenant_id, period_key, default_limit)
            return Decision(allowed=limit > 0, used=0, limit=limit)
        notice = entry.notice
        if notice is None:
            limit = self.limit_for(tenant_id, period_key, default_limit)
            used = entry.local()
            return Decision(allowed=used < limit, used=used, limit=limit)
        used = notice.used_tokens + entry.local()
        limit = notice.limit_tokens
        return Decision(allowed=notice.state != "exceeded" and used < limit, used=used, limit=limit)

    def limit_for(self, tenant_id: str, period_key: str, default_limit: int) -> int:
        """The limit without a notice: the limits record's, else ``default_limit``."""
        limits = self.limits
        if limits is None:
            return default_limit
        limit = limits.limit_for(tenant_id, period_key)
        return default_limit if limit is None else limit

    def source(self, tenant_id: str, period_key: str) -> LimitSource:
        """Where the limit ``decide`` uses comes from: ``notice`` when one is held, else
        ``limits_topic`` when a limits record applies, else ``middleware_default``."""
        entry = self._entries.get((tenant_id, period_key))
        if entry is not None and entry.notice is not None:
            return "notice"
        limits = self.limits
        if limits is not None and limits.limit_for(tenant_id, period_key) is not None:
            return "limits_topic"
        return "middleware_default"

    def used(self, tenant_id: str, period_key: str) -> int:
        entry = self._entries.get((tenant_id, period_key))
        if entry is None:
            return 0
        return (entry.notice.used_tokens if entry.notice else 0) + entry.local()

    def add_local(self, tenant_id: str, period_key: str, tokens: int) -> None:
        """A call of this process spent ``tokens``; its event is on the way to Kafka."""
        self._entry(tenant_id, period_key).unacked += tokens

    def acknowledged(self, tenant_id: str, period_key: str, tokens: int, partition: int, offset: int) -> None:
        """Kafka stored the event at ``offset``; it counts locally until a notice covers that offset."""
        entry = self._entry(tenant_id, period_key)
        entry.unacked -= tokens
        notice = entry.notice
        if notice is not None and notice.usage_partition == partition and offset <= notice.usage_offset:
            return
        entry.acked.append((partition, offset, tokens))
        entry.acked_tokens += tokens

    def apply_notice(self, notice: QuotaNotice) -> bool:
        """Take a notice unless the one held covers more of the usage partition. True if taken.

        At the same offset the notice read last wins: one key's notices are in one partition of
        the notices topic, so reading order is writing order, and an aggregator's correction of a
        forged notice is written after it (a forged ``emitted_at`` must not outrank it)."""
        entry = self._entry(notice.tenant_id, notice.period_key)
        held = entry.notice
        if held is not None and held.usage_partition == notice.usage_partition and notice.usage_offset < held.usage_offset:
            return False
        entry.notice = notice
        entry.forget_covered()
        self.notices_applied += 1
        self._heard(notice.usage_partition, notice.usage_offset, notice.emitted_at.timestamp())
        return True

    def forget_notice(self, tenant_id: str, period_key: str) -> None:
        """The notice of a tenant-period was removed (a tombstone): the aggregator holds no usage
        for it, so decisions fall back to the limits table (else the middleware's default limit) and
        this process's own spend."""
        entry = self._entries.get((tenant_id, period_key))
        if entry is not None:
            entry.notice = None
            if not entry.local() and not entry.acked and period_key.startswith(COUNTER_PREFIX):
                # A rule counter's notice removed by its aggregator (an ended rate window): with
                # no spend of ours in it, nothing is left to know; every instance holds every
                # tenant's notices, so this is what bounds their memory.
                del self._entries[(tenant_id, period_key)]

    def prune(self, now: float, keep_s: float = 86_400.0) -> int:
        """Forget tenant-periods whose period ended (in every zone: its UTC end plus 14 hours)
        more than ``keep_s`` ago and that hold no unacknowledged spend of ours: closed periods
        would otherwise stay in memory for ever. Custom period keys are kept. Returns how many."""
        ends: dict[str, float | None] = {}
        closed = []
        for key, entry in self._entries.items():
            period_key = key[1]
            if period_key not in ends:
                ends[period_key] = window_value_end(period_key)
            end = ends[period_key]
            if end is not None and end + keep_s < now and not entry.unacked:
                closed.append(key)
        for key in closed:
            del self._entries[key]
        return len(closed)

    def drop(self, tenant_id: str, period_key: str) -> None:
        """Forget a tenant-period (an ended rate window of a rule): its notice and local spend."""
        self._entries.pop((tenant_id, period_key), None)

    def holds(self, tenant_id: str, period_key: str) -> bool:
        return (tenant_id, period_key) in self._entries

    def apply_heartbeat(self, heartbeat: Heartbeat) -> None:
        self._heard(heartbeat.usage_partition, heartbeat.usage_offset, heartbeat.emitted_at.timestamp())

    def _heard(self, partition: int, usage_offset: int, emitted_at: float) -> None:
        """A heartbeat or a notice: either proves the partition's aggregator was alive then."""
        held = self._health.get(partition)
        if held is None or emitted_at >= held.emitted_at:
            self._health[partition] = PartitionHealth(usage_offset, emitted_at)

    def heartbeat_age(self, partition: int, now: float | None = None) -> float | None:
        """Seconds since the aggregator of ``partition`` last sent a heartbeat; None if never.

        Measured from the heartbeat's own timestamp, not its arrival: heartbeats read back from
        the compacted topic at start must not look fresh. Assumes clocks within a second or so.
        """
        health = self._health.get(partition)
        if health is None:
            return None
        return (time.time() if now is None else now) - health.emitted_at

    def heard_offset(self, partition: int) -> int | None:
        """The usage offset the aggregator of ``partition`` last said it has applied (its newest
        heartbeat or notice; ``-1``: none yet); None if never heard from. See ``producer.lag``."""
        health = self._health.get(partition)
        return None if health is None else health.usage_offset

    def notice(self, tenant_id: str, period_key: str) -> QuotaNotice | None:
        entry = self._entries.get((tenant_id, period_key))
        return entry.notice if entry else None
