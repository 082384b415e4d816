"""Restore time and peak memory of the aggregator's state from the totals changelog, against keys.

For each size (100,000, 300,000 and 1,000,000 tenant-period keys) writes one changelog record per
key on its tenant's partition (as the aggregator does, 6 partitions), then times what a newly
assigned aggregator does before it processes anything: read every changelog partition to its end,
checking each record as recovery does (its key, its tenant's partition, its offset against the
usage partitions' ends), and build the state (``aggregator.recovery.read_state``, then
``TotalsState.adopt``).

Each restore runs in a child process of its own, so the bench's memory does not count: the child
reports its RSS before restoring (interpreter and imports), its peak RSS (VmHWM) and the restore
time. Medians of 3 rounds (children) per size.

``--before PATH`` also restores, in the same run and alternating with ours, with the code of
another tree (e.g. ``git worktree add /tmp/r-base 3b54bf6``): its ``read_changelog`` and a
``TotalsState.restore`` per record, the same checks, the same topics, the same child harness.

    python bench/restore.py                      # 100k, 300k and 1M keys, 3 rounds each
    python bench/restore.py --quick              # 100k keys, 3 rounds
    python bench/restore.py --before /tmp/r-base # and the other tree's restore, side by side
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from statistics import median
from typing import Any

# The project's modules are imported inside the functions: a restore child imports them from the
# tree it measures (this one, or --before's), and nothing else before its baseline is taken.
PARTITIONS = 6
SIZES = (100_000, 300_000, 1_000_000)
SCRIPT = Path(__file__).resolve()


def tenant(index: int) -> str:
    return f"tenant-{index:07d}"


async def write_changelog(connection: Any, topic: str, keys: int, partitions: int) -> float:
    """One record per key on its tenant's partition; applied offsets count up per partition."""
    from aiokafka import AIOKafkaProducer

    from schemas.totals import TotalsRecord
    from schemas.wire import encode, tenant_period_key
    from transport.partitioning import partition_for

    producer = AIOKafkaProducer(**connection.client_kwargs(), acks="all", linger_ms=20, max_batch_size=1024 * 1024)
    await producer.start()
    started = time.perf_counter()
    now = datetime.now(UTC)
    homes: list[list[int]] = [[] for _ in range(partitions)]
    for index in range(keys):
        homes[partition_for(tenant(index).encode(), partitions)].append(index)
    try:
        pending = []
        for partition, indexes in enumerate(homes):
            batch = producer.create_batch()
            for offset, index in enumerate(indexes):
                record = TotalsRecord.model_construct(
                    tenant_id=tenant(index), period_key="2026-11", used_tokens=index * 7, event_count=index % 100 + 1,
                    limit_tokens=1_000_000, state="ok", usage_partition=partition, applied_offset=offset,
                    updated_at=now, event_quota_tokens=1_000_000, first_offset=offset // 2,
                )
                key, value = tenant_period_key(tenant(index), "2026-11"), encode(record)
                if batch.append(key=key, value=value, timestamp=None) is None:
                    pending.append(await producer.send_batch(batch, topic, partition=partition))
                    batch = producer.create_batch()
                    batch.append(key=key, value=value, timestamp=None)
            pending.append(await producer.send_batch(batch, topic, partition=partition))
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    return time.perf_counter() - started


def memory_mb() -> dict[str, float]:
    """This process's resident memory now (VmRSS) and at its peak so far (VmHWM), in MB."""
    figures = {}
    with open("/proc/self/status") as status:
        for line in status:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                figures[name] = int(value.split()[0]) / 1024
    return figures


async def child(bootstrap: str, topic: str, keys: int, variant: str) -> None:
    """One restore, in this (child) process; prints one JSON line."""
    from collections import Counter

    from aggregator.changelog import read_changelog
    from aggregator.state import Limits, TotalsState
    from schemas.topics import DEFAULT_SEAL_GRACE_S
    from transport.connection import KafkaConnection

    if variant == "streamed":
        from aggregator.recovery import read_state

    baseline = memory_mb()["VmRSS"]
    connection = KafkaConnection(bootstrap_servers=bootstrap)
    ends = {p: keys for p in range(PARTITIONS)}  # past every applied offset written
    rejected: Counter[str] = Counter()
    started = time.perf_counter()
    # As ``tokenguard aggregator`` builds it by default: periods seal, so the sealer holds every key too.
    state = TotalsState(Limits(), seal_grace_s=float(DEFAULT_SEAL_GRACE_S))
    if variant == "streamed":
        state.adopt(await read_state(connection, topic, set(range(PARTITIONS)), usage_ends=ends,
                                     partition_count=PARTITIONS, rejected=rejected))
    else:  # what recovery did before: a model per key, then one restore call each
        records = await read_changelog(connection, topic, range(PARTITIONS), usage_ends=ends,
                                       partition_count=PARTITIONS, rejected=rejected)
        for record in records.values():
            state.restore(record)
        del records
    seconds = time.perf_counter() - started
    print(json.dumps({"keys": len(state.totals), "restore_s": seconds, "baseline_rss_mb": baseline,
                      "peak_rss_mb": memory_mb()["VmHWM"], "rejected": sum(rejected.values())}), flush=True)


