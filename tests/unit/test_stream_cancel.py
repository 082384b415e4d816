"""Streams left behind by their task are accounted when the task ends, not when the GC runs: through
real Agent objects over the scripted client (no broker, no HTTP), and ``StreamUsage`` on its own.

Every test runs with the cyclic garbage collector off and the stream held by the test, so neither the
collector nor reference counting can be what records the usage: only the task's end can."""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Iterator
from typing import Any

import pytest
from agent_framework import Agent

from producer import InMemoryQuotaStore, QuotaExceededError, TokenGuardMiddleware
from producer.scripted import ScriptedChatClient
from producer.streams import StreamUsage


@pytest.fixture(autouse=True)
def no_gc() -> Iterator[None]:
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


class Fleet:
    """One tenant's guard (at most one call in flight: a leaked reservation refuses the next call)."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self.recorded = asyncio.Event()
        self.guard = TokenGuardMiddleware(
            quota_store=InMemoryQuotaStore(), quota_tokens=10**6, on_usage=self._on_usage,
            user_id_getter=lambda _: "acme", max_in_flight_per_tenant=1,
        )
        self.agent = Agent(ScriptedChatClient(reply_words=40, latency_s=0.05), middleware=[self.guard])
        self.at: float | None = None

    def _on_usage(self, record: dict[str, Any]) -> None:
        self.at = time.perf_counter()
        self.records.append(record)
        self.recorded.set()

    def in_flight(self) -> int:
        return self.guard._in_flight.calls(("acme", self.guard.period_key_fn()))

    async def next_call_admitted(self) -> None:
        """The tenant's next call passes: it sees no reservation left by the one before."""
        try:
            await self.agent.run("And again")
        except QuotaExceededError as error:  # pragma: no cover - the failure being tested for
            raise AssertionError(f"the next call was refused ({error.reason}): a reservation leaked") from error


async def busy_between_chunks(stream: Any, first: asyncio.Event, hold: asyncio.Event) -> None:
    async for _ in stream:
        first.set()
        await hold.wait()  # doing something else, not inside __anext__


async def test_a_task_cancelled_between_chunks_records_at_once_and_frees_its_reservation() -> None:
    fleet = Fleet()
    stream = fleet.agent.run("Count my tokens", stream=True)
    first, hold = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(busy_between_chunks(stream, first, hold))
    await first.wait()
    assert fleet.in_flight() == 1 and not fleet.records
    cancelled_at = time.perf_counter()
    task.cancel()
    await asyncio.wait_for(fleet.recorded.wait(), 0.1)
    assert fleet.at is not None and fleet.at - cancelled_at < 0.1
    assert task.cancelled()
    [record] = fleet.records
    assert record["streaming"] and fleet.guard.stats.estimated == 1
    assert record["output_tokens"] >= 1, "the text streamed before the cancel is counted"
    assert fleet.in_flight() == 0
    await fleet.next_call_admitted()
    assert len(fleet.records) == 2


async def test_a_task_that_returns_without_finishing_its_stream_records_when_it_returns() -> None:
    fleet = Fleet()
    stream = fleet.agent.run("Count my tokens", stream=True)

    async def take_one() -> str:
        async for update in stream:
            return str(update.text)  # walks away: async for does not close the stream
        return ""

    assert await asyncio.create_task(take_one())
    await asyncio.wait_for(fleet.recorded.wait(), 0.1)
    assert len(fleet.records) == 1 and fleet.guard.stats.estimated == 1 and fleet.in_flight() == 0
    await fleet.next_call_admitted()


async def test_a_task_that_raises_between_chunks_records_when_it_ends() -> None:
    fleet = Fleet()
    stream = fleet.agent.run("Count my tokens", stream=True)

    async def fail() -> None:
        async for _ in stream:
            raise ValueError("the application's bug")

    with pytest.raises(ValueError, match="bug"):
        await asyncio.create_task(fail())
    await asyncio.wait_for(fleet.recorded.wait(), 0.1)
    assert len(fleet.records) == 1 and fleet.guard.stats.estimated == 1 and fleet.in_flight() == 0


