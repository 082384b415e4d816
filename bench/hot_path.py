"""The per-call cost of the middleware's own logic, side by side with the seed.

Every variant runs real ``Agent.run`` calls over the scripted chat client (no latency), one call
at a time, the variants interleaved in blocks of ``BLOCK_CALLS`` calls within each round (order
rotated block by block) so drift hits all alike; a round's figure for a variant is the median of
all its calls in the round:

- ``noop``: a ChatMiddleware that only calls ``call_next`` (the framework's own cost);
- ``seed``: the seed's TokenGuardMiddleware with its InMemoryQuotaStore and an on_usage callback;
- ``ours``: ours in Kafka mode, the publisher and the notices feed running against the broker
  (the background publishing runs on the same event loop, so its cost is counted too);
- ``ours_nojournal``: the same with the spool but without the write-ahead journal (``journal=False``);
- ``ours_nospool``: the same without an on-disk spool configured (so no journal either).

The middleware's own cost is the variant's median minus noop's; ``ratio_vs_seed`` compares ours
with the seed's. The amortised CPU per call is ``time.process_time`` (every thread of the process,
user and system time) over each block of a variant's calls, ending after the background publisher
has delivered everything the block published (``flush``): the sender's encoding, batching, socket
writes and acknowledgements on the event loop are counted, waiting for the broker is not. Its own
part (minus noop's) gives ``cpu_ratio_vs_seed``. Needs the seed package: ``pip install --no-deps azureaicommunity-agent-token-guard==0.1.0``
(``make bench`` does it).

    python bench/hot_path.py            # 9 rounds x 3,000 calls per variant; bench/results/hot_path.json
    python bench/hot_path.py --quick    # 3 rounds x 500 calls; bench/results/hot_path_quick.json
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from _common import broker, emit, fresh_layout, median, save_results
from agent_framework import Agent, ChatMiddleware

from producer import KafkaConnection, KafkaQuotaStore, ProducerConfig, TokenGuardMiddleware, ensure_topics
from producer.scripted import ScriptedChatClient

try:
    from token_guard_middleware import TokenGuardMiddleware as SeedMiddleware
    from token_guard_middleware.token_tracker import InMemoryQuotaStore as SeedStore
except ImportError as exc:  # pragma: no cover - a setup step, said plainly
    raise SystemExit(
        "the seed package is missing: pip install --no-deps azureaicommunity-agent-token-guard==0.1.0"
    ) from exc


class YieldingClient(ScriptedChatClient):
    """Answers at once but yields to the event loop once per call, as any real I/O would, so the
    publisher's background work interleaves with the calls instead of piling up after them."""

    async def _respond(self, text: str, usage: Any) -> Any:
        await asyncio.sleep(0)
        return await super()._respond(text, usage)


class NoOp(ChatMiddleware):
    async def process(self, context: Any, call_next: Any) -> None:
        await call_next()


# Each round's calls of a variant run in blocks of this many, the variants' blocks interleaved
# (order rotated block by block): load that comes and goes on a shared machine then falls on all
# variants alike, where whole slices of a few seconds each would catch it unevenly.
BLOCK_CALLS = 250


def on_usage(record: dict[str, Any]) -> None:
    """Both middlewares get the same trivial callback, as an application would pass one."""


async def time_calls(agent: Agent, middleware: Any, calls: int, store: KafkaQuotaStore | None = None) -> tuple[list[float], float]:
    """Per-call latencies (us), and the CPU time per call including delivering what was published
    (CPU, not wall: waiting for the broker's acknowledgement is idle time, not cost)."""
    samples = []
    run = agent.run
    begun = time.process_time_ns()
    for _ in range(calls):
        started = time.perf_counter_ns()
        await run("What is our token budget?", middleware=[middleware])
        samples.append((time.perf_counter_ns() - started) / 1000)
    if store is not None:
        await store.publisher.flush(timeout=60)
    return samples, (time.process_time_ns() - begun) / 1000 / calls


