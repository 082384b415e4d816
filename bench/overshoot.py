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

Each process reports every admitted call's time and tokens and when its snapshot took the
tenant's "exceeded" notice: the results JSON and the plots (``bench/results/overshoot*.png``)
show the fleet's admitted tokens over time against the limit, each notice's arrival marked, and
``stages_ms`` where the overshoot goes: from the moment the fleet's spend crossed the limit to the
notice's flush at the aggregator (``to_notice``), to its arrival in the last process
(``to_last_arrival``), to the last process's refusal (``to_last_refusal``).

``--compare PATH`` measures another checkout's packages (a worktree of an older commit) the same way,
alternating with this one on the same broker.
"""

from __future__ import annotations

import argparse
import asyncio
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
    result_path,
    save_results,
    start_aggregator,
    stop_process,
)

from aggregator.limits import write_rule
from producer import KafkaConnection, ensure_topics
from schemas.policy import QuotaRule


async def run_fleet(variant: str, bootstrap: str, prefix: str, partitions: int, instances: int, limit: int,
                    tenant: str = "hot", at_minute_start: bool = False, code: Path = REPO) -> list[dict]:
    fleet = Fleet(code)
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


def timeline(results: list[dict]) -> list[tuple[float, int]]:
    """The fleet's admitted tokens over time: (seconds since its first call began, running total)."""
    began = min(r["started"] for r in results)
    total, points = 0, [(0.0, 0)]
    for when, tokens in sorted(call for r in results for call in r["spent"]):
        total += tokens
        points.append((when - began, total))
    return points


def summarize(results: list[dict], limit: int) -> dict:
    tokens = sum(r["tokens"] for r in results)
    calls = sum(r["calls"] for r in results)
    began = min(r["started"] for r in results)
    ended = max(r["ended"] for r in results)
    rate = tokens / max(ended - began, 1e-9)  # fleet spend, tokens per second
    overshoot = max(0, tokens - limit)
    figures = {"tokens": tokens, "calls": calls, "seconds": ended - began, "overshoot": overshoot,
               "fraction": overshoot / limit, "ms_of_spend": overshoot / rate * 1000, "per_call": tokens / max(calls, 1)}
    points = timeline(results)
    crossed = next((t for t, total in points if total >= limit), None)
    arrivals = [r["notice"] - began for r in results if r.get("notice") is not None]
    emitted = [r["emitted"] - began for r in results if r.get("emitted") is not None]
    if crossed is not None:
        stages = {"to_last_refusal": (ended - began - crossed) * 1000}
        if emitted:
            stages["to_notice"] = (min(emitted) - crossed) * 1000
        if arrivals:
            stages["to_last_arrival"] = (max(arrivals) - crossed) * 1000
            stages["arrival_spread"] = (max(arrivals) - min(arrivals)) * 1000
        figures["stages_ms"] = {name: round(value, 1) for name, value in stages.items()}
    figures["notices"] = {r["name"]: round(r["notice"] - began, 4) for r in results if r.get("notice") is not None}
    figures["timeline"] = points
    return figures


def median_of(runs: list[dict], key: str) -> float:
    return median([run[key] for run in runs])


