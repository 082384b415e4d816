"""Configuration: one typed object per component, read from the environment only at the edge."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, field_validator

from producer.snapshot import STALE_POLICIES, StalePolicy
from producer.validation import MAX_INSTANCE_CHARS, check_instance_id
from schemas.topics import TopicLayout
from transport.connection import DeploymentSettings, KafkaConnection

SpoolFullPolicy = Literal["block", "drop_oldest"]


def default_instance_id() -> str:
    """``<host>-<pid>``, the host name cut so the whole fits the usage schema's instance id."""
    suffix = f"-{os.getpid()}"
    host = "".join(c for c in socket.gethostname() if c.isprintable()) or "host"
    return host[: MAX_INSTANCE_CHARS - len(suffix)] + suffix


def default_spool_dir() -> Path:
    return Path.home() / ".cache" / "tokenguard" / "spool"


@dataclass(frozen=True)
class ProducerConfig:
    """Settings of the Kafka side of the middleware: publisher and notices feed."""

    connection: KafkaConnection = field(default_factory=KafkaConnection)
    topics: TopicLayout = field(default_factory=TopicLayout)
    instance_id: str = field(default_factory=default_instance_id)
    # Events waiting for the background sender; past this, publish() counts an overflow loudly.
    queue_max: int = 200_000
    # Events taken from the queue per round trip to the broker.
    batch_max: int = 10_000
    linger_ms: int = 5
    # Off for Kafka-compatible services without idempotent producers (Azure Event Hubs).
    idempotence: bool = True
    create_topics: bool = True
    # How long start() waits for the notices topic to be read to its end.
    catch_up_timeout_s: float = 15.0
    # A batch not acknowledged within this goes to the spool; stop() delivers for at most stop_timeout_s.
    send_timeout_s: float = 5.0
    stop_timeout_s: float = 10.0
    # Where undeliverable usage waits on disk (None: memory only, lost if the process stops).
    spool_dir: Path | None = field(default_factory=default_spool_dir)
    spool_max_bytes: int = 256 * 1024 * 1024
    # When the spool is full: "block" refuses new calls (UsageSpoolFullError) until Kafka takes the
    # spool; "drop_oldest" deletes the oldest spooled events, counted and logged as errors.
    spool_full_policy: SpoolFullPolicy = "block"
    # No heartbeat from a tenant's aggregator for this long makes its quota state stale; then
    # "keep_known" (default; "local_only" is the same policy under its former name) goes on judging
    # with the last known totals plus this process's own spend, so a tenant known to be over stays
    # refused; "fail_open" admits every call (counted), "fail_closed" refuses every call.
    # See ``producer.snapshot.judge_stale``.
    stale_after_s: float = 15.0
    stale_policy: StalePolicy = "keep_known"
    # A heartbeat or notice dated further ahead of this process's clock than this is ignored
    # (counted): one dated 9999 would otherwise keep its partition looking fresh for ever.
    max_clock_skew_s: float = 60.0
    # An aggregator that heartbeats but has not applied this process's own acknowledged events is
    # stale once it is more than max_lag_events records behind the newest of them, or the oldest
    # of them was acknowledged more than max_lag_s ago (``producer.lag``); the partition then
    # follows lag_policy. None turns a test off. The default, fail_closed, refuses the partition's
    # calls until the aggregator is back within both bounds: a fleet that outruns its aggregator is
    # held to what it can count, so the overshoot stays bounded (keep_known would let each
    # instance go on alone). The bounds are far above a healthy pipeline's (an event counts as
    # applied ~1.5 s after it is acknowledged) and above the backlog an aggregator deploy leaves
    # (15 s of a partition's usage at thousands of events/s): 100_000 records, 60 s.
    max_lag_events: int | None = 100_000
    max_lag_s: float | None = 60.0
    lag_policy: StalePolicy = "fail_closed"
    # Write every usage event to a journal in the spool folder before the call returns
    # (``producer.journal``), so a process killed with events still queued loses none of them;
    # needs a spool_dir. False: events queued in memory die with the process.
    journal: bool = True
    # start() waits this long for Kafka. Unreachable by then: the store starts degraded (decisions
    # by the staleness policy, usage to the spool, Kafka retried in the background), or, with
    # strict_start (or no spool_dir), raises KafkaUnavailableError as the only way to start.
    start_timeout_s: float = 5.0
    strict_start: bool = False

    def __post_init__(self) -> None:
        check_instance_id(self.instance_id)  # in every usage event: one the aggregator would refuse loses them all
        if self.spool_full_policy not in ("block", "drop_oldest"):
            raise ValueError(f"spool_full_policy must be 'block' or 'drop_oldest', got {self.spool_full_policy!r}")
        for name, policy in (("stale_policy", self.stale_policy), ("lag_policy", self.lag_policy)):
            if policy not in STALE_POLICIES:
                raise ValueError(f"{name} must be one of {', '.join(STALE_POLICIES)}, got {policy!r}")
        if self.send_timeout_s <= 0 or self.stale_after_s <= 0 or not self.max_clock_skew_s > 0 or not self.start_timeout_s > 0:
            raise ValueError("send_timeout_s, stale_after_s, max_clock_skew_s and start_timeout_s must be positive")
        if self.max_lag_events is not None and self.max_lag_events < 1:
            raise ValueError(f"max_lag_events must be at least 1 (None: off), got {self.max_lag_events}")
        if self.max_lag_s is not None and not self.max_lag_s > 0:
            raise ValueError(f"max_lag_s must be positive (None: off), got {self.max_lag_s}")

    def with_bootstrap(self, bootstrap_servers: str) -> ProducerConfig:
        return replace(self, connection=replace(self.connection, bootstrap_servers=bootstrap_servers))

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ProducerConfig:
        """The middleware's environment (``ProducerSettings``): ``KAFKA_*``, ``TOKENGUARD_TOPIC_PREFIX``,
        ``TOKENGUARD_PARTITIONS``, ``TOKENGUARD_INSTANCE_ID``, ``TOKENGUARD_IDEMPOTENCE``,
        ``TOKENGUARD_SPOOL_DIR`` (empty: no spool), ``TOKENGUARD_SPOOL_MAX_BYTES``,
        ``TOKENGUARD_SPOOL_FULL_POLICY``, ``TOKENGUARD_STALE_AFTER_S``, ``TOKENGUARD_STALE_POLICY``,
        ``TOKENGUARD_MAX_CLOCK_SKEW_S``, ``TOKENGUARD_MAX_LAG_EVENTS``, ``TOKENGUARD_MAX_LAG_S`` (``off``:
        that lag test is off), ``TOKENGUARD_START_TIMEOUT_S``, ``TOKENGUARD_STRICT_START``. ``SettingsError`` (a ``ValueError``) names each invalid one."""
        return ProducerSettings.read(env).config()


