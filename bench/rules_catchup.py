"""Start-up catch-up and memory of a middleware instance with 100,000 tenant quota rules on the topic.

Issue 11's goal for an instance that follows the limits topic: <= 50 MB and <= 5 s with 100,000
tenant rules. The structure of ``bench/limits_catchup.py``, for rules: writes one rule record per
tenant (``["rule", <tenant>, "daily"]``: a daily total-token limit, limits varied, every fifth with
a 0.8 threshold, as ``tokenguard limits --rule`` writes them) to a fresh limits topic, and an empty
deployment beside it; then, per round, a child process imports everything, builds a
``KafkaQuotaStore`` and times ``start()`` (topic check, publisher, notices feed and limits feed
read to their ends), measuring the resident set before and after (``VmRSS``; after a
``gc.collect()``), so this process's own memory does not count. A second kind of child runs the
same under ``tracemalloc``: Python memory still held after start and its peak during start, and
the top allocation sites (``lineno``) of what is held, to say where the memory goes. Both run
against the empty deployment too: the difference is what the rules cost.

    KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:19092 python bench/rules_catchup.py                 # 100,000 tenants, 3 rounds
    KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:19092 python bench/rules_catchup.py --tenants 10000 --rounds 1
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from _common import REPO, broker, emit, fresh_layout, median

from producer import KafkaConnection, ensure_topics
from schemas.policy import QuotaRule, rule_key
from schemas.topics import TopicLayout
from schemas.wire import encode


def head() -> str:
    """The commit measured (the working tree may differ: say so when it does)."""
    import subprocess

    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()


SCRIPT = str(Path(__file__).resolve())
RESULTS = REPO / "bench" / "results" / "rules_catchup.json"
TOP = 12


def tenant(i: int) -> str:
    return f"tenant-{i:07d}"


async def write_rules(connection: KafkaConnection, topic: str, tenants: int) -> float:
    """One rule record per tenant, all to partition 0 (the limits topic is read whole anyway)."""
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(**connection.client_kwargs(), acks="all", linger_ms=20, max_batch_size=1024 * 1024)
    await producer.start()
    started = time.perf_counter()
    now = datetime.now(UTC)
    effective = now - timedelta(days=1)
    try:
        pending = []
        batch = producer.create_batch()
        for i in range(tenants):
            rule = QuotaRule(name="daily", tenant_id=tenant(i), window="day", limit=10_000 + 37 * i,
                             thresholds=(0.8,) if i % 5 == 0 else (), effective_from=effective, updated_at=now)
            key, value = rule_key(rule.tenant_id, rule.name), encode(rule)
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
    from producer.rule_gate import Reserve

    config = ProducerConfig(
        connection=KafkaConnection(bootstrap_servers=args.bootstrap_servers),
        topics=TopicLayout(prefix=args.topic_prefix, partitions=args.partitions),
        instance_id="bench-rules", create_topics=True, spool_dir=None, catch_up_timeout_s=120,
    )
    store = KafkaQuotaStore(config)
    gc.collect()
    if args.traced:
        tracemalloc.start(1)
    before = rss_bytes()
    started = time.perf_counter()
    await store.start()
    start_s = time.perf_counter() - started
    gc.collect()
    after = rss_bytes()
    book = store.limits.rules
    figures: dict[str, object] = {"start_s": start_s, "rss_delta_mb": (after - before) / 1e6, "rules": len(book)}
    if args.traced:
        held, peak = tracemalloc.get_traced_memory()
        top = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(False, tracemalloc.__file__)])
        figures |= {
            "traced_held_mb": held / 1e6, "traced_peak_mb": peak / 1e6,
            "top": [[str(stat.traceback[0]), stat.size, stat.count] for stat in top.statistics("lineno")[:TOP]],
        }
        tracemalloc.stop()
    # What a call's rule check costs with the book this size (admit, then release).
    tenants = len(book.per_tenant)
    keys = [tenant(i) for i in range(0, max(tenants, 1), max(tenants // 1000, 1))]
    reserve, now, rounds = Reserve("m", 40, 1024, 1064), datetime.now(UTC), 50
    started = time.perf_counter()
    for _ in range(rounds):
        for key in keys:
            store.release_rules(store.admit_rules(key, reserve, now).holds)
    figures["admit_us"] = (time.perf_counter() - started) / (rounds * len(keys)) * 1e6
    await store.stop()
    print(json.dumps(figures), flush=True)


async def run_child(bootstrap: str, layout: TopicLayout, *, traced: bool) -> dict:
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
        full, empty = fresh_layout("rules"), fresh_layout("norules")
        await ensure_topics(connection, full)
        await ensure_topics(connection, empty)
        write_s = await write_rules(connection, full.limits, tenants)
        print(f"wrote {tenants:,} rule records in {write_s:.1f}s", flush=True)
        results: dict[tuple[str, bool], list[dict]] = {}
        for round_ in range(rounds):
            pairs = (("rules", full), ("empty", empty)) if round_ % 2 == 0 else (("empty", empty), ("rules", full))
            for name, layout in pairs:
                for traced in (False, True):
                    figures = await run_child(bootstrap, layout, traced=traced)
                    if name == "rules":
                        assert figures["rules"] == tenants, figures
                    results.setdefault((name, traced), []).append(figures)
                    shown = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in figures.items() if k != "top"}
                    print(f"round {round_ + 1} {name:5} {'traced' if traced else 'plain ':6} {shown}", flush=True)

    def med(name: str, traced: bool, field: str) -> float:
        return round(median([r[field] for r in results[(name, traced)]]), 3)

    summary: dict[str, object] = {
        "bench": "rules_catchup", "commit": head(), "tenants": tenants, "rules_per_tenant": 1, "rounds": rounds,
        "start_s": med("rules", False, "start_s"),
        "start_s_empty": med("empty", False, "start_s"),
        "rss_delta_mb": med("rules", False, "rss_delta_mb"),
        "rss_delta_mb_empty": med("empty", False, "rss_delta_mb"),
        "traced_held_mb": med("rules", True, "traced_held_mb"),
        "traced_held_mb_empty": med("empty", True, "traced_held_mb"),
        "traced_peak_mb": med("rules", True, "traced_peak_mb"),
        "traced_peak_mb_empty": med("empty", True, "traced_peak_mb"),
        "admit_us": med("rules", False, "admit_us"),
    }
    rules_mb = float(summary["rss_delta_mb"]) - float(summary["rss_delta_mb_empty"])  # type: ignore[arg-type]
    held_mb = float(summary["traced_held_mb"]) - float(summary["traced_held_mb_empty"])  # type: ignore[arg-type]
    summary |= {
        "rss_of_rules_mb": round(rules_mb, 3), "held_of_rules_mb": round(held_mb, 3),
        "held_bytes_per_rule": round(held_mb * 1e6 / tenants), "rss_bytes_per_rule": round(rules_mb * 1e6 / tenants),
        "goal_mb": 50, "goal_s": 5,
        "top_held_last_round": results[("rules", True)][-1]["top"],
    }
    print(
        "\n| tenant rules | rounds | start (median) | start, empty topic | RSS delta | RSS delta, empty | "
        "Python memory held (tracemalloc) | held, empty | peak during start | admit+release |\n"
        "|---|---|---|---|---|---|---|---|---|---|\n"
        f"| {tenants:,} | {rounds} | {summary['start_s']:.2f} s | {summary['start_s_empty']:.2f} s | "
        f"{summary['rss_delta_mb']:.1f} MB | {summary['rss_delta_mb_empty']:.1f} MB | "
        f"{summary['traced_held_mb']:.1f} MB | {summary['traced_held_mb_empty']:.1f} MB | "
        f"{summary['traced_peak_mb']:.1f} MB | {summary['admit_us']:.2f} us |"
    )
    print(f"\nthe rules' own: RSS {rules_mb:.1f} MB ({summary['rss_bytes_per_rule']} B/rule), Python held "
          f"{held_mb:.1f} MB ({summary['held_bytes_per_rule']} B/rule); goal <= 50 MB, <= 5 s")
    print("\ntop allocation sites still held after start (last traced round, rules topic):")
    for site, size, count in summary["top_held_last_round"]:  # type: ignore[union-attr]
        print(f"  {size / 1e6:7.2f} MB  {count:>8,} blocks  {size / tenants:6.1f} B/rule  {site}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(summary, indent=2) + "\n")
    emit(summary)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tenants", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
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
