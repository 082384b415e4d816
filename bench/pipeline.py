"""Events per second through the pipeline: the publisher, one aggregator process, two.

1. publish: one process queues N usage events with ``UsagePublisher.publish`` (the middleware's
   hot path) and waits until the broker has acknowledged all of them.
2. aggregate: ``python -m aggregator`` processes (1, then 2, each time a new consumer group over
   the same topic) consume the N events: validate, aggregate, changelog, commit. Timed from the
   group's first commit to the moment its lag reaches 0, so process start-up is not counted.

    python bench/pipeline.py            # 400,000 events, 3 rounds
    python bench/pipeline.py --quick    # 100,000 events, 1 round
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import sys
import time
from dataclasses import replace
from datetime import UTC, datetime

from _common import REPO, broker, emit, fresh_layout, median

from aggregator.verify import end_offsets
from producer import KafkaConnection, ProducerConfig, UsagePublisher, ensure_topics
from schemas.topics import TopicLayout
from schemas.wire import UsageDraft
from transport.admin import committed_offsets


def make_events(count: int, tenants: int = 10_000) -> list[UsageDraft]:
    """Events as the middleware hands them to the publisher."""
    rng = random.Random(1)
    now = datetime.now(UTC)
    return [
        UsageDraft(
            event_id=f"bench{i:012d}", tenant_id=f"tenant-{rng.randrange(tenants):05d}",
            period_key="2026-11", model="m", input_tokens=40, output_tokens=60, total_tokens=100,
            cache_creation_input_tokens=None, cache_read_input_tokens=None, reasoning_output_tokens=None,
            quota_tokens=10**9, event_time=now, streaming=False, estimated=False, instance_id="bench", attributes={},
        )
        for i in range(count)
    ]


async def publish(config: ProducerConfig, events: list[UsageDraft]) -> float:
    async with UsagePublisher(config) as publisher:
        started = time.perf_counter()
        for start in range(0, len(events), 10_000):
            for event in events[start : start + 10_000]:
                publisher.publish(event)
            await asyncio.sleep(0)  # let the sender run, as an application's event loop would
        await publisher.flush(timeout=300)
        return len(events) / (time.perf_counter() - started)


async def aggregate(connection: KafkaConnection, layout: TopicLayout, processes: int, group: str) -> float:
    ends = await end_offsets(connection, layout.usage)
    total = sum(ends.values())
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    logs = REPO / ".cache" / "bench-logs"
    logs.mkdir(parents=True, exist_ok=True)
    children = []
    for index in range(processes):
        with open(logs / f"{group}-{index}.log", "w") as log:  # noqa: ASYNC230 - a local log file
            children.append(await asyncio.create_subprocess_exec(
                sys.executable, "-m", "aggregator", "--bootstrap-servers", connection.bootstrap_servers,
                "--topic-prefix", layout.prefix, "--group-id", group, "--log-level", "INFO",
                cwd=REPO, env=env, stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log,
            ))
    deadline = time.perf_counter() + 300
    try:
        first_commit_at = None
        done_at_first = 0
        while True:
            if time.perf_counter() > deadline:
                for child in children:
                    child.send_signal(signal.SIGUSR1)  # each prints its asyncio tasks' stacks to its log
                await asyncio.sleep(1)
                raise RuntimeError(f"group {group} did not catch up within 300 s; see {logs}/{group}-*.log")
            committed = await committed_offsets(connection, group, layout.usage)
            done = sum(committed.values())
            now = time.perf_counter()
            if first_commit_at is None and done > 0:
                first_commit_at, done_at_first = now, done
            if done >= total:
                break
            await asyncio.sleep(0.05)
        assert first_commit_at is not None
        return (total - done_at_first) / max(now - first_commit_at, 1e-9)
    finally:
        for child in children:
            child.send_signal(signal.SIGTERM)
        for child in children:
            try:
                await asyncio.wait_for(child.wait(), 30)
            except TimeoutError:
                child.send_signal(signal.SIGUSR1)
                await asyncio.sleep(1)
                child.kill()
                await child.wait()
                print(f"an aggregator of {group} did not stop on SIGTERM; its task stacks are in {logs}", file=sys.stderr)


async def main(count: int, rounds: int) -> None:
    with broker() as bootstrap:
        connection = KafkaConnection(bootstrap_servers=bootstrap)
        events = make_events(count)
        results: dict[str, list[float]] = {"publish": [], "aggregate_1": [], "aggregate_2": []}
        for round_ in range(rounds):
            layout = fresh_layout(f"pipeline{round_}")
            await ensure_topics(connection, layout)
            config = replace(ProducerConfig(connection=connection, topics=layout), instance_id="bench")
            results["publish"].append(await publish(config, events))
            # The two group sizes alternate in order between rounds, so drift hits both alike.
            order = (1, 2) if round_ % 2 == 0 else (2, 1)
            for processes in order:
                eps = await aggregate(connection, layout, processes, f"{layout.prefix}g{processes}")
                results[f"aggregate_{processes}"].append(eps)
            print(
                f"round {round_ + 1}: publish {results['publish'][-1]:,.0f}/s, 1 aggregator "
                f"{results['aggregate_1'][-1]:,.0f}/s, 2 aggregators {results['aggregate_2'][-1]:,.0f}/s"
            )
        figures = {k: median(v) for k, v in results.items()}
        scaling = figures["aggregate_2"] / figures["aggregate_1"]
        print(
            f"\n| events | rounds | publish eps | 1 aggregator eps | 2 aggregators eps | scaling |\n"
            f"|---|---|---|---|---|---|\n| {count:,} | {rounds} | {figures['publish']:,.0f} | "
            f"{figures['aggregate_1']:,.0f} | {figures['aggregate_2']:,.0f} | {scaling:.2f} |"
        )
        print(f"(this machine has {os.cpu_count()} cores; the broker runs on the same machine)")
        emit({
            "events": count, "rounds": rounds, "publish_eps": round(figures["publish"]),
            "aggregate_eps_1": round(figures["aggregate_1"]), "aggregate_eps_2": round(figures["aggregate_2"]),
            "scaling_2": round(scaling, 2),
        })


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="100,000 events, 1 round")
    args = parser.parse_args()
    asyncio.run(main(100_000 if args.quick else 400_000, 1 if args.quick else 3))
