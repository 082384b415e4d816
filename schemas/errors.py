"""Errors of the schemas package."""

from __future__ import annotations


class SchemaError(Exception):
    """Root of the schemas package's errors."""


class DecodeError(SchemaError):
    """Bytes that are not a valid record; ``reason`` is short and safe to put in a dead-letter header."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
