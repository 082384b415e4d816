"""Notice propagation: from publishing the event that crosses a tenant's limit to the moment every
middleware process (8 separate processes by default) blocks that tenant, under a steady
background load (10,000 events/s by default) through the same aggregator.

Each trial takes a fresh tenant ``probe-N`` with a limit of 1,000 tokens and publishes one event of
1,500 tokens at t0; each process reports the wall-clock time its snapshot first refuses the tenant
(same machine, same clock). The trial's latency is the last of the processes.

Where the time goes, per trial, along the slowest process's path (medians in ``stages_ms``):
``publish`` (t0 to the broker's acknowledgement of the event), ``aggregate`` (to the aggregator's
flush that writes the notice: its poll and batch window), ``flush`` (to the notice's send),
``deliver`` (to the process's fetch of it), ``check`` (to the snapshot taking it: the feed's
check of the notice's offset against the usage topic's end) and ``wake`` (to the refusal seen).

``--compare PATH`` runs the same rounds against the packages of another checkout (a worktree of an
older commit), alternating with this one on the same broker; the bench's own publisher is this
checkout's in both.

    python bench/propagation.py                          # 8 processes, 10,000 events/s, 40 trials
    python bench/propagation.py --quick                  # 4 processes, 2,000 events/s, 10 trials
    python bench/propagation.py --compare /tmp/base --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from datetime import UTC, datetime
from pathlib import Path

from _common import (
    REPO,
    Fleet,
    broker,
    emit,
    fresh_layout,
    median,
    percentile,
    result_path,
    save_results,
    start_aggregator,
    stop_process,
)

from producer import KafkaConnection, ProducerConfig, UsagePublisher, ensure_topics
from schemas.wire import UsageDraft

STAGES = (("publish", "acked"), ("aggregate", "emitted"), ("flush", "sent"), ("deliver", "fetched"),
          ("check", "applied"), ("wake", "blocked_at"))


def draft(index: int, tenant: str, tokens: int, quota: int) -> UsageDraft:
    return UsageDraft(
        event_id=f"prop{index:012d}", tenant_id=tenant, period_key="p", model="m", input_tokens=None,
        output_tokens=None, total_tokens=tokens, cache_creation_input_tokens=None, cache_read_input_tokens=None,
        reasoning_output_tokens=None, quota_tokens=quota, event_time=datetime.now(UTC), streaming=False,
        estimated=False, instance_id="bench-load", attributes={}, trace_id=None, span_id=None,
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


def stages_of(sent_at: float, acked: float | None, slowest: dict) -> dict[str, float]:
    """Each stage's milliseconds along one trial's slowest process; a stage whose end was not
    recorded (an older checkout's process) is left out."""
    marks = {"acked": acked, **slowest}
    stages, previous = {}, sent_at
    for name, mark in STAGES:
        at = marks.get(mark)
        if at is None:
            continue
        stages[name] = (at - previous) * 1000
        previous = at
    return stages


async def one_round(bootstrap: str, code: Path, instances: int, load_eps: int, trials: int) -> dict:
    """One fleet and aggregator of ``code``'s packages on fresh topics: the trials' latencies and stages."""
    connection = KafkaConnection(bootstrap_servers=bootstrap)
    layout = fresh_layout("propagation")
    await ensure_topics(connection, layout)
    aggregator = await start_aggregator(bootstrap, layout, f"{layout.prefix}aggregator", code)
    fleet = Fleet(code)
    acked: dict[int, float] = {}

    def delivered(event: object, partition: int, offset: int) -> None:
        event_id = getattr(event, "event_id", "")
        if event_id.startswith("prop") and int(event_id[4:]) < trials:
            acked.setdefault(int(event_id[4:]), time.time())

    try:
        for index in range(instances):
            await fleet.spawn("watch", "--bootstrap-servers", bootstrap, "--topic-prefix", layout.prefix,
                              "--partitions", str(layout.partitions), "--name", f"w{index}", "--trials", str(trials))
        await fleet.ready()
        fleet.go()
        config = ProducerConfig(connection=connection, topics=layout, instance_id="bench-load", spool_dir=None)
        async with UsagePublisher(config, on_delivered=delivered) as publisher:
            stop = asyncio.Event()
            load = asyncio.create_task(background_load(publisher, load_eps, stop))
            began = time.monotonic()
            await asyncio.sleep(3)  # the load reaches a steady state first
            sent_at = []
            for trial in range(trials):
                sent_at.append(time.time())
                publisher.publish(draft(trial, f"probe-{trial}", 1_500, 1_000))
                await asyncio.sleep(0.5)
            await asyncio.sleep(2)
            stop.set()
            sent = await load
            load_seconds = time.monotonic() - began
        reports = [await fleet.lines(child) for child in fleet.children]
    finally:
        await fleet.close()
        await stop_process(aggregator)
    latencies, stages = [], []
    for trial in range(trials):
        slowest = max((next(r for r in report if r["trial"] == trial) for report in reports), key=lambda r: r["blocked_at"])
        latencies.append((slowest["blocked_at"] - sent_at[trial]) * 1000)
        stages.append(stages_of(sent_at[trial], acked.get(trial), slowest))
    return {"latencies": latencies, "stages": stages, "load_eps": sent / load_seconds}


def summary(rounds: list[dict]) -> dict[str, object]:
    latencies = [value for one in rounds for value in one["latencies"]]
    names = [name for name, _ in STAGES if any(name in stage for one in rounds for stage in one["stages"])]
    stages = {name: round(median([s[name] for one in rounds for s in one["stages"] if name in s]), 1) for name in names}
    return {
        "p50_ms": round(percentile(latencies, 0.5), 1), "p99_ms": round(percentile(latencies, 0.99), 1),
        "max_ms": round(max(latencies), 1),
        "round_p99_ms": [round(percentile(one["latencies"], 0.99), 1) for one in rounds],
        "load_eps": round(median([one["load_eps"] for one in rounds])), "stages_ms": stages,
    }


async def main(instances: int, load_eps: int, trials: int, rounds: int, variants: dict[str, Path]) -> None:
    results: dict[str, list[dict]] = {name: [] for name in variants}
    with broker() as bootstrap:
        for index in range(rounds):
            order = list(variants.items())
            order = order[index % len(order):] + order[:index % len(order)]
            for name, code in order:
                results[name].append(await one_round(bootstrap, code, instances, load_eps, trials))
    summaries = {name: summary(one) for name, one in results.items()}
    print(f"\n| code | processes | background load | trials | p50 | p99 | max | {' | '.join(n for n, _ in STAGES)} |")
    print("|---|---|---|---|---|---|---|" + "---|" * len(STAGES))
    for name, figures in summaries.items():
        stages = figures["stages_ms"]
        assert isinstance(stages, dict)
        print(f"| {name} | {instances} | {figures['load_eps']:,} events/s | {trials * rounds} | {figures['p50_ms']:.0f} ms | "
              f"{figures['p99_ms']:.0f} ms | {figures['max_ms']:.0f} ms | "
              + " | ".join(f"{stages[n]:.1f}" if n in stages else "-" for n, _ in STAGES) + " |")
    figures: dict[str, object] = {**summaries["now"], "instances": instances, "trials": trials, "rounds": rounds}
    for other, code in variants.items():
        if other != "now":
            figures[other] = {**summaries[other], "code": str(code)}
    name = "propagation" if instances == 8 and load_eps == 10_000 else "propagation_quick"
    save_results(name, {**figures,
                        "latencies_ms": {k: [round(v, 1) for one in r for v in one["latencies"]] for k, r in results.items()},
                        "trial_stages_ms": {k: [{s: round(v, 1) for s, v in stage.items()} for one in r for stage in one["stages"]]
                                            for k, r in results.items()}})
    try:
        from plots import plot_propagation

        plot_propagation({k: [v for one in r for v in one["latencies"]] for k, r in results.items()},
                         result_path(name, ".png"),
                         title=f"Notice propagation: {instances} processes, {load_eps:,} events/s background")
    except ImportError:
        print("no plot: matplotlib is the bench extra (pip install -c constraints.txt -e '.[bench]')")
    emit(figures)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="4 processes, 2,000 events/s, 10 trials")
    parser.add_argument("--instances", type=int, default=8)
    parser.add_argument("--load-eps", type=int, default=10_000)
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=1, help="fresh topics, aggregator and fleet each round")
    parser.add_argument("--compare", type=Path, help="another checkout (base) measured alternately on the same broker")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=PATH",
                        help="more checkouts measured alternately (repeatable)")
    args = parser.parse_args()
    if args.quick:
        args.instances, args.load_eps, args.trials = 4, 2_000, 10
    variants = {"base": args.compare} if args.compare else {}
    variants.update({name: Path(path) for name, _, path in (v.partition("=") for v in args.variant)})
    variants["now"] = REPO
    asyncio.run(main(args.instances, args.load_eps, args.trials, args.rounds, variants))
