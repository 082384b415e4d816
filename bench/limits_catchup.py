"""Start-up catch-up and memory of a middleware instance with 100,000 tenant limits on the topic.

Issue 11's goal for an instance that follows the limits topic: <= 50 MB and <= 5 s with 100,000
tenant rules. Writes one limits record per tenant (plus the default record) to a fresh limits
topic, and an empty deployment beside it; then, per round, a child process imports everything,
builds a ``KafkaQuotaStore`` and times ``start()`` (topic check, publisher, notices feed and
limits feed read to their ends), measuring the resident set before and after (``VmRSS``; after a
``gc.collect()``). A second kind of child runs the same under ``tracemalloc``: Python memory
still held after start (the table, plus whatever the clients keep) and its peak during start.
Both are run against the empty deployment too, so the difference is what the limits cost.

    python bench/limits_catchup.py                 # 100,000 tenants, 5 rounds
    python bench/limits_catchup.py --tenants 10000 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from _common import REPO, broker, emit, fresh_layout, median, save_results

from producer import KafkaConnection, ensure_topics
from schemas.limits import QuotaLimit
from schemas.topics import TopicLayout
from schemas.wire import encode, limit_key

PERIODS = ("any", "month", "day")
SCRIPT = str(Path(__file__).resolve())


async def write_limits(connection: KafkaConnection, topic: str, tenants: int) -> float:
    """One record per tenant (limits and period kinds varied, every fifth with a warning ratio)
    and the default record, as ``tokenguard limits set`` writes them."""
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(**connection.client_kwargs(), acks="all", linger_ms=20, max_batch_size=1024 * 1024)
    await producer.start()
    started = time.perf_counter()
    now = datetime.now(UTC)
    try:
        pending = []
        batch = producer.create_batch()
        records = [QuotaLimit(tenant_id=None, limit_tokens=50_000, updated_at=now)]
        records += (
            QuotaLimit(tenant_id=f"tenant-{i:07d}", limit_tokens=10_000 + 37 * i, period=PERIODS[i % 3],  # type: ignore[arg-type]
                       warning_ratio=0.9 if i % 5 == 0 else None, updated_at=now)
            for i in range(tenants)
        )
        for limit in records:
            key, value = limit_key(limit.tenant_id), encode(limit)
            if batch.append(key=key, value=value, timestamp=None) is None:
                pending.append(await producer.send_batch(batch, topic, partition=0))
                batch = producer.create_batch()
                batch.append(key=key, value=value, timestamp=None)
        pending.append(await producer.send_batch(batch, topic, partition=0))
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    return time.perf_counter() - started


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


async def child(args: argparse.Namespace) -> None:
    """One instance's start, measured; prints one JSON line."""
    import tracemalloc

    from producer import KafkaQuotaStore, ProducerConfig

    config = ProducerConfig(
        connection=KafkaConnection(bootstrap_servers=args.bootstrap_servers),
        topics=TopicLayout(prefix=args.topic_prefix, partitions=args.partitions),
        instance_id="bench-limits", create_topics=True, spool_dir=None, catch_up_timeout_s=120,
    )
    store = KafkaQuotaStore(config)
    gc.collect()
    if args.traced:
        tracemalloc.start()
    before = rss_bytes()
    started = time.perf_counter()
    await store.start()
    start_s = time.perf_counter() - started
    gc.collect()
    after = rss_bytes()
    figures: dict[str, object] = {"start_s": start_s, "rss_delta_mb": (after - before) / 1e6, "tenants": len(store.limits.table.per_tenant)}
    if args.traced:
        held, peak = tracemalloc.get_traced_memory()
        figures |= {"traced_held_mb": held / 1e6, "traced_peak_mb": peak / 1e6}
        tracemalloc.stop()
    # What a call's decision costs with the table this size (no notice: the table decides).
    snapshot, tenants = store.snapshot, len(store.limits.table.per_tenant)
    keys = [f"tenant-{i:07d}" for i in range(0, max(tenants, 1), max(tenants // 1000, 1))]
    rounds = 200
    started = time.perf_counter()
    for _ in range(rounds):
        for tenant in keys:
            snapshot.decide(tenant, "2026-11", 1_000)
    figures["decide_us"] = (time.perf_counter() - started) / (rounds * len(keys)) * 1e6
    await store.stop()
    print(json.dumps(figures), flush=True)


async def run_child(bootstrap: str, layout: TopicLayout, *, traced: bool) -> dict[str, float]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, SCRIPT, "--child", "--bootstrap-servers", bootstrap,
        "--topic-prefix", layout.prefix, "--partitions", str(layout.partitions), *(["--traced"] if traced else []),
        cwd=REPO, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await process.communicate()
    if await process.wait() != 0:
        raise RuntimeError(f"the measuring child failed: {out.decode()[-500:]}")
    return dict(json.loads(out.decode().strip().splitlines()[-1]))


async def main(tenants: int, rounds: int) -> None:
    with broker() as bootstrap:
        connection = KafkaConnection(bootstrap_servers=bootstrap)
        full, empty = fresh_layout("limits"), fresh_layout("nolimits")
        await ensure_topics(connection, full)
        await ensure_topics(connection, empty)
        write_s = await write_limits(connection, full.limits, tenants)
        print(f"wrote {tenants + 1:,} limits records in {write_s:.1f}s")
        results: dict[tuple[str, bool], list[dict[str, float]]] = {}
        for round_ in range(rounds):
            for name, layout in (("limits", full), ("empty", empty)):
                for traced in (False, True):
                    figures = await run_child(bootstrap, layout, traced=traced)
                    if name == "limits":
                        assert figures["tenants"] == tenants, figures
                    results.setdefault((name, traced), []).append(figures)
                    print(f"round {round_ + 1} {name:6} {'traced' if traced else 'plain ':6} {figures}")

        def med(name: str, traced: bool, field: str) -> float:
            return round(median([r[field] for r in results[(name, traced)]]), 3)

        summary = {
            "tenants": tenants,
            "rounds": rounds,
            "start_s": med("limits", False, "start_s"),
            "start_s_empty": med("empty", False, "start_s"),
            "rss_delta_mb": med("limits", False, "rss_delta_mb"),
            "rss_delta_mb_empty": med("empty", False, "rss_delta_mb"),
            "traced_held_mb": med("limits", True, "traced_held_mb"),
            "traced_held_mb_empty": med("empty", True, "traced_held_mb"),
            "traced_peak_mb": med("limits", True, "traced_peak_mb"),
            "decide_us": med("limits", False, "decide_us"),
            "decide_us_empty": med("empty", False, "decide_us"),
        }
        print(
            "\n| tenants | rounds | start (median) | start, empty topic | RSS delta | RSS delta, empty | "
            "Python memory held (tracemalloc) | held, empty | peak during start | decide() |\n"
            "|---|---|---|---|---|---|---|---|---|---|\n"
            f"| {tenants:,} | {rounds} | {summary['start_s']:.2f} s | {summary['start_s_empty']:.2f} s | "
            f"{summary['rss_delta_mb']:.1f} MB | {summary['rss_delta_mb_empty']:.1f} MB | "
            f"{summary['traced_held_mb']:.1f} MB | {summary['traced_held_mb_empty']:.1f} MB | "
            f"{summary['traced_peak_mb']:.1f} MB | {summary['decide_us']:.2f} us |"
        )
        save_results("limits_catchup", summary)
        emit(summary)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tenants", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--traced", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--bootstrap-servers", help=argparse.SUPPRESS)
    parser.add_argument("--topic-prefix", help=argparse.SUPPRESS)
    parser.add_argument("--partitions", type=int, default=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        asyncio.run(child(args))
    else:
        asyncio.run(main(args.tenants, args.rounds))
