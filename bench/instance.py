"""One middleware process of a benchmark fleet (run by propagation.py and overshoot.py).

Talks over its standard streams: prints ``ready`` once started, waits for ``go`` on stdin,
prints one JSON line per result.

    watch:    reports when each of the tenants probe-0 .. probe-N-1 becomes blocked here
    overshoot: calls for one tenant as fast as it can until refused, with ours or the seed's middleware
               (``--variant rule``: ours, refused only by a quota rule the bench set for the tenant)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

# The packages measured: this checkout's, or another one's (TOKENGUARD_BENCH_CODE, set by _common.code_env).
sys.path.insert(0, os.environ.get("TOKENGUARD_BENCH_CODE") or str(Path(__file__).resolve().parent.parent))

from agent_framework import Agent

from producer import KafkaConnection, KafkaQuotaStore, ProducerConfig, QuotaExceededError, TokenGuardMiddleware
from producer.scripted import ScriptedChatClient
from schemas.notices import QuotaNotice
from schemas.topics import TopicLayout
from schemas.wire import parse_tenant_period_key


def config(args: argparse.Namespace) -> ProducerConfig:
    return ProducerConfig(
        connection=KafkaConnection(bootstrap_servers=args.bootstrap_servers),
        topics=TopicLayout(prefix=args.topic_prefix, partitions=args.partitions),
        instance_id=f"bench-{args.name}",
        create_topics=False,
        spool_dir=None,
    )


async def wait_for_go() -> None:
    print("ready", flush=True)
    line = await asyncio.to_thread(sys.stdin.readline)
    if line.strip() != "go":
        raise SystemExit(f"expected 'go', got {line!r}")


def observe_notices(store: KafkaQuotaStore) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Stage times of each tenant's first notice in this process: when its record was fetched
    (handed to the feed), when the snapshot took it, and the notice's own ``emitted_at``
    (the aggregator's flush) and record timestamp (its send). Wraps the feed's handler and the
    snapshot's ``apply_notice``; the decisions are untouched."""
    fetched: dict[str, float] = {}
    stages: dict[str, dict[str, float]] = {}
    follower = store.feed._follower
    handler = follower._on_records

    async def take(records: list) -> None:
        now = time.time()
        for record in records:
            parsed = parse_tenant_period_key(record.key)
            if parsed is not None and record.value is not None:
                fetched.setdefault(parsed[0], now)
                stages.setdefault(parsed[0], {}).setdefault("sent", record.timestamp / 1000)
        await handler(records)

    follower._on_records = take
    snapshot = store.snapshot
    apply_notice = snapshot.apply_notice

    def applied(notice: QuotaNotice) -> bool:
        taken = apply_notice(notice)
        if taken and notice.state == "exceeded" and "applied" not in stages.get(notice.tenant_id, {}):
            stage = stages.setdefault(notice.tenant_id, {})
            stage["applied"] = time.time()
            stage["emitted"] = notice.emitted_at.timestamp()
            stage["fetched"] = fetched.get(notice.tenant_id, stage["applied"])
        return taken

    snapshot.apply_notice = applied  # type: ignore[method-assign]
    return fetched, stages


async def watch(args: argparse.Namespace) -> None:
    async with KafkaQuotaStore(config(args)) as store:
        _, stages = observe_notices(store)
        await wait_for_go()
        for trial in range(args.trials):
            tenant = f"probe-{trial}"
            await store.feed.wait_until(lambda s, t=tenant: not s.decide(t, "p", 10**12).allowed, timeout=120)
            print(json.dumps({"trial": trial, "blocked_at": time.time(), **stages.get(tenant, {})}), flush=True)


async def overshoot(args: argparse.Namespace) -> None:
    tokens = 0
    calls = 0
    spent: list[tuple[float, int]] = []  # (when, tokens) of each admitted call: the fleet's timeline
    agent = Agent(ScriptedChatClient(reply_words=args.reply_words))
    stages: dict[str, float] = {}

    def count(record: dict) -> None:
        nonlocal tokens, calls
        tokens += record["total_tokens"]
        calls += 1
        spent.append((round(time.time(), 4), record["total_tokens"]))

    async def call_until_refused(middleware: object, refused: type[Exception]) -> tuple[float, float]:
        started = time.time()
        try:
            while True:
                await agent.run("Spend.", middleware=[middleware])
                await asyncio.sleep(0)  # let the publisher and the notices feed run, as real I/O would
        except refused:
            return started, time.time()

    if args.variant == "seed":
        from token_guard_middleware import TokenGuardMiddleware as SeedMiddleware
        from token_guard_middleware.token_tracker import InMemoryQuotaStore
        from token_guard_middleware.token_tracker import QuotaExceededError as SeedQuotaExceededError

        middleware = SeedMiddleware(
            on_usage=count, quota_store=InMemoryQuotaStore(), quota_tokens=args.limit, user_id_getter=lambda _: args.tenant
        )
        await wait_for_go()
        started, ended = await call_until_refused(middleware, SeedQuotaExceededError)
    else:
        async with KafkaQuotaStore(config(args)) as store:
            stages = observe_notices(store)[1].setdefault(args.tenant, {})
            quota = 10**12 if args.variant == "rule" else args.limit  # a rule variant: only the rule binds
            middleware = TokenGuardMiddleware(
                quota_store=store, quota_tokens=quota, on_usage=count, user_id_getter=lambda _: args.tenant
            )
            await wait_for_go()
            started, ended = await call_until_refused(middleware, QuotaExceededError)
    print(json.dumps({"name": args.name, "tokens": tokens, "calls": calls, "started": started, "ended": ended,
                      "notice": stages.get("applied"), "emitted": stages.get("emitted"), "spent": spent}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["watch", "overshoot"])
    parser.add_argument("--bootstrap-servers", required=True)
    parser.add_argument("--topic-prefix", required=True)
    parser.add_argument("--partitions", type=int, default=6)
    parser.add_argument("--name", required=True)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--variant", choices=["ours", "seed", "rule"], default="ours")
    parser.add_argument("--tenant", default="hot")
    parser.add_argument("--limit", type=int, default=1_000_000)
    parser.add_argument("--reply-words", type=int, default=40)
    args = parser.parse_args()
    asyncio.run(watch(args) if args.mode == "watch" else overshoot(args))


if __name__ == "__main__":
    main()
