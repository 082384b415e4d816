"""Overshoot: N middleware processes (16 by default) call for one tenant as fast as they can, with
a fixed token cost per call, until every one of them is refused. The tokens admitted beyond the
limit are the price of deciding locally; the same scenario with the seed (one InMemoryQuotaStore
per process, as the seed would be deployed across processes) shows what it is the price of.

    python bench/overshoot.py            # 16 processes, limit 2,000,000 tokens
    python bench/overshoot.py --quick    # 4 processes, limit 200,000 tokens
"""

from __future__ import annotations

import argparse
import asyncio

from _common import Fleet, broker, emit, fresh_layout, start_aggregator, stop_process

from producer import KafkaConnection, ensure_topics


async def run_fleet(variant: str, bootstrap: str, prefix: str, partitions: int, instances: int, limit: int) -> list[dict]:
    fleet = Fleet()
    try:
        for index in range(instances):
            await fleet.spawn("overshoot", "--variant", variant, "--bootstrap-servers", bootstrap, "--topic-prefix", prefix,
                              "--partitions", str(partitions), "--name", f"{variant}{index}", "--limit", str(limit))
        await fleet.ready()
        fleet.go()
        return [line for child in fleet.children for line in await fleet.lines(child)]
    finally:
        await fleet.close()


def summarize(results: list[dict], limit: int) -> dict[str, float]:
    tokens = sum(r["tokens"] for r in results)
    calls = sum(r["calls"] for r in results)
    began = min(r["started"] for r in results)
    ended = max(r["ended"] for r in results)
    rate = tokens / max(ended - began, 1e-9)  # fleet spend, tokens per second
    overshoot = max(0, tokens - limit)
    return {"tokens": tokens, "calls": calls, "seconds": ended - began, "overshoot": overshoot,
            "fraction": overshoot / limit, "ms_of_spend": overshoot / rate * 1000, "per_call": tokens / max(calls, 1)}


async def main(instances: int, limit: int) -> None:
    with broker() as bootstrap:
        connection = KafkaConnection(bootstrap_servers=bootstrap)
        layout = fresh_layout("overshoot")
        await ensure_topics(connection, layout)
        aggregator = await start_aggregator(bootstrap, layout, f"{layout.prefix}aggregator")
        try:
            ours = summarize(await run_fleet("ours", bootstrap, layout.prefix, layout.partitions, instances, limit), limit)
        finally:
            await stop_process(aggregator)
        seed = summarize(await run_fleet("seed", bootstrap, layout.prefix, layout.partitions, instances, limit), limit)
    print("\n| middleware | processes | limit | tokens admitted | overshoot | of limit | ms of fleet spend | calls |")
    print("|---|---|---|---|---|---|---|---|")
    for name, figures in (("ours (Kafka)", ours), ("seed (memory per process)", seed)):
        print(f"| {name} | {instances} | {limit:,} | {figures['tokens']:,} | {figures['overshoot']:,} | "
              f"{figures['fraction']:.2%} | {figures['ms_of_spend']:.0f} ms | {figures['calls']:,} |")
    print(f"fleet spend {ours['tokens'] / ours['seconds']:,.0f} tokens/s at {ours['per_call']:.0f} tokens a call; "
          f"one call per process in flight adds up to {instances * ours['per_call']:,.0f} tokens")
    emit({"overshoot_tokens": ours["overshoot"], "overshoot_fraction": round(ours["fraction"], 4),
          "overshoot_ms_of_spend": round(ours["ms_of_spend"], 1), "seed_overshoot_tokens": seed["overshoot"],
          "instances": instances, "limit": limit})


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="4 processes, limit 200,000")
    parser.add_argument("--instances", type=int, default=16)
    parser.add_argument("--limit", type=int, default=2_000_000)
    args = parser.parse_args()
    if args.quick:
        args.instances, args.limit = 4, 200_000
    asyncio.run(main(args.instances, args.limit))