class ProducerSettings(DeploymentSettings):
    """The middleware's settings from the environment; ``config()`` is the ``ProducerConfig``."""

    empty_is_a_value: ClassVar[frozenset[str]] = frozenset({"TOKENGUARD_SPOOL_DIR"})

    instance_id: str = Field(default_factory=default_instance_id, validation_alias="TOKENGUARD_INSTANCE_ID")
    spool_dir: Path | None = Field(default_factory=default_spool_dir, validation_alias="TOKENGUARD_SPOOL_DIR")
    spool_max_bytes: int = Field(ProducerConfig.spool_max_bytes, gt=0, validation_alias="TOKENGUARD_SPOOL_MAX_BYTES")
    spool_full_policy: SpoolFullPolicy = Field("block", validation_alias="TOKENGUARD_SPOOL_FULL_POLICY")
    stale_after_s: float = Field(ProducerConfig.stale_after_s, gt=0, validation_alias="TOKENGUARD_STALE_AFTER_S")
    stale_policy: StalePolicy = Field(ProducerConfig.stale_policy, validation_alias="TOKENGUARD_STALE_POLICY")
    max_clock_skew_s: float = Field(ProducerConfig.max_clock_skew_s, gt=0, validation_alias="TOKENGUARD_MAX_CLOCK_SKEW_S")
    max_lag_events: int | None = Field(ProducerConfig.max_lag_events, ge=1, validation_alias="TOKENGUARD_MAX_LAG_EVENTS")
    max_lag_s: float | None = Field(ProducerConfig.max_lag_s, gt=0, validation_alias="TOKENGUARD_MAX_LAG_S")
    lag_policy: StalePolicy = Field(ProducerConfig.lag_policy, validation_alias="TOKENGUARD_LAG_POLICY")
    journal: bool = Field(ProducerConfig.journal, validation_alias="TOKENGUARD_JOURNAL")
    start_timeout_s: float = Field(ProducerConfig.start_timeout_s, gt=0, le=3600, validation_alias="TOKENGUARD_START_TIMEOUT_S")
    strict_start: bool = Field(ProducerConfig.strict_start, validation_alias="TOKENGUARD_STRICT_START")

    @field_validator("instance_id")
    @classmethod
    def _fits_the_schema(cls, value: str) -> str:
        return check_instance_id(value)

    @field_validator("spool_dir", mode="before")
    @classmethod
    def _empty_means_no_spool(cls, value: object) -> object:
        if isinstance(value, str):
            return Path(value).expanduser() if value.strip() else None
        return value

    @field_validator("max_lag_events", "max_lag_s", mode="before")
    @classmethod
    def _off_means_none(cls, value: object) -> object:
        if isinstance(value, str) and value.strip().lower() in ("off", "none"):
            return None
        return value

    def config(self) -> ProducerConfig:
        return ProducerConfig(
            connection=self.connection(), topics=self.layout(), instance_id=self.instance_id,
            idempotence=self.idempotence, spool_dir=self.spool_dir, spool_max_bytes=self.spool_max_bytes,
            spool_full_policy=self.spool_full_policy, stale_after_s=self.stale_after_s,
            stale_policy=self.stale_policy, max_clock_skew_s=self.max_clock_skew_s,
            max_lag_events=self.max_lag_events, max_lag_s=self.max_lag_s, lag_policy=self.lag_policy,
            journal=self.journal,
            start_timeout_s=self.start_timeout_s, strict_start=self.strict_start,
        )
