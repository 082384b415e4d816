"""Topic names and the settings each topic must have: part of the contract, so no Kafka import here."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_PREFIX = "tokenguard."


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    configs: dict[str, str]


@dataclass(frozen=True)
class TopicLayout:
    """The five topics of one deployment; a prefix keeps several deployments apart on one cluster.

    ``partitions`` bounds how many aggregator processes can share the work; usage and totals must
    have the same count, since totals are co-partitioned with the usage they sum.
    """

    prefix: str = DEFAULT_PREFIX
    partitions: int = 6
    replication_factor: int = 1
    usage_retention_ms: int = 30 * 24 * 3600 * 1000

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

    def specs(self) -> list[TopicSpec]:
        """Settings per topic: usage is the durable record, the rest are latest-value-per-key."""
        durable = {"cleanup.policy": "delete", "retention.ms": str(self.usage_retention_ms)}
        compact = {"cleanup.policy": "compact", "min.compaction.lag.ms": "0"}
        return [
            TopicSpec(self.usage, self.partitions, dict(durable)),
            TopicSpec(self.totals, self.partitions, dict(compact)),
            TopicSpec(self.notices, self.partitions, dict(compact)),
            TopicSpec(self.limits, 1, dict(compact)),
            TopicSpec(self.dead_letters, 1, dict(durable)),
        ]
