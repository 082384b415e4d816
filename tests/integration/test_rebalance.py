"""Exactness across consumer-group membership changes, on the real broker.

Aggregator processes (``python -m aggregator``) join and leave one group while usage events flow:
graceful leaves and joins, SIGKILLs of dynamic members, static members killed and restarted under
the same instance id. Each test then stops publishing, lets the group drain, and holds the result to
what was published, two ways: the totals changelog's event counts and tokens must equal the
published ones exactly (nothing lost, nothing counted twice), and the independent verifier must
report no difference and no lag.

Which member changes, and when, comes from a seeded random; the seed is printed (and named in every
failure). ``TOKENGUARD_TEST_SEED=<seed>`` repeats a run's choices (not its timing).
Synchronisation is on what the processes say: a membership change is complete when every live
member's log shows it owns partitions and together they own each partition once.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
from collections import Counter
from dataclasses import replace
from typing import Self

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import DefaultPartitioner

from aggregator import AggregatorConfig
from aggregator.changelog import read_changelog
from aggregator.verify import verify
from producer import ensure_topics
from schemas.topics import TopicLayout
from schemas.usage import UsageEvent
from schemas.wire import encode_usage, usage_headers, usage_key
from tests.helpers import AggregatorProcess, eventually, make_event
from transport.connection import KafkaConnection

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PARTITIONS = 6
# The broker's smallest session timeout: a dead dynamic member, or a stopped static one, holds its
# partitions this long. A small dedup window keeps each restore (which happens on every rebalance,
# for every partition a member gets) short; every event id here is unique anyway.
MEMBER_ENV = {"TOKENGUARD_SESSION_TIMEOUT_MS": "6000", "TOKENGUARD_DEDUP_WINDOW": "5000"}
SETTLE_S = 45.0

_ASSIGNMENT = re.compile(r"partitions (assigned|revoked): \[([0-9, ]*)\]")


def seeded(test: str) -> tuple[random.Random, int]:
    seed = int(os.environ.get("TOKENGUARD_TEST_SEED") or random.SystemRandom().randrange(2**31))
    print(f"{test}: seed {seed} (TOKENGUARD_TEST_SEED={seed} repeats the choices)")
    return random.Random(seed), seed


def six_partitions(config: AggregatorConfig) -> AggregatorConfig:
    return replace(config, topics=replace(config.topics, partitions=PARTITIONS))


class Member:
    """One ``python -m aggregator`` process of the group, with its own log per incarnation, read to
    learn which partitions it owns (its 'partitions assigned' / 'partitions revoked' lines)."""

    def __init__(self, config: AggregatorConfig, name: str, *, static: bool = False) -> None:
        self.config = config
        self.name = name
        self.static = static
        self.incarnation = 0
        self.process: AggregatorProcess | None = None

    def __repr__(self) -> str:
        return f"{self.name}#{self.incarnation}"

    async def start(self) -> None:
        assert not self.alive
        self.incarnation += 1
        process = AggregatorProcess(self.config, instance_id=self.name if self.static else None, env=MEMBER_ENV)
        process.log_path = process.log_path.with_name(f"{self.config.topics.prefix}{self.name}.{self.incarnation}.log")
        await process.start()
        self.process = process

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.process is not None and self.process.process.returncode is None

    async def kill(self) -> None:
        assert self.process is not None
        await self.process.kill()

    async def terminate(self) -> int:
        assert self.process is not None
        return await self.process.terminate(timeout=30)

    def owned(self) -> frozenset[int]:
        """The partitions this incarnation's log says it owns now."""
        if self.process is None:
            return frozenset()
        owned: set[int] = set()
        for change, listed in _ASSIGNMENT.findall(self.process.log()):
            partitions = {int(p) for p in listed.replace(" ", "").split(",") if p}
            owned = owned | partitions if change == "assigned" else owned - partitions
        return frozenset(owned)

    def log_tail(self, lines: int = 15) -> str:
        if self.process is None or not self.process.log_path.exists():
            return f"{self!r}: no log"
        text = self.process.log().splitlines()[-lines:]
        return f"--- {self!r} ({self.process.log_path})\n" + "\n".join(text)


async def settled(members: list[Member], timeout: float = SETTLE_S) -> None:
    """Until each live member owns partitions and together they own every partition exactly once."""
    live = [m for m in members if m.alive]
    assert live, "no member is running"

    def done() -> bool:
        owned = [m.owned() for m in live]
        return all(owned) and sum(map(len, owned)) == PARTITIONS and frozenset().union(*owned) == set(range(PARTITIONS))

    try:
        await eventually(done, timeout, f"the group settling on {live}")
    except AssertionError:
        states = "; ".join(f"{m!r} alive={m.alive} owns {sorted(m.owned())}" for m in members)
        raise AssertionError(
            f"the group did not settle within {timeout}s: {states}\n" + "\n".join(m.log_tail() for m in live)
        ) from None


