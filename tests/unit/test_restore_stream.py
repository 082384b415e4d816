"""The streamed restore (``ChangelogFold`` building ``Totals`` through ``recovery.Compact``, then
``TotalsState.adopt``) against the restore it replaced, record for record; and its cheaper checks
(``Admission``, ``transport.murmur``) against the reference ones."""

from __future__ import annotations

import logging
import random
from collections import Counter
from typing import Any

import pytest
from aiokafka.partitioner import murmur2 as aiokafka_murmur2
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator.changelog import Admission, ChangelogFold, admissible
from aggregator.recovery import Compact
from aggregator.state import Limits, Totals, TotalsState
from schemas.compiled import TotalsRecordStruct
from schemas.wire import decode_totals, tenant_period_key
from tests.restore_corpus import (
    PARTITIONS,
    PERIOD,
    TENANTS,
    USAGE_ENDS,
    Read,
    as_read,
    corpus,
    home,
    old_restore,
    snapshot,
    value,
)
from transport.murmur import murmur2, murmur2_many, partition_of, partitions_of


def streamed(records: list[Read], *, usage_ends: dict[int, int] | None, partition_count: int | None,
             seal_grace_s: float | None = None, batch: int = 7) -> tuple[TotalsState, Counter[str]]:
    fold = ChangelogFold(Compact(), usage_ends=usage_ends, partition_count=partition_count)
    for start in range(0, len(records), batch):
        fold.add(records[start:start + batch])
    state = TotalsState(Limits(), seal_grace_s=seal_grace_s)
    state.adopt(fold.latest)
    return state, fold.rejected


@pytest.mark.parametrize(("usage_ends", "partition_count"), [(USAGE_ENDS, PARTITIONS), (None, None), (None, 0)])
@pytest.mark.parametrize("seal_grace_s", [None, 3600.0])
def test_streamed_restore_is_the_old_restore(usage_ends, partition_count, seal_grace_s) -> None:  # type: ignore[no-untyped-def]
    records = as_read(corpus())
    old, old_rejected = old_restore(records, usage_ends=usage_ends, partition_count=partition_count,
                                    seal_grace_s=seal_grace_s)
    new, new_rejected = streamed(records, usage_ends=usage_ends, partition_count=partition_count,
                                 seal_grace_s=seal_grace_s)
    assert snapshot(new) == snapshot(old)
    assert list(new.totals) == list(old.totals)  # the same records in the same order: the same order
    assert new_rejected == old_rejected
    assert len(new.totals) == 2 * len(TENANTS) - 3  # a period and a counter each; 6 tombstoned, 3 back
    if partition_count:
        assert set(new_rejected) == {"invalid_json", "empty_value", "invalid_schema", "oversized", "key_mismatch",
                                     "wrong_partition", "offset_beyond_end"} - ({"offset_beyond_end"} if usage_ends is None else set())


def test_the_corpus_exercises_every_rule() -> None:
    records = as_read(corpus())
    state, rejected = streamed(records, usage_ends=USAGE_ENDS, partition_count=PARTITIONS, seal_grace_s=3600.0)
    assert rejected == Counter({"invalid_json": 1, "empty_value": 1, "invalid_schema": 2, "oversized": 1,
                                "key_mismatch": 2, "wrong_partition": 2, "offset_beyond_end": 2})
    tied = state.totals[(TENANTS[1], PERIOD)]
    assert (tied.used, tied.state, tied.limit) == (999, "exceeded", 999)  # the later of two at one offset
    furthest = state.totals[(TENANTS[7], PERIOD)]
    assert (furthest.used, furthest.applied_offset) == (507, 57)  # not the later record at offset 37
    assert (TENANTS[3], PERIOD) not in state.totals  # tombstoned
    assert state.totals[(TENANTS[6], PERIOD)].used == 55  # tombstoned, then written again
    assert all(key in state._counter_ends for key in state.totals if key[1].startswith("rule:"))


@pytest.mark.parametrize("batch", [1, 7, 1_000])
def test_a_small_home_cache_changes_nothing(batch: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Admission, "HOMES_HELD", 5)
    records = as_read(corpus())
    old, old_rejected = old_restore(records, usage_ends=USAGE_ENDS, partition_count=PARTITIONS)
    new, new_rejected = streamed(records, usage_ends=USAGE_ENDS, partition_count=PARTITIONS, batch=batch)
    assert snapshot(new) == snapshot(old) and new_rejected == old_rejected


def test_adopt_into_a_state_that_holds_keys_is_restore_per_key() -> None:
    records = as_read(corpus())
    old, _ = old_restore(records, usage_ends=USAGE_ENDS, partition_count=PARTITIONS, seal_grace_s=3600.0)
    fold = ChangelogFold(Compact(), usage_ends=USAGE_ENDS, partition_count=PARTITIONS)
    fold.add(records)
    new = TotalsState(Limits(), seal_grace_s=3600.0)
    before = ("elsewhere", PERIOD)
    new.totals[before] = Totals(partition=9, used=1)
    first = next(iter(fold.latest))
    new.totals[first] = Totals(partition=9, used=2)  # overwritten, as restore overwrote it
    new.adopt(fold.latest)
    assert new.totals[before] == Totals(partition=9, used=1)
    assert list(new.totals.items())[1:] == list(old.totals.items())


