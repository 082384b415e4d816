"""Topic names and the settings each topic must have: part of the contract, so no Kafka import here."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

DEFAULT_PREFIX = "tokenguard."
DAY_S = 86_400
# The longest period the fleet counts in by default: a calendar month, at most 31 days.
DEFAULT_LONGEST_PERIOD_S = 31 * DAY_S
# How long after a period's end its late events still count in it (the aggregator seals it then).
DEFAULT_SEAL_GRACE_S = 6 * 3600


def required_retention_ms(longest_period_s: float, seal_grace_s: float) -> int:
    """How long the usage topic must keep an event: the longest period plus the seal grace, so
    every event of a period is still there when the period seals, plus one more longest period,
    so the period before the current one can still be verified or replayed from the topic after
    it sealed (``tokenguard verify`` and ``replay`` read usage from its start). Monthly periods:
    2 x 31 days + 6 h = 62.25 days."""
    return math.ceil((2 * longest_period_s + seal_grace_s) * 1000)


def default_usage_retention_ms(longest_period_s: float, seal_grace_s: float) -> int:
    """The ``retention.ms`` the usage topic is created with: the required retention rounded up to
    whole days (63 days for monthly periods), a figure an operator reads at a glance."""
    day_ms = DAY_S * 1000
    return math.ceil(required_retention_ms(longest_period_s, seal_grace_s) / day_ms) * day_ms


def _days(ms: float) -> str:
    return f"{ms / (DAY_S * 1000):.2f}".rstrip("0").rstrip(".")


def retention_problem(
    topic: str, configs: Mapping[str, str], *, longest_period_s: float, seal_grace_s: float, bootstrap: str = "HOST"
) -> str | None:
    """One line when ``topic``'s ``retention.ms`` (as described by the broker) is finite and shorter
    than ``required_retention_ms``: what it is, what is needed and why, and how to fix it. None
    when it is long enough, or infinite (-1)."""
    required = required_retention_ms(longest_period_s, seal_grace_s)
    raw = configs.get("retention.ms")
    try:
        retention = int(raw) if raw is not None else None
    except ValueError:
        return f"topic {topic!r} has retention.ms={raw!r}, not a number of milliseconds"
    if retention is None or retention < 0 or retention >= required:
        return None
    wanted = default_usage_retention_ms(longest_period_s, seal_grace_s)
    return (
        f"topic {topic!r} keeps events {_days(retention)} days (retention.ms={retention}) but needs at least "
        f"{_days(required)} days: the longest period ({_days(longest_period_s * 1000)} days) plus the seal grace "
        f"({seal_grace_s / 3600:g} h), plus one more longest period to verify or replay the previous one after it "
        f"seals; raise it with kafka-configs --bootstrap-server {bootstrap} --alter --entity-type topics --entity-name "
        f"{topic} --add-config retention.ms={wanted}, or set TOKENGUARD_ALLOW_SHORT_RETENTION=true to start anyway"
    )


def retention_bytes_warning(topic: str, configs: Mapping[str, str]) -> str | None:
    """One line when ``topic`` has a ``retention.bytes`` limit: each partition then deletes its
    oldest events beyond that size whatever their age, periods still open included."""
    raw = configs.get("retention.bytes")
    if raw is None or raw.strip() == "-1":
        return None
    return (
        f"topic {topic!r} has retention.bytes={raw}: each partition deletes its oldest events beyond that "
        f"size whatever their age, even of periods still open; size it from the events per day (README, "
        f"'Sizing the usage topic') or set it to -1"
    )


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    configs: dict[str, str]


@dataclass(frozen=True)
class TopicLayout:
    """The six topics of one deployment; a prefix keeps several deployments apart on one cluster.

    ``partitions`` bounds how many aggregator processes can share the work; usage and totals must
    have the same count, since totals are co-partitioned with the usage they sum.
    """

    prefix: str = DEFAULT_PREFIX
    partitions: int = 6
    # None: the cluster's (three copies on three brokers or more, else one per broker).
    replication_factor: int | None = None
    # Derived from the default longest period (a month) and seal grace: 63 days. A deployment that
    # counts in longer periods gets its own from ``AggregatorSettings`` (``TOKENGUARD_LONGEST_PERIOD_S``).
    usage_retention_ms: int = default_usage_retention_ms(DEFAULT_LONGEST_PERIOD_S, DEFAULT_SEAL_GRACE_S)

    @property
    def usage(self) -> str:
        return f"{self.prefix}usage"

    @property
    def totals(self) -> str:
        return f"{self.prefix}totals"

    @property
    def notices(self) -> str:
        return f"{self.prefix}notices"

    @property
    def limits(self) -> str:
        return f"{self.prefix}limits"

    @property
    def dead_letters(self) -> str:
        return f"{self.prefix}usage.dlq"

    @property
    def sealed(self) -> str:
        """Closed periods for billing: ``schemas.sealed`` (co-partitioned with usage)."""
        return f"{self.prefix}sealed"

    def specs(self) -> list[TopicSpec]:
        """Settings per topic: usage is the durable record, the rest are latest-value-per-key."""
        durable = {"cleanup.policy": "delete", "retention.ms": str(self.usage_retention_ms)}
        compact = {"cleanup.policy": "compact", "min.compaction.lag.ms": "0"}
        # The broker's own clock stamps every usage record: which events a sealed period holds is
        # decided by these timestamps (``schemas.sealed``), so no client's clock can move one.
        usage = {**durable, "message.timestamp.type": "LogAppendTime"}
        return [
            TopicSpec(self.usage, self.partitions, usage),
            TopicSpec(self.totals, self.partitions, dict(compact)),
            TopicSpec(self.notices, self.partitions, dict(compact)),
            TopicSpec(self.limits, 1, dict(compact)),
            TopicSpec(self.dead_letters, 1, dict(durable)),
            TopicSpec(self.sealed, self.partitions, dict(compact)),
        ]


def timestamp_warning(topic: str, configs: Mapping[str, str], *, bootstrap: str = "<servers>") -> str | None:
    """One line when the usage topic keeps its producers' timestamps: sealing decides by record
    timestamps (``schemas.sealed``), and only the broker's own (``LogAppendTime``, what this
    software creates the topic with) are monotonic per partition and out of every client's hands.
    A topic created before that keeps ``CreateTime`` until altered."""
    if configs.get("message.timestamp.type", "CreateTime") == "LogAppendTime":
        return None
    return (f"topic {topic!r} keeps its producers' timestamps (message.timestamp.type=CreateTime): periods seal by "
            f"record timestamps, so a producer's clock can move an event across a seal, and after an aggregator "
            f"restart an event of a sealed period stamped before its seal reopens it; use the broker's clock: "
            f"kafka-configs --bootstrap-server {bootstrap} --alter --entity-type topics --entity-name {topic} "
            f"--add-config message.timestamp.type=LogAppendTime")
