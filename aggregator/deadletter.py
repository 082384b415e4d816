"""What goes to the dead-letter topic for a usage record that cannot count. Pure, no I/O.

A dead letter keeps the original key, bytes and headers and says why in ``tokenguard.*`` headers,
so an operator can read, fix and re-publish it. It must also always fit: a value just under the
usage topic's size limit plus the error headers would be over it, and a dead letter the broker
refuses stops the aggregator at that record on every restart. So an oversized dead letter keeps
the head of the value, its original length and SHA-256, and a marker header; the full original
stays on the usage topic at the offset the headers name.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

# Below Kafka's default max.message.bytes (1 MiB) with room for the record batch's own overhead.
MAX_DEAD_LETTER_BYTES = 900 * 1024

_PREFIX = "tokenguard."


@dataclass(frozen=True, slots=True)
class DeadLetter:
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]


def dead_letter(
    *,
    key: bytes | None,
    value: bytes | None,
    headers: Sequence[tuple[str, bytes | None]],
    reason: str,
    detail: str,
    topic: str,
    partition: int,
    offset: int,
    aggregator_id: str,
    max_bytes: int = MAX_DEAD_LETTER_BYTES,
) -> DeadLetter:
    """The dead letter of one record, within ``max_bytes`` (key + value + headers)."""
    kept = [(name, header) for name, header in headers if not name.startswith(_PREFIX) and header is not None]
    ours = [
        ("tokenguard.error.reason", reason.encode()),
        ("tokenguard.error.detail", detail[:1000].encode(errors="replace")),
        ("tokenguard.source.topic", topic.encode()),
        ("tokenguard.source.partition", str(partition).encode()),
        ("tokenguard.source.offset", str(offset).encode()),
        ("tokenguard.aggregator", aggregator_id.encode(errors="replace")),
    ]
    if _size(key, value, kept + ours) <= max_bytes:
        return DeadLetter(key, value, kept + ours)
    # Too big: the error headers are what matter; then as much of the key and value as fits.
    whole = (key or b"") + (value or b"")
    ours += [
        ("tokenguard.error.truncated", b"true"),
        ("tokenguard.original.key_bytes", str(len(key or b"")).encode()),
        ("tokenguard.original.value_bytes", str(len(value or b"")).encode()),
        ("tokenguard.original.sha256", hashlib.sha256(whole).hexdigest().encode()),
        ("tokenguard.original.dropped_headers", str(len(kept)).encode()),
    ]
    room = max(0, max_bytes - _size(None, None, ours))
    short_key = key[: min(len(key), 1024, room)] if key is not None else None
    room -= len(short_key or b"")
    short_value = value[:room] if value is not None else None
    return DeadLetter(short_key, short_value, ours)


def _size(key: bytes | None, value: bytes | None, headers: Sequence[tuple[str, bytes]]) -> int:
    return len(key or b"") + len(value or b"") + sum(len(name.encode()) + len(h) + 8 for name, h in headers)
