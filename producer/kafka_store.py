"""The Kafka mode of the middleware: a quota store whose totals live in the aggregator.

Pass it where the seed took a ``QuotaStore``::

    async with KafkaQuotaStore(ProducerConfig.from_env()) as store:
        middleware = TokenGuardMiddleware(quota_store=store, quota_tokens=50_000)

Decisions come from the local snapshot (no network per call); each finished call becomes one
``UsageEvent`` queued for the background publisher.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import secrets
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property

from aiokafka.errors import KafkaError

from producer.config import ProducerConfig
from producer.encoding import encode_event
from producer.errors import InvalidCallError, KafkaUnavailableError, TopicSetupError, UsageSpoolFullError
from producer.inflight import Reservation
from producer.journal import Journal
from producer.lag import AckedOffsets, Behind
from producer.limits_feed import LimitsFeed, LimitsTable
from producer.notices_feed import NoticesFeed
from producer.publisher import UsagePublisher
from producer.rule_gate import ALLOWED, Reserve, RuleGate, RuleView, Verdict
from producer.snapshot import STALE_REASON, QuotaSnapshot, judge_stale
from producer.store import CallUsage, Decision, LimitSource, draft_of
from producer.tenancy import call_attributes
from producer.validation import MAX_ATTRIBUTES, check_attributes, check_call_keys, fit_usage
from schemas.wire import UsageDraft, UsageLike
from transport.admin import ensure_topics, topic_partitions
from transport.errors import TopicMismatchError

log = logging.getLogger(__name__)

# A degraded store retries Kafka after this, doubling up to the cap.
RECONNECT_FIRST_S = 0.5
RECONNECT_MAX_S = 5.0


@dataclass
class StoreStats:
    stale_decisions: int = 0
    stale_refusals: int = 0
    # Of stale_decisions, those made because the aggregator was alive but behind (``producer.lag``).
    lag_stale_decisions: int = 0
    # Starts that found Kafka unreachable and went on degraded; seconds spent degraded (ended spells).
    degraded_starts: int = 0
    degraded_s: float = 0.0


class KafkaQuotaStore:
    """Publisher + notices feed + limits feed + snapshot, with one lifecycle. Implements ``QuotaBackend``.

    A tenant-period without a notice is judged by the tenant's limit on the limits topic (read to
    its end at start, then followed; ``limits.table``), and by the middleware's ``quota_tokens``
    only when no limits record applies.

    When the aggregator of a tenant's usage partition has been silent past ``stale_after_s``
    (``is_stale``), ``config.stale_policy`` decides (``producer.snapshot.judge_stale``). The default,
    ``keep_known``, keeps the snapshot's decision: a tenant known to be over when the aggregator fell
    silent (an ``exceeded`` notice, or its last used plus this process's spend since at its limit)
    stays refused with the exceeded reason; the others are admitted until their local spend takes
    them over. ``fail_open`` (admit all) and ``fail_closed`` (refuse all, ``QuotaUnavailableError``)
    are explicit choices.

    Args:
        config: Connection, topics, instance id (checked against the usage schema by the config).
        attributes: Carried by every usage event (e.g. region, deployment). Checked here against
            the schema's bounds (at most 32; keys 1..64 characters, values at most 256) and for
            size, so no event of this store can be dead-lettered for them: ``ValueError`` /
            ``TypeError`` otherwise.
    """

    def __init__(self, config: ProducerConfig, *, attributes: dict[str, str] | None = None) -> None:
        self._attributes = check_attributes(attributes)
        self.config = config
        self.limits = LimitsFeed(config, LimitsTable())
        self.snapshot = QuotaSnapshot(self.limits.table)
        self.rules = RuleGate(self.limits.rules, self.snapshot)
        # Per event whose call a rule counted: (counter, amount) of each, until Kafka acknowledges it.
        self._rule_spend: dict[str, list[tuple[str, int]]] = {}
        self._crossed: list[RuleView] = []
        self.publisher = UsagePublisher(config, on_delivered=self._delivered)
        self._spool = self.publisher.spool
        self.feed = NoticesFeed(config, self.snapshot)
        self._started = False
        self._valid_keys: set[tuple[str, str]] = set()
        # Event ids: a random per-instance prefix and a counter; unique without a uuid per call.
        self._id_prefix = secrets.token_hex(8)
        self._sequence = itertools.count()
        self._stale_partitions: set[int] = set()
        self._recorded = 0
        # Every event on disk before its call returns (``producer.journal``), when there is a spool.
        self._journal = Journal(config.spool_dir) if config.journal and config.spool_dir is not None else None
        self._journal_base = 0
        self.stats = StoreStats()
        self._degraded_since: float | None = None  # monotonic; None: not degraded
        self._reconnect: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"KafkaQuotaStore(bootstrap={self.config.connection.bootstrap_servers!r}, instance={self.config.instance_id!r})"

    @property
    def degraded(self) -> bool:
        """Started without Kafka (it did not answer within ``start_timeout_s``) and not yet
        reconnected: decisions follow ``stale_policy`` (no aggregator heard from), every call's
        usage goes to the spool, and a background task retries Kafka; once it answers the topics
        are checked, the notices and limits feeds catch up, then the spool is delivered."""
        return self._degraded_since is not None

    async def start(self) -> None:
        """Check the topics, read the notices and limits topics to their ends, start the publisher.

        Kafka not answering within ``config.start_timeout_s``: with a spool and without
        ``strict_start``, return degraded (``degraded``); else raise ``KafkaUnavailableError``
        (chained from the Kafka client's error). Topics that exist with settings this software
        cannot use: ``TopicSetupError``, degraded or not."""
        if self._started:
            return
        if self._journal is not None:
            self._journal.open()
            self._journal_base = self.publisher.stats.published
        try:
            await self._start_parts()
        except BaseException:
            if self._journal is not None:
                self._journal.close(settled=0)  # nothing recorded yet: it goes
            raise
        self._started = True

    async def _start_parts(self) -> None:
        try:
            await self._connect(within=self.config.start_timeout_s)
        except TopicMismatchError as exc:
            await self._close_parts()
            raise TopicSetupError(str(exc)) from exc
        except (KafkaError, OSError) as exc:  # TimeoutError is an OSError
            await self._close_parts()
            where = self.config.connection.bootstrap_servers
            if self.config.strict_start or self.config.spool_dir is None:
                why = "strict_start is set" if self.config.strict_start else "no spool_dir to keep usage in (a strict start)"
                raise KafkaUnavailableError(
                    f"Kafka at {where} did not answer within {self.config.start_timeout_s:g}s ({why}): {exc!r}"
                ) from exc
            await self._start_degraded(exc)
        except BaseException:
            await self._close_parts()
            raise

    async def _connect(self, *, within: float) -> None:
        """Kafka's part of starting, in order: topics checked (created when missing), the feeds
        caught up, the publisher connected (a degraded one then delivers its spool). Reaching the
        cluster is bounded by ``within``; catching up by ``catch_up_timeout_s`` as always."""
        async with asyncio.timeout(within):
            if self.config.create_topics:
                await ensure_topics(self.config.connection, self.config.topics)
            else:
                await topic_partitions(self.config.connection, self.config.topics.usage)
        # Both compacted topics are read to their ends before the first decision, together.
        await _start_all(self.limits.start(), self.feed.start())
        if self.publisher.offline:
            await self.publisher.connect()
        else:
            await self.publisher.start()

    async def _close_parts(self) -> None:
        await self.limits.stop()
        await self.feed.stop()
        if not self.publisher.offline:
            await self.publisher.stop()

    async def _start_degraded(self, error: BaseException) -> None:
        await self.publisher.start(offline=True)
        self._degraded_since = time.monotonic()
        self.stats.degraded_starts += 1
        log.warning(
            "Kafka at %s did not answer within %gs (%r): started DEGRADED: quota decisions follow stale_policy %s, "
            "usage goes to the spool at %s; retrying Kafka in the background",
            self.config.connection.bootstrap_servers, self.config.start_timeout_s, error, self.config.stale_policy,
            self.config.spool_dir,
        )
        self._reconnect = asyncio.create_task(self._reconnect_forever(type(error).__name__), name="tokenguard-reconnect")

    async def _reconnect_forever(self, failing: str) -> None:
        """Retry Kafka with capped backoff until it answers; one log line per change, not per attempt."""
        backoff = RECONNECT_FIRST_S
        where = self.config.connection.bootstrap_servers
        while True:
            await asyncio.sleep(backoff)
            try:
                await self._connect(within=max(self.config.start_timeout_s, self.config.send_timeout_s))
                break
            except Exception as exc:
                await self.limits.stop()
                await self.feed.stop()
                if type(exc).__name__ != failing:
                    failing = type(exc).__name__
                    level = logging.ERROR if isinstance(exc, TopicMismatchError) else logging.WARNING
                    log.log(level, "still degraded: Kafka at %s: %r; retrying every %gs at most", where, exc, RECONNECT_MAX_S)
                backoff = min(backoff * 2, RECONNECT_MAX_S)
        since, self._degraded_since = self._degraded_since, None
        spent = time.monotonic() - since if since is not None else 0.0
        self.stats.degraded_s += spent
        log.warning("Kafka at %s answers: degraded mode over after %.1fs; topics checked, notices and limits caught up, "
                    "delivering %d spooled usage events", where, spent, self.publisher.spool_pending)

    async def stop(self) -> None:
        """Deliver queued usage, then close. Idempotent. Degraded: stop retrying Kafka at once and
        keep the spooled usage on disk for the next start."""
        if not self._started:
            return
        self._started = False
        reconnect, self._reconnect = self._reconnect, None
        if reconnect is not None:
            reconnect.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reconnect
        if self._degraded_since is not None:
            self.stats.degraded_s += time.monotonic() - self._degraded_since
            self._degraded_since = None
        await self.publisher.stop()
        if self._journal is not None:
            self._journal.close(settled=self.publisher.settled - self._journal_base)
        await self.feed.stop()
        await self.limits.stop()

    async def __aenter__(self) -> KafkaQuotaStore:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def check(self, tenant_id: str, period_key: str, quota_tokens: int) -> Decision:
        if (tenant_id, period_key) not in self._valid_keys:
            self._validate_key(tenant_id, period_key)
        if self._spool.full and self.config.spool_full_policy == "block":
            raise UsageSpoolFullError(
                f"Kafka is unreachable and the usage spool is full; call refused so its usage is not lost "
                f"(spool {self.config.spool_dir})"
            )
        if call_attributes():
            self._attributes_now()  # too many with the store's: refused now, not after the call
        decision = self.snapshot.decide(tenant_id, period_key, quota_tokens)
        partition = self.publisher.partition_of(tenant_id)
        age = self.snapshot.heartbeat_age(partition)
        if age is not None and age <= self.config.stale_after_s:
            if partition in self._stale_partitions:
                self._stale_partitions.discard(partition)
                log.warning("aggregator of usage partition %d is heard from again", partition)
            acked = self._acked
            behind = acked.behind(partition, self.snapshot, self.config.max_lag_events, self.config.max_lag_s)
            if behind is not None:
                return self._stale(partition, age, decision, behind)
            if acked.lagging and partition in acked.lagging:
                acked.lagging.discard(partition)
                log.warning("aggregator of usage partition %d has caught up with this process's usage", partition)
            return decision
        return self._stale(partition, age, decision)

    def peek(self, tenant_id: str, period_key: str, quota_tokens: int) -> Decision:
        """The decision ``check`` would make now, without its side effects (no key validation, spool
        check, staleness counting or logging): what ``TokenGuardMiddleware.headroom`` reads."""
        decision = self.snapshot.decide(tenant_id, period_key, quota_tokens)
        partition = self.publisher.partition_of(tenant_id)
        age = self.snapshot.heartbeat_age(partition)
        if age is None or age > self.config.stale_after_s:
            return judge_stale(self.config.stale_policy, decision)
        if self._acked.behind(partition, self.snapshot, self.config.max_lag_events, self.config.max_lag_s) is not None:
            return judge_stale(self.config.lag_policy, decision)
        return decision

    def source_of(self, tenant_id: str, period_key: str) -> LimitSource:
        """Where the governing limit of this tenant-period comes from (``QuotaSnapshot.source``)."""
        return self.snapshot.source(tenant_id, period_key)

    def is_stale(self, tenant_id: str) -> bool:
        """Whether ``tenant_id``'s decisions follow a staleness policy now: ``stale_policy`` when the
        aggregator of its usage partition has not been heard from (heartbeat or notice) for
        ``stale_after_s``, or never; ``lag_policy`` when it is alive but behind this process's own
        acknowledged usage (``max_lag_events`` / ``max_lag_s``, ``producer.lag``)."""
        partition = self.publisher.partition_of(tenant_id)
        age = self.snapshot.heartbeat_age(partition)
        if age is None or age > self.config.stale_after_s:
            return True
        return self._acked.behind(partition, self.snapshot, self.config.max_lag_events, self.config.max_lag_s) is not None

    @cached_property
    def _acked(self) -> AckedOffsets:
        """This process's acknowledged usage offsets the aggregator is not yet heard to cover."""
        return AckedOffsets()

    def _stale(self, partition: int, age: float | None, decision: Decision, behind: Behind | None = None) -> Decision:
        """The aggregator judging this tenant has been silent too long (``stale_policy``), or is
        ``behind`` this process's usage too far (``lag_policy``): apply it (``judge_stale``).
        ``stats.stale_decisions`` counts every decision made so (``stats.lag_stale_decisions``
        those for lag); ``stats.stale_refusals`` counts the refusals for an unknown state
        (``fail_closed``), not those of a tenant known to be over (``keep_known``), which would be
        refused fresh too."""
        self.stats.stale_decisions += 1
        policy = self.config.stale_policy if behind is None else self.config.lag_policy
        if behind is not None:
            self.stats.lag_stale_decisions += 1
            if partition not in self._acked.lagging:
                self._acked.lagging.add(partition)
                log.warning("aggregator of usage partition %d is alive but %s this process's usage; quota decisions "
                            "follow policy %s", partition, behind.describe(), policy)
        elif partition not in self._stale_partitions:
            self._stale_partitions.add(partition)
            heard = "never heard from" if age is None else f"silent for {age:.0f}s"
            log.warning("aggregator of usage partition %d %s; quota decisions follow policy %s", partition, heard, policy)
        judged = judge_stale(policy, decision)
        if judged.reason == STALE_REASON and not judged.allowed:
            self.stats.stale_refusals += 1
        return judged

    def _validate_key(self, tenant_id: str, period_key: str) -> None:
        """Refuse, before the LLM is called, ids the aggregator would dead-letter (``InvalidCallError``)."""
        check_call_keys(tenant_id, period_key)
        if len(self._valid_keys) > 100_000:
            self._valid_keys.clear()
        self._valid_keys.add((tenant_id, period_key))

    def record(self, usage: CallUsage) -> int:
        return self.record_fitted(fit_usage(usage))

    def record_fitted(self, usage: CallUsage) -> int:
        """``record`` for a caller whose counts, model and time are already within the usage
        schema's bounds (``fit_usage`` would return ``usage`` itself): the middleware's are
        (``settle_counts``, ``bound_model``), so its calls skip the check."""
        attributes = self._attributes_now()
        draft = self.draft(usage, attributes)
        journal = self._journal
        if journal is not None and self._started:
            # Encoded once: the journal's bytes are the ones the publisher sends.
            line = encode_event(draft)
            self.publisher.publish(draft, line)
            journal.append(line)
            journal.release(self.publisher.settled - self._journal_base)
        else:
            self.publisher.publish(draft)
        tenant_id = usage.tenant_id
        self.snapshot.add_local(tenant_id, usage.period_key, usage.total_tokens)
        self._recorded += 1
        if not self._recorded % 4096:
            self.snapshot.prune(time.time())
        if self.rules.applies(tenant_id):
            spent, crossed = self.rules.spend(tenant_id, usage, attributes, usage.event_time)
            if spent:
                if len(self._rule_spend) >= 100_000:  # acknowledgements lost: keep counting them as unacked
                    self._rule_spend.clear()
                self._rule_spend[draft.event_id] = spent
            self._crossed = crossed
        return self.snapshot.used(tenant_id, usage.period_key)

    def rules_apply(self, tenant_id: str) -> bool:
        """Whether any quota rule can match a call of ``tenant_id`` (cheap; asked on every call)."""
        return self.rules.applies(tenant_id)

    def admit_rules(self, tenant_id: str, reserve: Reserve, now: datetime, *, views: bool = False) -> Verdict:
        """Whether every quota rule matching the call has room for it (``RuleGate.admit``); the
        reservations held on success go back with ``release_rules``."""
        if not self.rules.applies(tenant_id):
            return ALLOWED
        return self.rules.admit(tenant_id, reserve, self._attributes_now(), now, views=views)

    def release_rules(self, holds: tuple[Reservation, ...]) -> None:
        self.rules.release(holds)

    def rule_views(self, tenant_id: str, model: str | None, now: datetime) -> list[RuleView]:
        """Every rule matching a call of ``model`` now, as it stands (for ``headroom``)."""
        if not self.rules.applies(tenant_id):
            return []
        return self.rules.views(tenant_id, model, self._attributes_now(), now)

    def take_crossed(self) -> list[RuleView]:
        """The rules whose thresholds the last ``record`` crossed (then forgotten)."""
        crossed, self._crossed = self._crossed, []
        return crossed

    def _attributes_now(self) -> dict[str, str]:
        """The store's attributes, with the enclosing ``usage_scope``'s over them."""
        scoped = call_attributes()
        if not scoped:
            return self._attributes
        merged = {**self._attributes, **scoped}
        if len(merged) > MAX_ATTRIBUTES:
            raise InvalidCallError(f"the store's attributes and usage_scope's make {len(merged)}, over {MAX_ATTRIBUTES}")
        return merged

    def draft(self, usage: CallUsage, attributes: dict[str, str] | None = None) -> UsageDraft:
        """The usage event this store publishes for ``usage`` (given as ``record`` has fitted it),
        carrying ``attributes`` (default: the store's own)."""
        return draft_of(usage, f"{self._id_prefix}{next(self._sequence):012x}", self.config.instance_id,
                        self._attributes if attributes is None else attributes)

    def _delivered(self, event: UsageLike, partition: int, offset: int) -> None:
        snapshot = self.snapshot
        snapshot.acknowledged(event.tenant_id, event.period_key, event.total_tokens, partition, offset)
        self._acked.acknowledged(partition, offset)
        self.feed.observe_end(partition, offset)  # a notice covering it is then known to be real
        spent = self._rule_spend.pop(event.event_id, None) if self._rule_spend else None
        if spent:
            for counter, amount in spent:
                if snapshot.holds(event.tenant_id, counter):  # not an ended window already dropped
                    snapshot.acknowledged(event.tenant_id, counter, amount, partition, offset)


async def _start_all(*starts: Awaitable[None]) -> None:
    """Run ``starts`` together; raise the first one's error (as itself, not in a group) once all ended."""
    for outcome in await asyncio.gather(*starts, return_exceptions=True):
        if isinstance(outcome, BaseException):
            raise outcome
