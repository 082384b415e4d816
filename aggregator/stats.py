"""What the aggregator counts about itself; read by ``/metrics`` at scrape time."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class AggregatorStats:
    events: int = 0
    replays_skipped: int = 0
    duplicates_dropped: int = 0
    dead_letters: int = 0
    notices: int = 0
    heartbeats: int = 0
    flushes: int = 0
    commit_failures: int = 0
    restored_keys: int = 0
    last_restore_s: float = 0.0
    id_conflicts: int = 0
    unreadable_records: int = 0
    changelog_rejected: int = 0
    reasserted: int = 0
    corrections: int = 0
    rate_windows_expired: int = 0
    adjustments: int = 0
    sealed: int = 0