def test_each_reason_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    records = as_read(corpus())
    with caplog.at_level(logging.ERROR, logger="aggregator.changelog"):
        _, rejected = streamed(records + records, usage_ends=USAGE_ENDS, partition_count=PARTITIONS)
    logged = [r.getMessage() for r in caplog.records]
    assert len(logged) == len(rejected) and sum(rejected.values()) == 2 * 11
    assert all(sum(reason in line for line in logged) == 1 for reason in ("key_mismatch", "offset_beyond_end"))


def test_compact_totals_share_what_keys_have_in_common() -> None:
    compact = Compact()
    made = [compact(decode_totals(value(f"t{i}", limit_tokens=10**6 + 1, event_quota_tokens=10**6 + 2,
                                       applied_offset=10**6 + i, first_offset=10**6 + i))) for i in range(3)]
    assert made[0].limit is made[1].limit is made[2].limit
    assert made[0].event_quota is made[2].event_quota
    assert all(t.first_offset is t.applied_offset for t in made)
    assert made[0] == Totals(partition=home("t0"), used=100, events=3, applied_offset=10**6, limit=10**6 + 1,
                             state="ok", event_quota=10**6 + 2, first_offset=10**6)


@settings(max_examples=300, deadline=None)
@given(
    tenant=st.text(min_size=1, max_size=40),
    period=st.sampled_from([PERIOD, "rule:r~tokens:2026-11-29", 'we"ird', "back\\", "ünï"]),
    key_kind=st.sampled_from(["canonical", "spaced", "other", "none"]),
    partition=st.integers(0, PARTITIONS - 1),
    usage_partition=st.integers(0, PARTITIONS),
    applied=st.integers(-1, 1_200),
    partition_count=st.sampled_from([None, 0, PARTITIONS]),
    bounded=st.booleans(),
)
def test_admission_is_admissible(tenant, period, key_kind, partition, usage_partition, applied,  # type: ignore[no-untyped-def]
                                 partition_count, bounded) -> None:
    if not (tenant.isprintable() and period.isprintable()):
        return  # the models refuse these before any check
    totals = decode_totals(value(tenant, period, usage_partition=usage_partition, applied_offset=applied))
    key = {"canonical": tenant_period_key(tenant, period), "spaced": f'["{tenant}", "{period}"]'.encode(),
           "other": tenant_period_key(tenant + "x", period), "none": None}[key_kind]
    record = Read(partition, 0, key, b"")
    ends = USAGE_ENDS if bounded else None
    expected = admissible(record, totals, ends, partition_count)
    assert Admission(ends, partition_count).why(key, partition, totals) == expected
    learnt = Admission(ends, partition_count)
    learnt.learn([tenant, tenant + "x"])
    assert learnt.why(key, partition, totals) == expected


def test_admission_keys_for_tenants_json_escapes() -> None:
    for tenant in [*TENANTS, "tab\there", "nul\x00", "sep\u2028"]:  # the last three: not printable
        record: Any = TotalsRecordStruct(tenant_id=tenant, period_key=PERIOD, used_tokens=1, event_count=1,
                                    limit_tokens=1, state="ok", usage_partition=home(tenant), applied_offset=0,
                                    updated_at="2026-11-29T12:00:00Z")
        key = tenant_period_key(tenant, PERIOD)
        assert Admission(None, PARTITIONS).why(key, home(tenant), record) is None, tenant
        assert Admission(None, PARTITIONS).why(key + b" ", home(tenant), record) == "key_mismatch"


def test_murmur2_is_kafkas() -> None:
    rng = random.Random(14)
    for length in range(300):
        for _ in range(20):
            data = rng.randbytes(length)
            assert murmur2(data) == aiokafka_murmur2(data), data
    for tenant in TENANTS:
        assert partition_of(tenant.encode(), PARTITIONS) == home(tenant)


@given(st.binary(max_size=1_000))
def test_murmur2_is_kafkas_on_any_bytes(data: bytes) -> None:
    assert murmur2(data) == aiokafka_murmur2(data)


@given(st.lists(st.binary(max_size=48), max_size=60), st.lists(st.sampled_from([b"tenant-0000001", b"acme-corp"]),
                                                                   max_size=20))
def test_murmur2_many_is_murmur2_of_each(keys: list[bytes], repeated: list[bytes]) -> None:
    mixed = keys + repeated + [k[:5] for k in keys]  # several keys of one length: the wide path
    assert murmur2_many(mixed) == [aiokafka_murmur2(k) for k in mixed]
    assert partitions_of(mixed, 7) == [partition_of(k, 7) for k in mixed]


def test_murmur2_many_on_every_length() -> None:
    rng = random.Random(15)
    for length in range(70):
        keys = [rng.randbytes(length) for _ in range(9)] + [b"\xff" * length]
        assert murmur2_many(keys) == [aiokafka_murmur2(k) for k in keys], length
