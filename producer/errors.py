"""Errors of the producer package: one root, flat subclasses."""

from __future__ import annotations


class TokenGuardError(Exception):
    """Root of every error this package raises on purpose."""


class QuotaExceededError(TokenGuardError, RuntimeError):
    """Raised before the LLM is called when the tenant's quota for the period is used up.

    A ``RuntimeError`` too, as in the seed, so existing ``except RuntimeError`` code keeps working.
    """


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
