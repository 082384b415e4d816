"""``usage_scope``: attributes per call, over the store's own, bounded before the call."""

from __future__ import annotations

import asyncio

import pytest

from producer import InvalidCallError, KafkaQuotaStore, ProducerConfig, usage_scope
from producer.tenancy import call_attributes
from tests.helpers import call_usage


def test_scopes_nest_and_end() -> None:
    assert call_attributes() is None
    with usage_scope(user="alice"):
        with usage_scope(agent="bot", step="plan"):
            assert call_attributes() == {"user": "alice", "agent": "bot", "step": "plan"}
        assert call_attributes() == {"user": "alice"}
    assert call_attributes() is None


def test_a_scope_is_bounded_when_entered() -> None:
    with pytest.raises(ValueError, match="at most 8"), usage_scope(**{f"k{i}": "v" for i in range(9)}):
        pass
    with pytest.raises(ValueError), usage_scope(user="x" * 300):
        pass


def test_scoped_attributes_ride_on_the_event_over_the_store_attributes() -> None:
    store = KafkaQuotaStore(ProducerConfig(spool_dir=None), attributes={"region": "eu", "user": "service"})
    with usage_scope(user="alice"):
        assert store._attributes_now() == {"region": "eu", "user": "alice"}
    assert store.draft(call_usage("acme", 1)).attributes == {"region": "eu", "user": "service"}


def test_too_many_with_the_store_attributes_is_refused_before_the_call() -> None:
    store = KafkaQuotaStore(ProducerConfig(spool_dir=None), attributes={f"s{i}": "v" for i in range(30)})
    with usage_scope(user="a", agent="b", step="c"), pytest.raises(InvalidCallError, match="33"):
        store.check("acme", "2026-11", 1_000)


def test_each_task_sees_its_own_scope() -> None:
    async def one(user: str) -> dict[str, str] | None:
        with usage_scope(user=user):
            await asyncio.sleep(0)
            return call_attributes()

    async def both() -> list[dict[str, str] | None]:
        return list(await asyncio.gather(one("a"), one("b")))

    assert asyncio.run(both()) == [{"user": "a"}, {"user": "b"}]
