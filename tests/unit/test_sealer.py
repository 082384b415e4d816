"""The sealer's bookkeeping: which keys are due when, per partition (pure, no broker)."""

from __future__ import annotations

import tracemalloc

from aggregator.sealing import Sealer
from schemas.sealed import seal_time

GRACE_S = 6 * 3600.0


def test_keys_come_due_by_seal_time_per_partition() -> None:
    sealer = Sealer(GRACE_S)
    october, november = seal_time("2026-10", GRACE_S), seal_time("2026-11", GRACE_S)
    assert october is not None and november is not None and october < november
    sealer.track(0, ("a", "2026-11"))
    sealer.track(0, ("b", "2026-10"))
    sealer.track(0, ("c", "2026-10"))
    sealer.track(1, ("d", "2026-10"))
    sealer.track(0, ("custom", "sprint-7"))  # a custom period never seals
    assert sealer.pending() == {0: [(october, ("b", "2026-10")), (october, ("c", "2026-10")),
                                    (november, ("a", "2026-11"))], 1: [(october, ("d", "2026-10"))]}
    assert sealer.due(0, october) == []  # due strictly after the seal time
    assert sealer.due(0, october + 1) == [("b", "2026-10"), ("c", "2026-10")]
    assert sealer.due(0, october + 2) == []
    assert sealer.due(1, november + 1) == [("d", "2026-10")]
    sealer.track(0, ("e", "2026-10"))  # a key of a period already due is due at the next call
    assert sealer.due(0, november + 1) == [("e", "2026-10"), ("a", "2026-11")]
    assert sealer.pending() == {0: [], 1: []}


def test_dropped_partitions_forget_their_keys() -> None:
    sealer = Sealer(GRACE_S)
    sealer.track(2, ("a", "2026-11"))
    sealer.observe(2, 1.0)
    sealer.drop({2})
    assert sealer.pending() == {} and sealer.watermark == {}
    november = seal_time("2026-11", GRACE_S)
    assert november is not None and sealer.due(2, november + 1) == []


def test_a_waiting_key_costs_a_list_slot() -> None:
    """A million tenants of one month share one seal time: the sealer must not hold an entry of
    its own per key (that was ~64 bytes a key, the restore's memory budget is 400 bytes)."""
    keys = [(f"tenant-{i:07d}", "2026-11") for i in range(100_000)]
    sealer = Sealer(GRACE_S)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for index, key in enumerate(keys):
            sealer.track(index % 6, key)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert held / len(keys) < 16, f"{held / len(keys):.1f} bytes a key"
