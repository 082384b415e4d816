"""The aggregator's settings: ``AggregatorConfig`` (built in code, changed with ``dataclasses.replace``)
and ``AggregatorSettings``, which reads it from the environment and the command line's flags."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from pydantic import Field

from schemas._types import MAX_LIMIT_TOKENS, Identifier
from schemas.topics import (
    DEFAULT_LONGEST_PERIOD_S,
    DEFAULT_SEAL_GRACE_S,
    TopicLayout,
    default_usage_retention_ms,
    required_retention_ms,
)
from transport.connection import DeploymentSettings, KafkaConnection, NonBlank

# Ten years: a bound that keeps a typo (milliseconds for seconds) from asking for centuries of retention.
MAX_PERIOD_S = 3660 * 86_400


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
    # A rule's rate-window counter is dropped (memory, changelog, notice) this long after its
    # window ended; an event of the window that arrives later starts a fresh counter for it.
    rate_window_keep_s: float = 60.0
    # Records are polled and applied in slices of ``poll_window_ms`` (from a slice's first
    # record). The changes are flushed (changelog, notices, offset commit) at ``batch_max``
    # records or ``batch_window_ms`` after the first record since the last flush, whichever comes
    # first; and at once after a slice that leaves a notice to publish, so a notice waits about
    # one slice, not a whole window. Every flush writes each changed key once: a longer window
    # coalesces more events per changelog record (250 ms against 50: ~12 against ~14 us of CPU an
    # event catching up; see the README's performance section).
    batch_max: int = 20_000
    batch_window_ms: int = 250
    poll_window_ms: int = 10
    # Event ids remembered per partition to drop duplicates that arrive at a new offset.
    dedup_window: int = 100_000
    # Static group membership: a restarted process with the same id takes its partitions back at
    # once instead of after a session timeout. None: dynamic membership.
    group_instance_id: str | None = None
    session_timeout_ms: int = 10_000
    # Prometheus /metrics, /healthz and /readyz; None: no endpoint. Loopback unless told otherwise.
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    # Per-tenant gauges on /metrics: the top this many tenant-periods by tokens used, plus every
    # one not 'ok' (a bound on the series a scrape returns; 0: only the ones not 'ok').
    metrics_top_tenants: int = 50
    idempotence: bool = True
    create_topics: bool = True
    # How long after a period's end its late events still count in it; the period seals then.
    seal_grace_s: float = float(DEFAULT_SEAL_GRACE_S)
    # The longest period or window the fleet counts in (a calendar month by default; a year rule
    # needs 366 days). With the grace it sets the usage topic's required retention.
    longest_period_s: float = float(DEFAULT_LONGEST_PERIOD_S)
    # Start even though the usage topic keeps events for less than ``required_retention_ms`` (a warning).
    allow_short_retention: bool = False
    # Seal each tenant-period seal_grace_s after its period ended (``schemas.sealed``): its final
    # totals go to the sealed topic, it leaves memory and the changelog, later events become
    # adjustments. False: periods never close (every event adds to its tenant-period for ever).
    seal_periods: bool = True

    @property
    def required_retention_ms(self) -> int:
        """How long the usage topic must keep events: ``schemas.topics.required_retention_ms``."""
        return required_retention_ms(self.longest_period_s, self.seal_grace_s)

    def __post_init__(self) -> None:
        if not 0.0 < self.warning_ratio <= 1.0:
            raise ValueError(f"warning_ratio must be in (0, 1], got {self.warning_ratio}")
        if self.default_limit is not None and self.default_limit < 0:
            raise ValueError(f"default_limit must be >= 0, got {self.default_limit}")
        if self.heartbeat_interval_s <= 0 or self.reassert_interval_s <= 0 or self.rate_window_keep_s < 0:
            raise ValueError("heartbeat_interval_s, reassert_interval_s must be positive, rate_window_keep_s >= 0")
        if self.metrics_top_tenants < 0:
            raise ValueError(f"metrics_top_tenants must be >= 0, got {self.metrics_top_tenants}")
        if self.batch_max < 1 or self.batch_window_ms < 1 or self.poll_window_ms < 1 or self.dedup_window < 1:
            raise ValueError("batch_max, batch_window_ms, poll_window_ms and dedup_window must be positive")
        if not 0 < self.longest_period_s <= MAX_PERIOD_S or not 0 <= self.seal_grace_s <= MAX_PERIOD_S:
            raise ValueError(f"longest_period_s must be in (0, {MAX_PERIOD_S}] and seal_grace_s in [0, {MAX_PERIOD_S}], "
                             f"got {self.longest_period_s} and {self.seal_grace_s}")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> AggregatorConfig:
        """The aggregator's environment (``AggregatorSettings``), with ``overrides`` (flags, by field
        name; ``None`` is skipped) winning. ``SettingsError`` (a ``ValueError``) names each invalid value."""
        return AggregatorSettings.read(env, **overrides).config()


class AggregatorSettings(DeploymentSettings):
    """The aggregator's settings from the environment (``KAFKA_*`` and ``TOKENGUARD_*``); ``config()``
    is the ``AggregatorConfig``. The field names are ``AggregatorConfig``'s, so flags override by name."""

    group_id: Identifier = Field(AggregatorConfig.group_id, validation_alias="TOKENGUARD_GROUP_ID")
    default_limit: int | None = Field(None, ge=0, le=MAX_LIMIT_TOKENS, validation_alias="TOKENGUARD_DEFAULT_LIMIT")
    warning_ratio: float = Field(AggregatorConfig.warning_ratio, gt=0, le=1, validation_alias="TOKENGUARD_WARNING_RATIO")
    group_instance_id: Identifier | None = Field(None, validation_alias="TOKENGUARD_AGGREGATOR_INSTANCE_ID")
    dedup_window: int = Field(AggregatorConfig.dedup_window, ge=1, validation_alias="TOKENGUARD_DEDUP_WINDOW")
    session_timeout_ms: int = Field(AggregatorConfig.session_timeout_ms, ge=1, validation_alias="TOKENGUARD_SESSION_TIMEOUT_MS")
    reassert_interval_s: float = Field(AggregatorConfig.reassert_interval_s, gt=0,
                                       validation_alias="TOKENGUARD_REASSERT_INTERVAL_S")
    metrics_port: int | None = Field(None, ge=1, le=65_535, validation_alias="TOKENGUARD_METRICS_PORT")
    metrics_host: NonBlank = Field(AggregatorConfig.metrics_host, validation_alias="TOKENGUARD_METRICS_HOST")
    metrics_top_tenants: int = Field(AggregatorConfig.metrics_top_tenants, ge=0, le=10_000,
                                     validation_alias="TOKENGUARD_METRICS_TOP_TENANTS")
    seal_grace_s: float = Field(AggregatorConfig.seal_grace_s, ge=0, le=MAX_PERIOD_S,
                                validation_alias="TOKENGUARD_SEAL_GRACE_S")
    longest_period_s: float = Field(AggregatorConfig.longest_period_s, gt=0, le=MAX_PERIOD_S,
                                    validation_alias="TOKENGUARD_LONGEST_PERIOD_S")
    allow_short_retention: bool = Field(False, validation_alias="TOKENGUARD_ALLOW_SHORT_RETENTION")
    seal_periods: bool = Field(AggregatorConfig.seal_periods, validation_alias="TOKENGUARD_SEAL_PERIODS")

    def config(self) -> AggregatorConfig:
        # The usage topic is created with the retention its periods need (63 days for months).
        layout = replace(self.layout(), usage_retention_ms=default_usage_retention_ms(self.longest_period_s,
                                                                                      self.seal_grace_s))
        return AggregatorConfig(
            connection=self.connection(), topics=layout, group_id=self.group_id,
            default_limit=self.default_limit, warning_ratio=self.warning_ratio,
            group_instance_id=self.group_instance_id, dedup_window=self.dedup_window,
            session_timeout_ms=self.session_timeout_ms, reassert_interval_s=self.reassert_interval_s,
            metrics_port=self.metrics_port, metrics_host=self.metrics_host,
            metrics_top_tenants=self.metrics_top_tenants, idempotence=self.idempotence,
            seal_grace_s=self.seal_grace_s, longest_period_s=self.longest_period_s,
            allow_short_retention=self.allow_short_retention, seal_periods=self.seal_periods,
        )