async def test_a_fully_consumed_stream_records_exactly_once_with_the_provider_usage() -> None:
    fleet = Fleet()
    stream = fleet.agent.run("Count my tokens", stream=True)

    async def consume() -> None:
        async for _ in stream:
            pass
        await stream.get_final_response()

    task = asyncio.create_task(consume())
    await task
    for _ in range(5):  # the task's done-callbacks and any call_soon settlement have run by now
        await asyncio.sleep(0)
    assert len(fleet.records) == 1 and fleet.guard.stats.estimated == 0 and fleet.in_flight() == 0


async def test_a_stream_handed_to_another_task_is_followed_there() -> None:
    """The first task ends after the hand-over: the stream is not settled then, but when the task
    that took it over is cancelled."""
    fleet = Fleet()
    stream = fleet.agent.run("Count my tokens", stream=True)
    iterator = stream.__aiter__()
    pulled_by_first, pulled_by_second, hold = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def first_task() -> None:
        await iterator.__anext__()
        pulled_by_first.set()
        await pulled_by_second.wait()  # hands the stream over, then ends

    async def second_task() -> None:
        await pulled_by_first.wait()
        await iterator.__anext__()
        pulled_by_second.set()
        await hold.wait()

    first = asyncio.create_task(first_task())
    second = asyncio.create_task(second_task())
    await first
    for _ in range(5):
        await asyncio.sleep(0)
    assert not fleet.records, "the first task's end did not settle a stream another task was pulling"
    second.cancel()
    await asyncio.wait_for(fleet.recorded.wait(), 0.1)
    assert len(fleet.records) == 1 and fleet.in_flight() == 0


async def test_a_stream_created_in_one_task_and_consumed_in_another_records_once() -> None:
    fleet = Fleet()
    stream = fleet.agent.run("Count my tokens", stream=True)  # created here, in the test's task

    async def consume() -> None:
        async for _ in stream:
            pass

    await asyncio.create_task(consume())
    await asyncio.wait_for(fleet.recorded.wait(), 0.1)
    for _ in range(5):
        await asyncio.sleep(0)
    assert len(fleet.records) == 1 and fleet.guard.stats.estimated == 0, "the provider's usage, once"


# StreamUsage on its own: the task bookkeeping.


class Stream:
    """Stands for a stream object: all StreamUsage needs of one is a weak reference."""


def counting() -> tuple[StreamUsage, list[dict[str, Any]]]:
    calls: list[dict[str, Any]] = []
    return StreamUsage(lambda details, model, output: calls.append(dict(details))), calls


def test_a_stream_watched_outside_any_task_is_left_to_the_finaliser() -> None:
    usage, calls = counting()
    stream = Stream()
    usage.watch(stream)  # no running loop: no task to follow, and no error
    assert usage._task is None and not calls
    del stream  # reference counting runs the finaliser (GC off)
    assert len(calls) == 1 and usage.recorded


async def test_a_long_lived_task_keeps_no_callback_of_a_recorded_stream() -> None:
    task = asyncio.current_task()
    assert task is not None
    streams = [Stream() for _ in range(100)]
    for stream in streams:
        usage, calls = counting()
        usage.watch(stream)
        assert usage._task is task
        await usage.on_final(None)
        assert usage._task is None and len(calls) == 1


async def test_settlement_is_idempotent_across_every_path() -> None:
    usage, calls = counting()
    stream = Stream()

    async def pull() -> None:
        usage.watch(stream)
        usage.on_update(None)
        await usage.on_final(None)  # completed: records
        usage.on_cleanup()  # then cleanup, the task's end and the finaliser: none records again

    await asyncio.create_task(pull())
    for _ in range(5):
        await asyncio.sleep(0)
    assert len(calls) == 1
