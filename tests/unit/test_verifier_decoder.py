"""The independent verifier decides each usage record with the pydantic model itself: the
aggregator's compiled decoder is what it judges, so it must not be what it judges with."""

from __future__ import annotations

from datetime import UTC, datetime
from unittest import mock

import pytest

from aggregator.intake import accept
from aggregator.verify import Recompute
from schemas import compiled, wire
from schemas.usage import UsageEvent
from schemas.wire import encode
from tests.helpers import FakeRecord, partition_of

PARTITIONS = 6


def record(tenant: str = "acme", tokens: int = 70) -> FakeRecord:
    value = encode(UsageEvent(event_id="evt-00000001", tenant_id=tenant, period_key="2026-11", total_tokens=tokens,
                              quota_tokens=1_000, event_time=datetime(2026, 11, 29, tzinfo=UTC), instance_id="i-1"))
    return FakeRecord(partition=partition_of(tenant, PARTITIONS), key=tenant.encode(), value=value)


def test_the_verifier_counts_through_the_model_not_the_compiled_decoder() -> None:
    recompute = Recompute(PARTITIONS)
    with mock.patch.object(wire, "_compiled_usage", side_effect=AssertionError("compiled decoder used")):
        event = recompute.add(record())
        with pytest.raises(AssertionError, match="compiled decoder used"):
            accept(record("globex"), PARTITIONS)  # the aggregator's intake does use it
    assert isinstance(event, UsageEvent) and event.total_tokens == 70


def test_a_record_the_compiled_decoder_wrongly_accepted_is_still_refused_by_the_verifier() -> None:
    """Were the compiled mirror ever to accept a value the model refuses, the aggregator would
    count it and the verifier would not: the difference shows in ``tokenguard verify``."""
    bad = record()
    assert bad.value is not None
    bad.value = bad.value.replace(b'"total_tokens":70', b'"total_tokens":-1')
    lenient = compiled.usage_struct({**dict(wire.decode_usage(record().value)), "total_tokens": -1})
    with mock.patch.object(wire, "_compiled_usage", return_value=lenient):
        assert accept(bad, PARTITIONS).total_tokens == -1  # the (hypothetically broken) fast path
        recompute = Recompute(PARTITIONS)
        assert recompute.add(bad) is None and recompute.invalid["invalid_schema"] == 1
