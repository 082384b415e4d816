"""Errors of the aggregator package."""

from __future__ import annotations


class AggregatorError(Exception):
    """Root of every error the aggregator raises on purpose."""


class RestoreError(AggregatorError):
    """State could not be rebuilt from the totals changelog; processing must not start without it."""


class RetentionError(AggregatorError):
    """The usage topic keeps events for less than its periods need (period, seal grace, verify margin)."""
