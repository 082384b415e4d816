"""Kafka -> limits table: every middleware process reads the whole compacted limits topic.

So a tenant's own limit governs from its first call, in every instance, before the aggregator has
anything to say about it (it sends no notice while a tenant is 'ok'). The topic is read to its end
at start, before the first decision (as the notices topic is), then followed: a limit set or
deleted while the process runs applies as soon as its record is read.

The table is pure and compact: per tenant a ``TenantLimit`` (limit, period kind, warning ratio),
not the validated model, so 100,000 tenants take about 20 MB (``bench/limits_catchup.py``). Which
record applies to a tenant-period is ``schemas.rules.applicable``, the aggregator's own rule.

A record that is not a limit (a key that is not ours, a value that does not decode, a key naming
one tenant and a value another) is skipped, counted and logged by the follower, exactly as the
aggregator's limits feed skips it; the records after it are applied as if it were not there.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from aiokafka.structs import ConsumerRecord

from producer.config import ProducerConfig
from producer.errors import WaitTimeoutError
from schemas.errors import DecodeError
from schemas.periods import period_kind
from schemas.rulebook import RuleBook
from schemas.rules import LimitRecord, TenantLimit, applicable, read_policy_record
from transport.follower import TopicFollower

log = logging.getLogger(__name__)

# Period keys whose kind is remembered (a process sees a handful: this month, today, ...).
_MAX_KINDS = 1_000


class LimitsTable:
    """Tenant -> ``TenantLimit``, plus the topic's default record. Pure; one event loop owns it."""

    def __init__(self) -> None:
        self.per_tenant: dict[str, TenantLimit] = {}
        self.default: TenantLimit | None = None
        self._kinds: dict[str, str | None] = {}

    def __len__(self) -> int:
        return len(self.per_tenant) + (self.default is not None)

    def set(self, tenant_id: str | None, limit: TenantLimit) -> None:
        if tenant_id is None:
            self.default = limit
        else:
            self.per_tenant[tenant_id] = limit

    def delete(self, tenant_id: str | None) -> None:
        if tenant_id is None:
            self.default = None
        else:
            self.per_tenant.pop(tenant_id, None)

    def rule(self, tenant_id: str, period_key: str) -> TenantLimit | None:
        """The limits record that governs this tenant-period; None when none does."""
        own = self.per_tenant.get(tenant_id)
        if own is None and self.default is None:
            return None
        return applicable(own, self.default, period_key, kind=self._kind(period_key))

    def limit_for(self, tenant_id: str, period_key: str) -> int | None:
        """The governing record's limit; None when none does (the caller's own default applies)."""
        rule = self.rule(tenant_id, period_key)
        return None if rule is None else rule.limit_tokens

    def _kind(self, period_key: str) -> str | None:
        kinds = self._kinds
        if period_key in kinds:
            return kinds[period_key]
        if len(kinds) >= _MAX_KINDS:
            kinds.clear()
        kind = kinds[period_key] = period_kind(period_key)
        return kind


class LimitsFeed:
    """Keeps a ``LimitsTable`` (tenant limits) and a ``RuleBook`` (quota rules and prices) current
    with the limits topic."""

    def __init__(self, config: ProducerConfig, table: LimitsTable, rules: RuleBook | None = None) -> None:
        self.table = table
        self.rules = rules if rules is not None else RuleBook()
        self._follower = TopicFollower(
            config.connection,
            config.topics.limits,
            self._take,
            client_id=f"tokenguard-limits-{config.instance_id}",
            catch_up_s=config.catch_up_timeout_s,
            strict=False,
        )

    @property
    def invalid(self) -> int:
        """Records skipped: not limits, not readable, or not parseable by the Kafka client."""
        return sum(self._follower.skipped.values())

    @property
    def skipped(self) -> dict[str, int]:
        """Skipped records per reason."""
        return dict(self._follower.skipped)

    @property
    def failed(self) -> BaseException | None:
        """Why following the limits topic stopped, if it did: later changes are not applied then."""
        return self._follower.failed

    async def start(self) -> None:
        """Return once the topic is read to where it ended at start (or ``catch_up_timeout_s``
        passed: logged, and following goes on); then follow changes."""
        await self._follower.start()
        log.info("limits loaded: %d tenants, default %s; %d rules, %d prices", len(self.table.per_tenant),
                 self.table.default, len(self.rules), len(self.rules.prices))

    async def stop(self) -> None:
        """Idempotent."""
        await self._follower.stop()

    async def __aenter__(self) -> LimitsFeed:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def wait_until(self, predicate: Callable[[LimitsTable], bool], timeout: float) -> None:
        """Wait until ``predicate(table)`` holds, re-checking after every batch of records."""
        try:
            await self._follower.wait_until(lambda: predicate(self.table), timeout)
        except TimeoutError:
            raise WaitTimeoutError(f"the limits topic did not reach the awaited state within {timeout}s") from None

    async def _take(self, records: list[ConsumerRecord]) -> None:
        table, rules = self.table, self.rules
        for record in records:
            try:
                change = read_policy_record(record.key, record.value)
            except DecodeError as exc:
                self._follower.skip(partition=record.partition, offset=record.offset, reason=exc.reason, detail=exc.detail)
                continue
            if isinstance(change, LimitRecord):
                if change.limit is None:
                    table.delete(change.tenant_id)
                else:
                    table.set(change.tenant_id, TenantLimit.of(change.limit))
            else:
                rules.take(change)
