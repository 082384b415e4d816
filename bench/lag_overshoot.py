"""Overshoot when the fleet publishes faster than its aggregator applies, with lag staleness off and
on, side by side in one run (issue 11, item 6).

One process, one event loop: a real aggregator (``AggregatorService``) with a small ``batch_max``,
so it applies fewer records a second than the fleet writes, and ``--instances`` KafkaQuotaStores
for one tenant. Each store calls ``check()`` then ``record()`` (a call of ``--cost`` tokens) every
``--interval-ms``, until it is refused for the quota or ``--deadline-s`` passes; a call refused
because the aggregator is behind is retried after the same pause, as a caller would. Fresh topics per variant.
Variants:

- ``lag off``: only silence counts (the behaviour before this change). The aggregator heartbeats
  on time, so every partition looks fresh while its totals fall behind.
- ``lag on, keep_known`` (``lag_policy="keep_known"``): the stale decision is the snapshot's own,
  so the overshoot should match ``lag off``; what changes is the warning and the counter.
- ``lag on, fail_closed`` (the default ``lag_policy``): a lagging partition refuses calls, so the
  overshoot is bounded by the lag settings.

The lag settings here (``--max-lag-events``, ``--max-lag-s``) are scaled to this small run; the
defaults (100,000 records, 60 s) would not fire in a few seconds of traffic.

    python bench/lag_overshoot.py                      # 4 instances, limit 100,000 tokens, ~10x
    python bench/lag_overshoot.py --interval-ms 12.5   # the fleet at ~2x what the aggregator applies
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from _common import broker, emit, fresh_layout, save_results

from aggregator.config import AggregatorConfig
from aggregator.service import AggregatorService
from producer import KafkaConnection, KafkaQuotaStore, ProducerConfig, ensure_topics
from producer.snapshot import STALE_REASON
from producer.store import CallUsage

TENANT = "bench-tenant"
PERIOD = "2026-04"


@dataclass
class Outcome:
    variant: str
    admitted: int = 0
    calls: int = 0
    stale_refusals: int = 0
    exceeded_refusals: int = 0
    lag_stale_decisions: int = 0
    seconds: float = 0.0
    unapplied_at_stop: int = 0


def usage(tokens: int, limit: int) -> CallUsage:
    return CallUsage(
        tenant_id=TENANT, period_key=PERIOD, model="bench", input_tokens=None, output_tokens=None,
        total_tokens=tokens, cache_creation_input_tokens=None, cache_read_input_tokens=None,
        reasoning_output_tokens=None, quota_tokens=limit, streaming=False, event_time=datetime.now(UTC),
    )


async def run_variant(name: str, bootstrap: str, args: argparse.Namespace, **lag: object) -> Outcome:
    connection = KafkaConnection(bootstrap_servers=bootstrap)
    layout = fresh_layout("lag", partitions=1)
    await ensure_topics(connection, layout)
    aggregator_config = AggregatorConfig(
        connection=connection, topics=layout, group_id=f"{layout.prefix}aggregator", aggregator_id="bench",
        heartbeat_interval_s=0.2, batch_max=args.batch_max, default_limit=args.limit,
    )
    outcome = Outcome(name)
    async with AggregatorService(aggregator_config) as aggregator:
        await asyncio.wait_for(aggregator.assigned.wait(), 60)
        stores = [
            KafkaQuotaStore(ProducerConfig(connection=connection, topics=layout, instance_id=f"bench{i}",
                                           spool_dir=None, create_topics=False, **lag))  # type: ignore[arg-type]
            for i in range(args.instances)
        ]
        for store in stores:
            await store.start()
        try:
            deadline = time.monotonic() + 30
            while any(s.snapshot.heard_offset(0) is None for s in stores):
                if time.monotonic() > deadline:
                    raise RuntimeError("no heartbeat from the aggregator")
                await asyncio.sleep(0.01)

            async def instance(store: KafkaQuotaStore) -> None:
                ends = time.monotonic() + args.deadline_s
                while time.monotonic() < ends:
                    decision = store.check(TENANT, PERIOD, args.limit)
                    if not decision.allowed:
                        if decision.reason != STALE_REASON:
                            outcome.exceeded_refusals += 1
                            return
                        outcome.stale_refusals += 1  # the aggregator is behind: retry, as a caller would
                        await asyncio.sleep(args.interval_ms / 1000)
                        continue
                    store.record(usage(args.cost, args.limit))
                    outcome.admitted += args.cost
                    outcome.calls += 1
                    await asyncio.sleep(args.interval_ms / 1000)

            began = time.monotonic()
            await asyncio.gather(*(instance(store) for store in stores))
            outcome.seconds = time.monotonic() - began
            # One partition, ours only: offsets 0..calls-1. The aggregator's last word on how far it got.
            heard = max(s.snapshot.heard_offset(0) or -1 for s in stores)
            outcome.unapplied_at_stop = outcome.calls - 1 - heard
            outcome.lag_stale_decisions = sum(s.stats.lag_stale_decisions for s in stores)
        finally:
            for store in stores:
                await store.stop()
    return outcome


async def main(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.ERROR)
    lag_on = {"max_lag_events": args.max_lag_events, "max_lag_s": args.max_lag_s}
    with broker() as bootstrap:
        outcomes = [
            await run_variant("lag off", bootstrap, args, max_lag_events=None, max_lag_s=None),
            await run_variant("lag on, keep_known", bootstrap, args, lag_policy="keep_known", **lag_on),
            await run_variant("lag on, fail_closed (default)", bootstrap, args, lag_policy="fail_closed", **lag_on),
        ]
    print(f"\n{args.instances} instances, one call of {args.cost} tokens each every {args.interval_ms} ms; "
          f"limit {args.limit:,}; aggregator batch_max {args.batch_max}; lag on = {args.max_lag_events} records "
          f"or {args.max_lag_s} s\n")
    print("| variant | tokens admitted | overshoot | of limit | calls | refused stale / exceeded | "
          "lag-stale decisions | records not applied at stop | seconds |")
    print("|---|---|---|---|---|---|---|---|---|")
    for o in outcomes:
        overshoot = max(0, o.admitted - args.limit)
        print(f"| {o.variant} | {o.admitted:,} | {overshoot:,} | {overshoot / args.limit:.1%} | {o.calls:,} | "
              f"{o.stale_refusals} / {o.exceeded_refusals} | {o.lag_stale_decisions:,} | {o.unapplied_at_stop:,} | "
              f"{o.seconds:.1f} |")
    figures: dict[str, object] = {o.variant: {"admitted": o.admitted, "overshoot": max(0, o.admitted - args.limit)}
                                  for o in outcomes}
    figures |= {"limit": args.limit, "instances": args.instances}
    save_results("lag_overshoot", figures)
    emit(figures)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instances", type=int, default=4)
    parser.add_argument("--limit", type=int, default=100_000)
    parser.add_argument("--cost", type=int, default=100, help="tokens per call")
    parser.add_argument("--interval-ms", type=float, default=2.0, help="pause between one instance's calls")
    parser.add_argument("--batch-max", type=int, default=2, help="the aggregator's batch_max (small: slow)")
    parser.add_argument("--max-lag-events", type=int, default=200)
    parser.add_argument("--max-lag-s", type=float, default=1.0)
    parser.add_argument("--deadline-s", type=float, default=20.0, help="an instance stops calling after this")
    asyncio.run(main(parser.parse_args()))
