"""The record rules every counting reader shares, and dead letters that always fit."""

from __future__ import annotations

import pytest
from aiokafka.partitioner import DefaultPartitioner

from aggregator.deadletter import dead_letter
from aggregator.intake import accept, expected_partition
from schemas.errors import DecodeError
from schemas.wire import encode
from tests.helpers import FakeRecord, make_event, partition_of


def record_for(tenant: str, partitions: int = 6, **changes: object) -> FakeRecord:
    event = make_event(tenant, 10)
    key = tenant.encode()
    record = FakeRecord(partition_of(key, partitions), key, encode(event), [("ce_id", event.event_id.encode())])
    for name, value in changes.items():
        setattr(record, name, value)
    return record


@pytest.mark.parametrize("tenant", ["acme", "globex", "ünïcode", "a" * 200, "x"])
def test_expected_partition_is_kafkas_default_partitioner(tenant: str) -> None:
    key = tenant.encode()
    for partitions in (1, 3, 6, 12):
        assert expected_partition(key, partitions) == DefaultPartitioner()(key, list(range(partitions)), [])


def test_a_record_on_its_keys_partition_with_agreeing_ids_counts() -> None:
    assert accept(record_for("acme"), 6).tenant_id == "acme"
    assert accept(record_for("acme", headers=[]), 6).tenant_id == "acme"  # ce_id is optional


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"partition": (expected_partition(b"acme", 6) + 1) % 6}, "misrouted"),
        ({"headers": [("ce_id", b"someone-elses-id")]}, "id_mismatch"),
        ({"headers": [("ce_id", None)]}, "id_mismatch"),
        ({"key": b"globex"}, "key_mismatch"),
        ({"value": b"{"}, "invalid_json"),
    ],
)
def test_records_that_cannot_count_say_why(changes: dict[str, object], reason: str) -> None:
    with pytest.raises(DecodeError) as caught:
        accept(record_for("acme", **changes), 6)
    assert caught.value.reason == reason


def test_a_dead_letter_that_fits_keeps_everything() -> None:
    letter = dead_letter(
        key=b"k", value=b"v", headers=[("ce_id", b"x"), ("tokenguard.error.reason", b"forged"), ("n", None)],
        reason="invalid_json", detail="d", topic="t", partition=2, offset=7, aggregator_id="a",
    )
    headers = dict(letter.headers)
    assert (letter.key, letter.value, headers["ce_id"]) == (b"k", b"v", b"x")
    assert headers["tokenguard.error.reason"] == b"invalid_json"  # a record's own tokenguard.* headers never pass
    assert (headers["tokenguard.source.partition"], headers["tokenguard.source.offset"]) == (b"2", b"7")
    assert "n" not in headers


def test_an_oversized_dead_letter_is_truncated_with_its_hash_never_lost() -> None:
    import hashlib

    value = b"x" * 2_000_000
    letter = dead_letter(
        key=b"k" * 5000, value=value, headers=[("h", b"y" * 10_000)], reason="oversized", detail="big",
        topic="t", partition=0, offset=1, aggregator_id="a", max_bytes=100_000,
    )
    size = len(letter.key or b"") + len(letter.value or b"") + sum(len(n) + len(h) + 8 for n, h in letter.headers)
    assert size <= 100_000
    headers = dict(letter.headers)
    assert headers["tokenguard.error.truncated"] == b"true"
    assert headers["tokenguard.original.value_bytes"] == b"2000000"
    assert headers["tokenguard.original.sha256"] == hashlib.sha256(b"k" * 5000 + value).hexdigest().encode()
    assert letter.value == value[: len(letter.value or b"")] and len(letter.value or b"") > 50_000