async def restore_in_child(bootstrap: str, topic: str, keys: int, variant: str, tree: Path) -> dict[str, float]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(SCRIPT), "--child", bootstrap, topic, str(keys), variant, str(tree),
        cwd=tree, stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"restore child ({variant}, {tree}) exited {process.returncode}")
    figures: dict[str, float] = json.loads(out.decode().strip().splitlines()[-1])
    if figures["keys"] != keys or figures["rejected"]:
        raise RuntimeError(f"restored {figures['keys']} keys ({figures['rejected']} rejected), wrote {keys}")
    return figures


def summary(keys: int, rounds: list[dict[str, float]]) -> dict[str, float]:
    restore_s = median([r["restore_s"] for r in rounds])
    return {"keys": keys, "restore_s": round(restore_s, 3), "keys_per_s": round(keys / restore_s),
            "peak_rss_mb": round(median([r["peak_rss_mb"] for r in rounds]), 1),
            "baseline_rss_mb": round(median([r["baseline_rss_mb"] for r in rounds]), 1)}


async def main(sizes: tuple[int, ...], rounds: int, before: Path | None) -> None:
    from _common import REPO, broker, emit, fresh_layout, result_path, save_results

    from producer import KafkaConnection, ensure_topics

    variants = [("streamed", REPO)] + ([("models", before)] if before is not None else [])
    rows: dict[str, list[dict[str, float]]] = {name: [] for name, _ in variants}
    with broker() as bootstrap:
        connection = KafkaConnection(bootstrap_servers=bootstrap)
        for keys in sizes:
            layout = fresh_layout("restore", PARTITIONS)
            await ensure_topics(connection, layout)
            write_s = await write_changelog(connection, layout.totals, keys, layout.partitions)
            print(f"wrote {keys:,} changelog records in {write_s:.1f}s")
            measured: dict[str, list[dict[str, float]]] = {name: [] for name, _ in variants}
            for round_ in range(rounds):
                for name, tree in variants:
                    one = await restore_in_child(bootstrap, layout.totals, keys, name, tree)
                    measured[name].append(one)
                    print(f"{keys:>9,} keys, round {round_ + 1}, {name:8}: {one['restore_s']:.2f} s, "
                          f"peak RSS {one['peak_rss_mb']:.0f} MB (before restoring {one['baseline_rss_mb']:.0f} MB)")
            for name, _ in variants:
                rows[name].append(summary(keys, measured[name]))
    print("\n| code | keys | median restore | keys/s | peak RSS | RSS before restoring |\n|---|---|---|---|---|---|")
    for name, tree in variants:
        for row in rows[name]:
            print(f"| {name} ({tree}) | {row['keys']:,} | {row['restore_s']:.2f} s | {row['keys_per_s']:,} | "
                  f"{row['peak_rss_mb']:.0f} MB | {row['baseline_rss_mb']:.0f} MB |")
    largest = rows["streamed"][-1]
    figures: dict[str, object] = {**largest, "rounds": rounds, "sizes": rows["streamed"]}
    if before is not None:
        figures["before"] = {"code": str(before), "sizes": rows["models"]}
    name = "restore" if sizes == SIZES else "restore_quick"
    save_results(name, figures)
    try:
        from plots import plot_restore

        plot_restore(rows["streamed"], result_path(name, ".png"))
    except ImportError:
        print("no plot: matplotlib is the bench extra (pip install -c constraints.txt -e '.[bench]')")
    emit(figures)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        bootstrap, topic, keys, variant, tree = sys.argv[2:7]
        sys.path.insert(0, tree)  # the tree whose code restores (this one, or --before's)
        asyncio.run(child(bootstrap, topic, int(keys), variant))
        sys.exit(0)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="100,000 keys only")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--before", type=Path, help="another tree whose restore to measure side by side")
    args = parser.parse_args()
    asyncio.run(main(SIZES[:1] if args.quick else SIZES, args.rounds, args.before))
