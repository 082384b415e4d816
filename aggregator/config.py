"""The aggregator's settings: one object, filled from flags and the environment in ``__main__``."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field

from schemas.topics import TopicLayout
from transport.connection import KafkaConnection, flag_from_env, layout_from_env


def default_aggregator_id() -> str:
    return f"aggregator-{socket.gethostname()}-{os.getpid()}"


@dataclass(frozen=True)
class AggregatorConfig:
    connection: KafkaConnection = field(default_factory=KafkaConnection)
    topics: TopicLayout = field(default_factory=TopicLayout)
    group_id: str = "tokenguard-aggregator"
    aggregator_id: str = field(default_factory=default_aggregator_id)
    # Used for tenants without a limit on the limits topic; None: the limit each event carries.
    default_limit: int | None = None
    warning_ratio: float = 0.8
    heartbeat_interval_s: float = 1.0
    # Every not-'ok' notice is published again this often, so a forged or lost one stands at most
    # this long (contradicting notices are corrected at once; this is the bound if that fails).
    reassert_interval_s: float = 30.0
    # A batch closes at ``batch_max`` records or ``batch_window_ms`` after its first record,
    # whichever comes first; a notice waits at most that long before it is published.
    batch_max: int = 20_000
    batch_window_ms: int = 50
    # Event ids remembered per partition to drop duplicates that arrive at a new offset.
    dedup_window: int = 100_000
    # Static group membership: a restarted process with the same id takes its partitions back at
    # once instead of after a session timeout. None: dynamic membership.
    group_instance_id: str | None = None
    session_timeout_ms: int = 10_000
    # Prometheus /metrics, /healthz and /readyz; None: no endpoint. Loopback unless told otherwise.
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    idempotence: bool = True
    create_topics: bool = True

    def __post_init__(self) -> None:
        if not 0.0 < self.warning_ratio <= 1.0:
            raise ValueError(f"warning_ratio must be in (0, 1], got {self.warning_ratio}")
        if self.default_limit is not None and self.default_limit < 0:
            raise ValueError(f"default_limit must be >= 0, got {self.default_limit}")
        if self.heartbeat_interval_s <= 0 or self.reassert_interval_s <= 0:
            raise ValueError("heartbeat_interval_s and reassert_interval_s must be positive")
        if self.batch_max < 1 or self.batch_window_ms < 1 or self.dedup_window < 1:
            raise ValueError("batch_max, batch_window_ms and dedup_window must be positive")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: object) -> AggregatorConfig:
        """``KAFKA_*`` for the connection; ``TOKENGUARD_TOPIC_PREFIX``, ``TOKENGUARD_PARTITIONS``,
        ``TOKENGUARD_GROUP_ID``, ``TOKENGUARD_DEFAULT_LIMIT``, ``TOKENGUARD_WARNING_RATIO``,
        ``TOKENGUARD_IDEMPOTENCE``, ``TOKENGUARD_AGGREGATOR_INSTANCE_ID``, ``TOKENGUARD_DEDUP_WINDOW``,
        ``TOKENGUARD_SESSION_TIMEOUT_MS``, ``TOKENGUARD_REASSERT_INTERVAL_S``. Keyword overrides (from flags) win over the environment."""
        env = os.environ if env is None else env
        default_limit = env.get("TOKENGUARD_DEFAULT_LIMIT")
        values: dict[str, object] = {
            "connection": KafkaConnection.from_env(env),
            "topics": layout_from_env(env),
            "group_id": env.get("TOKENGUARD_GROUP_ID", cls.group_id),
            "default_limit": int(default_limit) if default_limit else None,
            "warning_ratio": float(env.get("TOKENGUARD_WARNING_RATIO", cls.warning_ratio)),
            "idempotence": flag_from_env(env, "TOKENGUARD_IDEMPOTENCE", True),
            "group_instance_id": env.get("TOKENGUARD_AGGREGATOR_INSTANCE_ID") or None,
            "dedup_window": int(env.get("TOKENGUARD_DEDUP_WINDOW", cls.dedup_window)),
            "session_timeout_ms": int(env.get("TOKENGUARD_SESSION_TIMEOUT_MS", cls.session_timeout_ms)),
            "reassert_interval_s": float(env.get("TOKENGUARD_REASSERT_INTERVAL_S", cls.reassert_interval_s)),
            "metrics_port": int(env["TOKENGUARD_METRICS_PORT"]) if env.get("TOKENGUARD_METRICS_PORT") else None,
            "metrics_host": env.get("TOKENGUARD_METRICS_HOST", cls.metrics_host),
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)  # type: ignore[arg-type]