class Load:
    """Usage events with unique ids for ``tenants`` tenants, published straight through aiokafka (one
    batch per partition, murmur2 on the tenant key, CloudEvents headers, acks=all) at about ``rate``
    per second from a background task, until ``stop()``. Keeps what the broker acknowledged."""

    def __init__(
        self, connection: KafkaConnection, layout: TopicLayout, seed: int, *, rate: int, tenants: int = 400
    ) -> None:
        self.connection = connection
        self.layout = layout
        self.rng = random.Random(seed + 1)
        self.rate = rate
        self.tenants = tenants
        self.events = 0
        self.tokens: Counter[tuple[str, str]] = Counter()
        self.counts: Counter[tuple[str, str]] = Counter()
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._producer: AIOKafkaProducer | None = None

    async def start(self) -> Self:
        self._producer = AIOKafkaProducer(**self.connection.client_kwargs(), acks="all", linger_ms=5)
        await self._producer.start()
        self._task = asyncio.create_task(self._run(), name="rebalance-test-load")
        return self

    async def _run(self) -> None:
        producer = self._producer
        assert producer is not None
        partitioner = DefaultPartitioner()
        tick = 0.02
        loop = asyncio.get_running_loop()
        next_tick = loop.time()
        while not self._stopping.is_set():
            events = [
                make_event(f"tenant-{self.rng.randrange(self.tenants):04d}", self.rng.randrange(1, 5_000))
                for _ in range(max(1, int(self.rate * tick)))
            ]
            by_partition: dict[int, list[UsageEvent]] = {}
            for event in events:
                key = usage_key(event.tenant_id)
                by_partition.setdefault(partitioner(key, list(range(PARTITIONS)), list(range(PARTITIONS))), []).append(
                    event
                )
            futures = []
            for partition, items in by_partition.items():
                batch = producer.create_batch()
                for event in items:
                    appended = batch.append(
                        key=usage_key(event.tenant_id),
                        value=encode_usage(event),
                        timestamp=None,
                        headers=usage_headers(event),
                    )
                    assert appended is not None, "a tick's events fit in one batch per partition"
                futures.append(await producer.send_batch(batch, self.layout.usage, partition=partition))
            await asyncio.gather(*futures)  # raises on a failed send: the test cannot account for it
            for event in events:
                self.tokens[(event.tenant_id, event.period_key)] += event.total_tokens
                self.counts[(event.tenant_id, event.period_key)] += 1
            self.events += len(events)
            next_tick = max(next_tick + tick, loop.time())
            await asyncio.sleep(max(0.0, next_tick - loop.time()))

    async def stop(self) -> None:
        self._stopping.set()
        try:
            if self._task is not None:
                await self._task
        finally:
            if self._producer is not None:
                await self._producer.stop()

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()


async def assert_exact(config: AggregatorConfig, load: Load, seed: int, what: str) -> None:
    """The group's totals are exactly what was published: per (tenant, period), tokens and events."""
    report = await verify(config.connection, config.topics, config.group_id, wait_s=60)
    changelog = await read_changelog(config.connection, config.topics.totals)
    counted = sum(record.event_count for record in changelog.values())
    lost = doubled = 0
    wrong_keys = []
    for key in sorted(set(load.counts) | set(changelog)):
        record = changelog.get(key)
        have_events, have_tokens = (record.event_count, record.used_tokens) if record is not None else (0, 0)
        delta = have_events - load.counts.get(key, 0)
        lost += max(0, -delta)
        doubled += max(0, delta)
        if delta or have_tokens != load.tokens.get(key, 0):
            wrong_keys.append(
                f"{key}: published {load.counts.get(key, 0)} events / {load.tokens.get(key, 0)} tokens, "
                f"counted {have_events} / {have_tokens}"
            )
    summary = (
        f"{what} (seed {seed}): published {load.events} events, the changelog counts {counted}: "
        f"{lost} lost, {doubled} counted twice, over {len(wrong_keys)} of {len(load.counts)} tenant-periods; "
        f"verifier: lag {report.lag}, {len(report.differences)} differences, {report.events} events on the topic"
    )
    print(summary)
    assert report.lag == 0, summary
    assert report.events == load.events and report.duplicates == 0 and not report.invalid, summary
    assert wrong_keys == [], summary + "\n" + "\n".join(wrong_keys[:10])
    assert counted == load.events and sum(r.used_tokens for r in changelog.values()) == sum(load.tokens.values()), (
        summary
    )
    assert report.differences == [], summary + "\n" + "\n".join(map(str, report.differences[:10]))


async def stop_all(members: list[Member]) -> None:
    """Stop every live member gracefully; each must exit 0."""
    codes = {repr(m): await m.terminate() for m in members if m.alive}
    assert all(code == 0 for code in codes.values()), f"exit codes on SIGTERM: {codes}"


async def kill_leftovers(members: list[Member]) -> None:
    for member in members:
        if member.alive:
            await member.kill()


