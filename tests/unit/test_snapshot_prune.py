"""The middleware's snapshot forgets closed periods (issue 12): memory bounded by open periods."""

from __future__ import annotations

from datetime import UTC, datetime

from producer.snapshot import QuotaSnapshot

NOW = datetime(2026, 11, 29, 15, tzinfo=UTC).timestamp()


def test_closed_periods_are_pruned_open_and_custom_ones_kept() -> None:
    snapshot = QuotaSnapshot()
    for period in ("2026-09", "2026-10", "2026-11", "2026-11-27", "2026-11-28", "custom"):
        snapshot.add_local("acme", period, 5)
        snapshot.acknowledged("acme", period, 5, 0, 1)
    # 2026-10 ended Nov 1 00:00 UTC (+14 h in every zone); 2026-11-27 ended Nov 28 (+14 h): both a day ago or more.
    assert snapshot.prune(NOW) == 3
    kept = {period for _, period in snapshot._entries}
    assert kept == {"2026-11", "2026-11-28", "custom"}


def test_a_closed_period_with_spend_not_yet_acknowledged_is_kept() -> None:
    snapshot = QuotaSnapshot()
    snapshot.add_local("acme", "2026-09", 5)  # on its way to Kafka
    assert snapshot.prune(NOW) == 0 and snapshot.used("acme", "2026-09") == 5
    snapshot.acknowledged("acme", "2026-09", 5, 0, 1)
    assert snapshot.prune(NOW) == 1 and snapshot.used("acme", "2026-09") == 0