async def measure(bootstrap: str, code: Path, instances: int, limit: int) -> tuple[dict, dict]:
    """The calendar-period fleet and the tokens-per-minute rule fleet of ``code``'s packages, on
    fresh topics with their own aggregator."""
    connection = KafkaConnection(bootstrap_servers=bootstrap)
    layout = fresh_layout("overshoot")
    await ensure_topics(connection, layout)
    aggregator = await start_aggregator(bootstrap, layout, f"{layout.prefix}aggregator", code)
    try:
        ours = summarize(await run_fleet("ours", bootstrap, layout.prefix, layout.partitions, instances, limit,
                                         code=code), limit)
        await write_rule(connection, layout, QuotaRule(
            name="tpm", tenant_id="tpm", limit=limit, window="rate", window_seconds=60, thresholds=(0.5, 0.8, 0.9),
            effective_from=datetime(2020, 1, 1, tzinfo=UTC), updated_at=datetime.now(UTC)))
        results = await run_fleet("rule", bootstrap, layout.prefix, layout.partitions, instances, limit,
                                  tenant="tpm", at_minute_start=True, code=code)
        rule = summarize(results, limit)
        windows = {int(r["started"]) // 60 for r in results} | {int(r["ended"]) // 60 for r in results}
        rule["one_window"] = len(windows) == 1
    finally:
        await stop_process(aggregator)
    return ours, rule


async def main(instances: int, limit: int, rounds: int, compare: Path | None) -> None:
    variants = {"now": REPO} if compare is None else {"base": compare, "now": REPO}
    runs: dict[str, dict[str, list[dict]]] = {name: {"ours": [], "rule": []} for name in variants}
    with broker() as bootstrap:
        for index in range(rounds):
            order = list(variants.items()) if index % 2 == 0 else list(variants.items())[::-1]
            for name, code in order:
                ours, rule = await measure(bootstrap, code, instances, limit)
                runs[name]["ours"].append(ours)
                runs[name]["rule"].append(rule)
        layout = fresh_layout("overshoot-seed")
        await ensure_topics(KafkaConnection(bootstrap_servers=bootstrap), layout)
        seed = summarize(await run_fleet("seed", bootstrap, layout.prefix, layout.partitions, instances, limit), limit)
    print("\n| code | middleware | processes | limit | tokens admitted (median) | overshoot | of limit | ms of fleet spend | "
          "to notice | to last arrival | to last refusal |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name in variants:
        for kind, label in (("ours", "ours (Kafka), calendar period"), ("rule", "ours (Kafka), tokens-per-minute rule")):
            one = runs[name][kind]
            stages = [run.get("stages_ms", {}) for run in one]

            def stage(key: str, stages: list[dict] = stages) -> str:
                values = [s[key] for s in stages if key in s]
                return f"{median(values):.0f} ms" if values else "-"

            print(f"| {name} | {label} | {instances} | {limit:,} | {median_of(one, 'tokens'):,.0f} | "
                  f"{median_of(one, 'overshoot'):,.0f} | {median_of(one, 'fraction'):.2%} | {median_of(one, 'ms_of_spend'):.0f} ms | "
                  f"{stage('to_notice')} | {stage('to_last_arrival')} | {stage('to_last_refusal')} |")
    print(f"| - | seed (memory per process) | {instances} | {limit:,} | {seed['tokens']:,} | {seed['overshoot']:,} | "
          f"{seed['fraction']:.2%} | {seed['ms_of_spend']:.0f} ms | - | - | - |")
    now = runs["now"]
    ours, rule = now["ours"][-1], now["rule"][-1]
    print(f"fleet spend {ours['tokens'] / ours['seconds']:,.0f} tokens/s at {ours['per_call']:.0f} tokens a call; "
          f"one call per process in flight adds up to {instances * ours['per_call']:,.0f} tokens")
    if not all(run["one_window"] for one in runs.values() for run in one["rule"]):
        print("WARNING: a rule fleet's burst crossed a minute boundary; its figure is not one window's")

    def figures_of(one: dict[str, list[dict]]) -> dict[str, object]:
        return {"overshoot_tokens": median_of(one["ours"], "overshoot"),
                "overshoot_fraction": round(median_of(one["ours"], "fraction"), 4),
                "overshoot_ms_of_spend": round(median_of(one["ours"], "ms_of_spend"), 1),
                "tpm_overshoot_tokens": median_of(one["rule"], "overshoot"),
                "tpm_overshoot_fraction": round(median_of(one["rule"], "fraction"), 4),
                "tpm_overshoot_ms_of_spend": round(median_of(one["rule"], "ms_of_spend"), 1),
                "tpm_one_window": all(run["one_window"] for run in one["rule"]),
                "round_ms_of_spend": [round(run["ms_of_spend"], 1) for run in one["ours"]],
                "tpm_round_ms_of_spend": [round(run["ms_of_spend"], 1) for run in one["rule"]],
                "stages_ms": now_stages(one["ours"]), "tpm_stages_ms": now_stages(one["rule"])}

    figures: dict[str, object] = {**figures_of(now), "seed_overshoot_tokens": seed["overshoot"],
                                  "seed_overshoot_ms_of_spend": round(seed["ms_of_spend"], 1),
                                  "instances": instances, "limit": limit, "rounds": rounds}
    if compare is not None:
        figures["base"] = {**figures_of(runs["base"]), "code": str(compare)}
    name = "overshoot" if instances == 16 and limit == 2_000_000 else "overshoot_quick"
    save_results(name, {**figures, "notices": {k: {kind: [run["notices"] for run in one[kind]] for kind in one}
                                               for k, one in runs.items()}})
    try:
        from plots import plot_overshoot

        for code_name, one in runs.items():
            suffix = "" if code_name == "now" else f"_{code_name}"
            for kind, title in (("ours", "calendar period"), ("rule", "tokens-per-minute rule")):
                run = one[kind][-1]
                plot_overshoot(run["timeline"], limit, run["notices"], result_path(f"{name}{suffix}_{kind}", ".png"),
                               title=f"Overshoot ({code_name}): {instances} processes, {title}, "
                                     f"{run['ms_of_spend']:.0f} ms of fleet spend")
    except ImportError:
        print("no plot: matplotlib is the bench extra (pip install -c constraints.txt -e '.[bench]')")
    emit(figures)


def now_stages(runs: list[dict]) -> dict[str, float]:
    """Median of each stage over the rounds."""
    keys = {key for run in runs for key in run.get("stages_ms", {})}
    return {key: round(median([run["stages_ms"][key] for run in runs if key in run.get("stages_ms", {})]), 1)
            for key in sorted(keys)}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="4 processes, limit 200,000")
    parser.add_argument("--instances", type=int, default=16)
    parser.add_argument("--limit", type=int, default=2_000_000)
    parser.add_argument("--rounds", type=int, default=1, help="fresh topics, aggregator and fleets each round")
    parser.add_argument("--compare", type=Path, help="another checkout (base) measured alternately on the same broker")
    args = parser.parse_args()
    if args.quick:
        args.instances, args.limit = 4, 200_000
    asyncio.run(main(args.instances, args.limit, args.rounds, args.compare))