@pytest.mark.timeout(150)
async def test_graceful_leaves_and_joins_while_events_flow_lose_and_double_count_nothing(
    aggregator_config: AggregatorConfig,
) -> None:
    """Two dynamic members; seven times one leaves (SIGTERM, exit 0) and a new one joins, in random
    order, each change a rebalance that takes partitions from the member that stays and gives them back."""
    rng, seed = seeded("graceful leaves and joins")
    config = six_partitions(aggregator_config)
    await ensure_topics(config.connection, config.topics)
    members = [Member(config, "a0"), Member(config, "a1")]
    try:
        for member in members:
            await member.start()
        await settled(members)
        async with Load(config.connection, config.topics, seed, rate=2_500) as load:
            for cycle in range(7):
                live = [m for m in members if m.alive]
                leaving, joining = rng.choice(live), Member(config, f"a{len(members)}")
                members.append(joining)
                steps = [("leave", leaving), ("join", joining)]
                rng.shuffle(steps)  # a scale-down then up, or up then down
                for step, member in steps:
                    await asyncio.sleep(rng.uniform(0.2, 1.0))  # load between changes
                    print(f"cycle {cycle}: {member!r} {step}s, {load.events} events published")
                    if step == "leave":
                        assert await member.terminate() == 0, member.log_tail()
                    else:
                        await member.start()
                    await settled(members)
            await asyncio.sleep(0.5)
        await assert_exact(config, load, seed, "graceful leaves and joins")
        assert load.events >= 40_000, f"too little load to mean anything: {load.events} events"
        await stop_all(members)
    finally:
        await kill_leftovers(members)


@pytest.mark.timeout(150)
async def test_sigkilled_dynamic_members_and_their_restarts_lose_and_double_count_nothing(
    aggregator_config: AggregatorConfig,
) -> None:
    """Three dynamic members; four times a random one is SIGKILLed (no flush, no leave, no commit)
    and a replacement starts, either at once (one rebalance, which waits for the dead member's session
    to expire) or after the survivors have taken the dead member's partitions over (two rebalances)."""
    rng, seed = seeded("sigkilled dynamic members")
    config = six_partitions(aggregator_config)
    await ensure_topics(config.connection, config.topics)
    members = [Member(config, f"k{i}") for i in range(3)]
    try:
        for member in members:
            await member.start()
        await settled(members)
        async with Load(config.connection, config.topics, seed, rate=2_500) as load:
            for cycle in range(4):
                await asyncio.sleep(rng.uniform(0.3, 1.5))  # load between changes
                victim = rng.choice([m for m in members if m.alive])
                print(f"cycle {cycle}: SIGKILL {victim!r}, {load.events} events published")
                await victim.kill()
                if rng.random() < 0.5:
                    # The replacement comes later: first the survivors take the dead member's
                    # partitions over (when its session expires), a rebalance of its own.
                    await settled(members)
                    await asyncio.sleep(rng.uniform(0.0, 1.0))
                replacement = Member(config, f"k{len(members)}")
                members.append(replacement)
                await replacement.start()
                await settled(members)
            await asyncio.sleep(0.5)
        await assert_exact(config, load, seed, "SIGKILLed dynamic members")
        assert load.events >= 40_000, f"too little load to mean anything: {load.events} events"
        await stop_all(members)
    finally:
        await kill_leftovers(members)


@pytest.mark.timeout(150)
async def test_static_members_sigkilled_and_restarted_and_one_replaced_lose_and_double_count_nothing(
    aggregator_config: AggregatorConfig,
) -> None:
    """Three static members (``--instance-id``); eight changes. SIGKILLed members restart under the
    same id and take their partitions back (normally without a rebalance). Once, a member is stopped
    gracefully (a static member does not leave the group: its partitions idle for the session timeout,
    then the group rebalances) and, once the survivors own its partitions, a member with a new id joins."""
    rng, seed = seeded("static members")
    config = six_partitions(aggregator_config)
    await ensure_topics(config.connection, config.topics)
    members = [Member(config, f"s{i}", static=True) for i in range(3)]
    try:
        for member in members:
            await member.start()
        await settled(members)
        replaced_at = rng.randrange(1, 7)
        async with Load(config.connection, config.topics, seed, rate=2_500) as load:
            for cycle in range(8):
                await asyncio.sleep(rng.uniform(0.3, 1.5))  # load between changes
                member = rng.choice([m for m in members if m.alive])
                if cycle == replaced_at:
                    print(f"cycle {cycle}: {member!r} stops gracefully, {load.events} events published")
                    assert await member.terminate() == 0, member.log_tail()
                    await settled(members)  # the survivors take its partitions once its session expires
                    await asyncio.sleep(rng.uniform(0.2, 1.0))
                    replacement = Member(config, f"s{len(members)}", static=True)
                    members.append(replacement)
                    await replacement.start()
                else:
                    print(f"cycle {cycle}: SIGKILL {member!r} and restart it, {load.events} events published")
                    await member.kill()
                    await member.start()
                await settled(members)
            await asyncio.sleep(0.5)
        await assert_exact(config, load, seed, "static members")
        assert load.events >= 30_000, f"too little load to mean anything: {load.events} events"
        await stop_all(members)
    finally:
        await kill_leftovers(members)