async def main(rounds: int, calls: int, *, quick: bool = False) -> None:
    with broker() as bootstrap, tempfile.TemporaryDirectory() as spool_root:
        connection = KafkaConnection(bootstrap_servers=bootstrap)
        layout = fresh_layout("hotpath")
        await ensure_topics(connection, layout)
        base = ProducerConfig(connection=connection, topics=layout, instance_id="bench", spool_dir=Path(spool_root))
        async with KafkaQuotaStore(base) as with_spool, KafkaQuotaStore(replace(base, spool_dir=None)) as without, \
                KafkaQuotaStore(replace(base, journal=False, instance_id="bench-nj")) as no_journal:
            variants: dict[str, Any] = {
                "noop": NoOp(),
                "seed": SeedMiddleware(on_usage=on_usage, quota_store=SeedStore(), quota_tokens=10**15),
                "ours": TokenGuardMiddleware(quota_store=with_spool, quota_tokens=10**15, on_usage=on_usage),
                "ours_nojournal": TokenGuardMiddleware(quota_store=no_journal, quota_tokens=10**15, on_usage=on_usage),
                "ours_nospool": TokenGuardMiddleware(quota_store=without, quota_tokens=10**15, on_usage=on_usage),
            }
            stores = {"ours": with_spool, "ours_nojournal": no_journal, "ours_nospool": without}
            agent = Agent(YieldingClient(reply_words=40))
            for name, middleware in variants.items():  # warm up every path once
                await time_calls(agent, middleware, 200, stores.get(name))
            per_round: dict[str, list[float]] = {name: [] for name in variants}
            amortized: dict[str, list[float]] = {name: [] for name in variants}
            all_ours: list[float] = []
            names = list(variants)
            blocks = max(1, calls // BLOCK_CALLS)
            for round_ in range(rounds):
                samples: dict[str, list[float]] = {name: [] for name in names}
                cpu: dict[str, list[float]] = {name: [] for name in names}
                for block in range(blocks):
                    shift = (round_ * blocks + block) % len(names)
                    for name in names[shift:] + names[:shift]:
                        gc.collect()
                        block_samples, per_call = await time_calls(agent, variants[name], calls // blocks, stores.get(name))
                        samples[name].extend(block_samples)
                        cpu[name].append(per_call)
                for name in names:
                    per_round[name].append(statistics.median(samples[name]))
                    amortized[name].append(statistics.fmean(cpu[name]))
                all_ours.extend(samples["ours"])
                print(f"round {round_ + 1}: " + ", ".join(f"{n} {per_round[n][-1]:.1f} us" for n in names))
            await with_spool.publisher.flush(timeout=60)
            await without.publisher.flush(timeout=60)
            await no_journal.publisher.flush(timeout=60)
            published = sum(store.publisher.stats.published for store in stores.values())
    med = {name: median(values) for name, values in per_round.items()}
    amo = {name: median(values) for name, values in amortized.items()}
    own = {name: med[name] - med["noop"] for name in names if name != "noop"}
    own_amo = {name: amo[name] - amo["noop"] for name in names if name != "noop"}
    ratio = own["ours"] / own["seed"]
    ratio_amortized = own_amo["ours"] / own_amo["seed"]
    p99 = sorted(all_ours)[int(len(all_ours) * 0.99)]
    print("\n| variant | median per call | own cost (median - noop) | CPU per call incl. publishing | own CPU per call |")
    print("|---|---|---|---|---|")
    for name in names:
        extra = ("", "") if name == "noop" else (f"{own[name]:.1f} us", f"{own_amo[name]:.1f} us")
        print(f"| {name} | {med[name]:.1f} us | {extra[0]} | {amo[name]:.1f} us | {extra[1]} |")
    print(f"\nratio_vs_seed = (ours - noop) / (seed - noop) = {ratio:.2f} on medians, {ratio_amortized:.2f} amortized "
          f"(the publisher's background work included); ours p99 {p99:.1f} us; "
          f"{published:,} usage events delivered to Kafka during the run")
    figures = {
        "rounds": rounds, "calls_per_round": calls, "noop_us": round(med["noop"], 2), "seed_us": round(med["seed"], 2),
        "ours_us": round(med["ours"], 2), "ours_nojournal_us": round(med["ours_nojournal"], 2),
        "ours_nospool_us": round(med["ours_nospool"], 2),
        "journal_cost_us": round(own["ours"] - own["ours_nojournal"], 2),
        "journal_cost_amortized_us": round(own_amo["ours"] - own_amo["ours_nojournal"], 2),
        "ratio_vs_seed": round(ratio, 3), "ratio_vs_seed_amortized": round(ratio_amortized, 3), "p99_us": round(p99, 2),
        **{f"cpu_us_per_call_{name}": round(amo[name], 2) for name in names},
        **{f"own_cpu_us_per_call_{name}": round(own_amo[name], 2) for name in names if name != "noop"},
        "cpu_ratio_vs_seed": round(ratio_amortized, 3),
    }
    save_results("hot_path_quick" if quick else "hot_path", figures)
    emit(figures)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 rounds x 500 calls")
    args = parser.parse_args()
    asyncio.run(main(3, 500, quick=True) if args.quick else main(9, 3_000))
