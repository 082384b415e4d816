"""Topic names and the settings each topic must have: part of the contract, so no Kafka import here."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_PREFIX = "tokenguard."


@dataclass(frozen=True)
class TopicSpec:
    name: str
    configs: dict[str, str]


@dataclass(frozen=True)
class TopicNames:
    """The five topics of one deployment; a prefix keeps several deployments apart on one cluster."""

    prefix: str = DEFAULT_PREFIX

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

    def specs(self, *, usage_retention_ms: int = 30 * 24 * 3600 * 1000) -> list[TopicSpec]:
        """Settings per topic: usage is the durable record, the rest are latest-value-per-key."""
        compact = {"cleanup.policy": "compact", "min.compaction.lag.ms": "0"}
        return [
            TopicSpec(self.usage, {"cleanup.policy": "delete", "retention.ms": str(usage_retention_ms)}),
            TopicSpec(self.totals, dict(compact)),
            TopicSpec(self.notices, dict(compact)),
            TopicSpec(self.limits, dict(compact)),
            TopicSpec(self.dead_letters, {"cleanup.policy": "delete", "retention.ms": str(usage_retention_ms)}),
        ]
