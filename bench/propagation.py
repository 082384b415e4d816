"""Notice propagation: from publishing the event that crosses a tenant's limit to the moment every
middleware process (8 separate processes by default) blocks that tenant, under a steady
background load (10,000 events/s by default) through the same aggregator.

Each trial takes a fresh tenant ``probe-N`` with a limit of 1,000 tokens and publishes one event of
1,500 tokens at t0; each process reports the wall-clock time its snapshot first refuses the tenant
(same machine, same clock). The trial's latency is the last of the processes.

    python bench/propagation.py            # 8 processes, 10,000 events/s, 40 trials
    python bench/propagation.py --quick    # 4 processes, 2,000 events/s, 10 trials
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from datetime import UTC, datetime

from _common import Fleet, broker, emit, fresh_layout, percentile, start_aggregator, stop_process

from producer import KafkaConnection, ProducerConfig, UsagePublisher, ensure_topics
from schemas.wire import UsageDraft


def draft(index: int, tenant: str, tokens: int, quota: int) -> UsageDraft:
    return UsageDraft(
        event_id=f"prop{index:012d}", tenant_id=tenant, period_key="p", model="m", input_tokens=None,
        output_tokens=None, total_tokens=tokens, cache_creation_input_tokens=None, cache_read_input_tokens=None,
        reasoning_output_tokens=None, quota_tokens=quota, event_time=datetime.now(UTC), streaming=False,
        estimated=False, instance_id="bench-load", attributes={},
    )


async def background_load(publisher: UsagePublisher, eps: int, stop: asyncio.Event) -> int:
    rng = random.Random(3)
    sent = 0
    tick = 0.01
    next_at = time.monotonic()
    while not stop.is_set():
        for _ in range(max(1, int(eps * tick))):
            publisher.publish(draft(10**9 + sent, f"load-{rng.randrange(5_000)}", 50, 10**12))
            sent += 1
        next_at += tick
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))
    return sent


async def main(instances: int, load_eps: int, trials: int) -> None:
    with broker() as bootstrap:
        connection = KafkaConnection(bootstrap_servers=bootstrap)
        layout = fresh_layout("propagation")
        await ensure_topics(connection, layout)
        aggregator = await start_aggregator(bootstrap, layout, f"{layout.prefix}aggregator")
        fleet = Fleet()
        try:
            for index in range(instances):
                await fleet.spawn("watch", "--bootstrap-servers", bootstrap, "--topic-prefix", layout.prefix,
                                  "--partitions", str(layout.partitions), "--name", f"w{index}", "--trials", str(trials))
            await fleet.ready()
            fleet.go()
            config = ProducerConfig(connection=connection, topics=layout, instance_id="bench-load", spool_dir=None)
            async with UsagePublisher(config) as publisher:
                stop = asyncio.Event()
                load = asyncio.create_task(background_load(publisher, load_eps, stop))
                await asyncio.sleep(3)  # the load reaches a steady state first
                sent_at = []
                for trial in range(trials):
                    sent_at.append(time.time())
                    publisher.publish(draft(trial, f"probe-{trial}", 1_500, 1_000))
                    await asyncio.sleep(0.5)
                await asyncio.sleep(2)
                stop.set()
                sent = await load
                load_seconds = 3 + trials * 0.5 + 2
            reports = [await fleet.lines(child) for child in fleet.children]
        finally:
            await fleet.close()
            await stop_process(aggregator)
    latencies = []
    for trial in range(trials):
        blocked = [next(r["blocked_at"] for r in report if r["trial"] == trial) for report in reports]
        latencies.append((max(blocked) - sent_at[trial]) * 1000)
    p50, p99 = percentile(latencies, 0.5), percentile(latencies, 0.99)
    achieved = sent / load_seconds
    print(f"\n| processes | background load | trials | p50 | p99 | max |\n|---|---|---|---|---|---|\n"
          f"| {instances} | {achieved:,.0f} events/s | {trials} | {p50:.0f} ms | {p99:.0f} ms | {max(latencies):.0f} ms |")
    emit({"p50_ms": round(p50, 1), "p99_ms": round(p99, 1), "instances": instances, "load_eps": round(achieved),
          "trials": trials})


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="4 processes, 2,000 events/s, 10 trials")
    parser.add_argument("--instances", type=int, default=8)
    parser.add_argument("--load-eps", type=int, default=10_000)
    parser.add_argument("--trials", type=int, default=40)
    args = parser.parse_args()
    if args.quick:
        args.instances, args.load_eps, args.trials = 4, 2_000, 10
    asyncio.run(main(args.instances, args.load_eps, args.trials))
