"""The middleware's per-call cost with 0, 1, 10 and 100 quota rules matching every call.

The same approach as ``bench/hot_path.py``: real ``Agent.run`` calls over the scripted chat client
(no latency, one yield per call), one call at a time, variants alternating within each round (the
order rotated each round) so drift on a shared machine hits all alike. One ``KafkaQuotaStore`` is
started against the broker (fresh topics, no spool; no aggregator runs, so every decision takes
the ``keep_known`` staleness path, as in ``hot_path.py``); each variant is a
``TokenGuardMiddleware`` over that store for its own tenant:

- ``noop``: a ChatMiddleware that only calls ``call_next`` (the framework's own cost);
- ``rules_0``: a tenant with no rule (the rules code asks ``rules_apply`` and stops: the baseline);
- ``rules_1``, ``rules_10``, ``rules_100``: a tenant with that many rules, all matching every call
  (total tokens; windows hour, day, week, month, year in turn; thresholds 0.5 and 0.9; limits
  too high to refuse), so each call is admitted against, reserves, releases and spends in each.

The rules are put into the store's ``RuleBook`` directly (``store.limits.rules.set``), not written
to the limits topic: the figures are the per-call cost, not the feed's. The middleware's own cost
is a variant's median minus noop's; ratios are to ``rules_1``'s own cost. CPU per call includes
delivering the published events (the publisher runs on the same loop).

    KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:19092 python bench/rules_hot_path.py           # 7 rounds x 1,000 calls
    KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:19092 python bench/rules_hot_path.py --quick   # 3 rounds x 300 calls
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import statistics
import time
from datetime import UTC, datetime
from typing import Any

from _common import REPO, broker, emit, fresh_layout, median
from agent_framework import Agent, ChatMiddleware

from producer import KafkaConnection, KafkaQuotaStore, ProducerConfig, TokenGuardMiddleware, ensure_topics
from producer.scripted import ScriptedChatClient
from schemas.policy import QuotaRule


def head() -> str:
    """The commit measured (the working tree may differ: say so when it does)."""
    import subprocess

    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()


RULE_COUNTS = (0, 1, 10, 100)
WINDOWS = ("hour", "day", "week", "month", "year")
EPOCH = datetime(2020, 1, 1, tzinfo=UTC)
RESULTS = REPO / "bench" / "results" / "rules_hot_path.json"


class YieldingClient(ScriptedChatClient):
    """As in ``hot_path.py``: answers at once but yields to the loop once per call."""

    async def _respond(self, text: str, usage: Any) -> Any:
        await asyncio.sleep(0)
        return await super()._respond(text, usage)


class NoOp(ChatMiddleware):
    async def process(self, context: Any, call_next: Any) -> None:
        await call_next()


def on_usage(record: dict[str, Any]) -> None:
    """A trivial callback, as an application would pass one."""


def rules_for(tenant: str, count: int) -> list[QuotaRule]:
    now = datetime.now(UTC)
    return [
        QuotaRule(name=f"r{i:03d}", tenant_id=tenant, window=WINDOWS[i % len(WINDOWS)], limit=10**15,  # type: ignore[arg-type]
                  thresholds=(0.5, 0.9), effective_from=EPOCH, updated_at=now)
        for i in range(count)
    ]


async def time_calls(agent: Agent, middleware: Any, calls: int, store: KafkaQuotaStore | None) -> tuple[list[float], float]:
    """Per-call latencies (us), and CPU per call including delivering what was published."""
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


async def main(rounds: int, calls: int) -> None:
    with broker() as bootstrap:
        connection = KafkaConnection(bootstrap_servers=bootstrap)
        layout = fresh_layout("ruleshot")
        await ensure_topics(connection, layout)
        config = ProducerConfig(connection=connection, topics=layout, instance_id="bench", spool_dir=None)
        async with KafkaQuotaStore(config) as store:
            variants: dict[str, Any] = {"noop": NoOp()}
            for count in RULE_COUNTS:
                tenant = f"bench-rules-{count}"
                for rule in rules_for(tenant, count):
                    store.limits.rules.set(rule)
                variants[f"rules_{count}"] = TokenGuardMiddleware(
                    quota_store=store, quota_tokens=10**15, on_usage=on_usage,
                    user_id_getter=lambda _, tenant=tenant: tenant,
                )
                assert len(store.limits.rules.for_tenant(tenant)) == count
            agent = Agent(YieldingClient(reply_words=40))
            names = list(variants)
            for name in names:  # warm up every path once
                await time_calls(agent, variants[name], 100, None if name == "noop" else store)
            # Every rule matched every call: the counters it spent in are in the snapshot.
            per_round: dict[str, list[float]] = {name: [] for name in names}
            amortized: dict[str, list[float]] = {name: [] for name in names}
            for round_ in range(rounds):
                order = names[round_ % len(names):] + names[: round_ % len(names)]
                for name in order:
                    gc.collect()
                    samples, per_call = await time_calls(agent, variants[name], calls, None if name == "noop" else store)
                    per_round[name].append(statistics.median(samples))
                    amortized[name].append(per_call)
                print(f"round {round_ + 1}: " + ", ".join(f"{n} {per_round[n][-1]:.1f} us" for n in names), flush=True)
            blocked = sum(variants[n].stats.blocked for n in names if n != "noop")
            assert blocked == 0, f"{blocked} calls refused: the limits are meant never to refuse"
    med = {name: median(values) for name, values in per_round.items()}
    amo = {name: median(values) for name, values in amortized.items()}
    own = {name: med[name] - med["noop"] for name in names if name != "noop"}
    own_cpu = {name: amo[name] - amo["noop"] for name in names if name != "noop"}
    ratio = {name: own[name] / own["rules_1"] for name in own}
    ratio_cpu = {name: own_cpu[name] / own_cpu["rules_1"] for name in own_cpu}
    per_rule = (own["rules_100"] - own["rules_0"]) / 100
    print("\n| variant | median per call | own cost (median - noop) | ratio to 1 rule | CPU per call incl. publishing | own CPU | ratio to 1 rule (CPU) |")
    print("|---|---|---|---|---|---|---|")
    for name in names:
        if name == "noop":
            print(f"| noop | {med[name]:.1f} us | | | {amo[name]:.1f} us | | |")
        else:
            print(f"| {name} | {med[name]:.1f} us | {own[name]:.1f} us | {ratio[name]:.2f} | {amo[name]:.1f} us | "
                  f"{own_cpu[name]:.1f} us | {ratio_cpu[name]:.2f} |")
    print(f"\nmarginal cost per matching rule = (rules_100 - rules_0) / 100 = {per_rule:.2f} us")
    figures = {
        "bench": "rules_hot_path", "commit": head(), "rounds": rounds, "calls_per_round": calls, "rules_source": "RuleBook.set (not the topic)",
        **{f"{name}_us": round(med[name], 2) for name in names},
        **{f"{name}_own_us": round(own[name], 2) for name in own},
        **{f"{name}_ratio_to_1": round(ratio[name], 3) for name in own},
        **{f"{name}_cpu_us": round(amo[name], 2) for name in names},
        **{f"{name}_own_cpu_us": round(own_cpu[name], 2) for name in own_cpu},
        **{f"{name}_cpu_ratio_to_1": round(ratio_cpu[name], 3) for name in own_cpu},
        "per_rule_us": round(per_rule, 3),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(figures, indent=2) + "\n")
    emit(figures)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 rounds x 300 calls")
    args = parser.parse_args()
    asyncio.run(main(3, 300) if args.quick else main(7, 1_000))
