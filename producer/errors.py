"""Errors of the producer package: one root, flat subclasses."""

from __future__ import annotations

from typing import Any

from transport.errors import TopicMismatchError


class TokenGuardError(Exception):
    """Root of every error this package raises on purpose."""


class QuotaExceededError(TokenGuardError, RuntimeError):
    """Raised before the LLM is called when the tenant's quota for the period is used up.

    A ``RuntimeError`` too, as in the seed, so existing ``except RuntimeError`` code keeps working;
    its message is the seed's. Raised by the middleware, it also says what the caller can do:

    Attributes:
        tenant_id, period_key: The tenant-period refused.
        period_kind: ``month``, ``day``, ``week``, ``seed_week``, or None (a custom period key).
        used: Tokens counted against the limit (this process's in-flight reservations included).
        limit: The governing limit.
        remaining: ``max(0, limit - used)``.
        source: Where the limit came from: ``notice`` (the aggregator's), ``limits_topic`` (the
            tenant's record or the topic's default record) or ``middleware_default``
            (``quota_tokens``).
        reason: The alert payload's ``reason``.
        retry_after_s: Seconds until the period key's window ends (the key changes and the tenant
            starts afresh); None when unknown (a custom period key function) or when the refusal
            does not end with the window (too many calls in flight, quota state unavailable).
        rules: For a refusal by quota rules (``reason`` ``rule_exceeded``, or ``unpriced_model`` for
            a cost rule that cannot price the call's model): one dict per refusing rule with
            ``rule``, ``window`` (its counter key), ``measure``, ``used``, ``limit``,
            ``remaining``, ``retry_after_s`` and ``action``; ``used``/``limit`` above are the
            first one's, ``source`` is ``rule``, ``retry_after_s`` the longest wait. None otherwise.
        alert: The alert payload with every field above (what ``on_quota_exceeded`` receives when
            the middleware is built with ``alert_details=True``).

    Every attribute is None when the error was raised with a message only.
    """

    def __init__(
        self,
        message: str = "",
        *,
        tenant_id: str | None = None,
        period_key: str | None = None,
        period_kind: str | None = None,
        used: int | None = None,
        limit: int | None = None,
        remaining: int | None = None,
        source: str | None = None,
        reason: str | None = None,
        retry_after_s: float | None = None,
        alert: dict[str, Any] | None = None,
        rules: list[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(message)
        self.tenant_id = tenant_id
        self.period_key = period_key
        self.period_kind = period_kind
        self.used = used
        self.limit = limit
        self.remaining = remaining
        self.source = source
        self.reason = reason
        self.retry_after_s = retry_after_s
        self.alert = alert
        self.rules = rules


class PublisherError(TokenGuardError):
    """The usage publisher was used outside its lifecycle (not started, or stopped)."""


class QuotaUnavailableError(QuotaExceededError):
    """Refused because the quota state is unknown (aggregator silent past ``stale_after_s``) and the
    staleness policy is ``fail_closed``. A ``QuotaExceededError``, so existing handlers see a block."""


class UsageSpoolFullError(TokenGuardError):
    """Refused before the LLM call: Kafka is away and the usage spool is full (policy ``block``), so
    the call's usage could not be kept."""


class InvalidCallError(TokenGuardError, ValueError):
    """Refused before the LLM call: what the application supplied for this call (the tenant id from
    ``user_id_getter``, the period key from ``period_key_fn``) does not fit the usage schema, so the
    call's usage could never be counted. A ``ValueError`` too: it is a usage mistake."""


class KafkaUnavailableError(TokenGuardError, ConnectionError):
    """``KafkaQuotaStore.start()`` could not reach Kafka within ``start_timeout_s`` and may not start
    degraded (``strict_start``, or no ``spool_dir`` to keep usage in). Chained from the Kafka
    client's own error (``__cause__``)."""


class TopicSetupError(TokenGuardError, TopicMismatchError):
    """Kafka answered but its topics cannot be used as configured (cleanup policy, partitions). A
    ``TopicMismatchError`` too, so existing handlers keep working."""


class WaitTimeoutError(TokenGuardError, TimeoutError):
    """A wait the caller asked for did not end in time: ``UsagePublisher.flush`` (events not yet
    acknowledged), a feed's ``wait_until``. A ``TimeoutError`` too, as before."""
