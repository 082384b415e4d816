"""Overshoot: N middleware processes (16 by default) call for one tenant as fast as they can, with
a fixed token cost per call, until every one of them is refused. The tokens admitted beyond the
limit are the price of deciding locally; the same scenario with the seed (one InMemoryQuotaStore
per process, as the seed would be deployed across processes) shows what it is the price of.

    python bench/overshoot.py            # 16 processes, limit 2,000,000 tokens
    python bench/overshoot.py --quick    # 4 processes, limit 200,000 tokens

Three fleets in one run, side by side: ours against the tenant's limit for its calendar period
(``quota_tokens``); ours against a tokens-per-minute quota rule of the same limit (a rate window of
60 s, thresholds 0.5/0.8/0.9; the fleet starts just after a minute begins, so its whole burst
falls in one window, which the result checks); and the seed.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from datetime import UTC, datetime

from _common import Fleet, broker, emit, fresh_layout, start_aggregator, stop_process

from aggregator.limits import write_rule
from producer import KafkaConnection, ensure_topics
from schemas.policy import QuotaRule


async def run_fleet(variant: str, bootstrap: str, prefix: str, partitions: int, instances: int, limit: int,
                    tenant: str = "hot", at_minute_start: bool = False) -> list[dict]:
    fleet = Fleet()
    try:
        for index in range(instances):
            await fleet.spawn("overshoot", "--variant", variant, "--bootstrap-servers", bootstrap, "--topic-prefix", prefix,
                              "--partitions", str(partitions), "--name", f"{variant}{index}", "--limit", str(limit),
                              "--tenant", tenant)
        await fleet.ready()
        if at_minute_start:
            await asyncio.sleep(60 - time.time() % 60 + 0.5)
        fleet.go()
        return [line for child in fleet.children for line in await fleet.lines(child)]
    finally:
        await fleet.close()


def summarize(results: list[dict], limit: int) -> dict[str, float | bool]:
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
            await write_rule(connection, layout, QuotaRule(
                name="tpm", tenant_id="tpm", limit=limit, window="rate", window_seconds=60, thresholds=(0.5, 0.8, 0.9),
                effective_from=datetime(2020, 1, 1, tzinfo=UTC), updated_at=datetime.now(UTC)))
            results = await run_fleet("rule", bootstrap, layout.prefix, layout.partitions, instances, limit,
                                      tenant="tpm", at_minute_start=True)
            rule = summarize(results, limit)
            windows = {int(r["started"]) // 60 for r in results} | {int(r["ended"]) // 60 for r in results}
            rule["one_window"] = len(windows) == 1
        finally:
            await stop_process(aggregator)
        seed = summarize(await run_fleet("seed", bootstrap, layout.prefix, layout.partitions, instances, limit), limit)
    print("\n| middleware | processes | limit | tokens admitted | overshoot | of limit | ms of fleet spend | calls |")
    print("|---|---|---|---|---|---|---|---|")
    rows = (("ours (Kafka), calendar period", ours), ("ours (Kafka), tokens-per-minute rule", rule),
            ("seed (memory per process)", seed))
    for name, figures in rows:
        print(f"| {name} | {instances} | {limit:,} | {figures['tokens']:,} | {figures['overshoot']:,} | "
              f"{figures['fraction']:.2%} | {figures['ms_of_spend']:.0f} ms | {figures['calls']:,} |")
    print(f"fleet spend {ours['tokens'] / ours['seconds']:,.0f} tokens/s at {ours['per_call']:.0f} tokens a call; "
          f"one call per process in flight adds up to {instances * ours['per_call']:,.0f} tokens")
    if not rule["one_window"]:
        print("WARNING: the rule fleet's burst crossed a minute boundary; its figure is not one window's")
    emit({"overshoot_tokens": ours["overshoot"], "overshoot_fraction": round(ours["fraction"], 4),
          "overshoot_ms_of_spend": round(ours["ms_of_spend"], 1), "seed_overshoot_tokens": seed["overshoot"],
          "tpm_overshoot_tokens": rule["overshoot"], "tpm_overshoot_fraction": round(rule["fraction"], 4),
          "tpm_overshoot_ms_of_spend": round(rule["ms_of_spend"], 1), "tpm_one_window": rule["one_window"],
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
