"""Errors of the transport package: one root, flat subclasses."""

from __future__ import annotations


class TransportError(Exception):
    """Root of every error the Kafka layer raises on purpose."""


class TopicMismatchError(TransportError):
    """An existing topic has settings this software cannot work with (partitions, cleanup policy)."""


class ReadTimeoutError(TransportError):
    """A fixed range of a topic could not be read to its end in time."""
