"""Restore time of the aggregator's state from the totals changelog, for 1,000,000 tenant-period keys.

Writes one changelog record per key (as the aggregator does, co-partitioned over 6 partitions),
then times what a newly assigned aggregator does before it processes anything: read every
assigned changelog partition to its end and load the latest record per key into memory.

    python bench/restore.py            # 1,000,000 keys
    python bench/restore.py --quick    # 100,000 keys
"""

from __future__ import annotations

import argparse
import asyncio
import time
from datetime import UTC, datetime

from _common import broker, emit, fresh_layout, median

from aggregator.changelog import read_changelog
from aggregator.state import Limits, TotalsState
from producer import KafkaConnection, ensure_topics
from schemas.totals import TotalsRecord
from schemas.wire import encode, tenant_period_key


async def write_changelog(connection: KafkaConnection, topic: str, keys: int, partitions: int) -> float:
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(**connection.client_kwargs(), acks="all", linger_ms=20, max_batch_size=1024 * 1024)
    await producer.start()
    started = time.perf_counter()
    now = datetime.now(UTC)
    try:
        pending = []
        for partition in range(partitions):
            batch = producer.create_batch()
            for index in range(partition, keys, partitions):
                tenant = f"tenant-{index:07d}"
                record = TotalsRecord.model_construct(
                    tenant_id=tenant, period_key="2026-11", used_tokens=index * 7, event_count=index % 100 + 1,
                    limit_tokens=1_000_000, state="ok", usage_partition=partition, applied_offset=index,
                    updated_at=now, event_quota_tokens=1_000_000,
                )
                key, value = tenant_period_key(tenant, "2026-11"), encode(record)
                if batch.append(key=key, value=value, timestamp=None) is None:
                    pending.append(await producer.send_batch(batch, topic, partition=partition))
                    batch = producer.create_batch()
                    batch.append(key=key, value=value, timestamp=None)
            pending.append(await producer.send_batch(batch, topic, partition=partition))
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    return time.perf_counter() - started


async def restore_once(connection: KafkaConnection, topic: str, partitions: int) -> tuple[float, int]:
    started = time.perf_counter()
    state = TotalsState(Limits())
    records = await read_changelog(connection, topic, range(partitions))
    for record in records.values():
        state.restore(record)
    return time.perf_counter() - started, len(state.totals)


async def main(keys: int, rounds: int) -> None:
    with broker() as bootstrap:
        connection = KafkaConnection(bootstrap_servers=bootstrap)
        layout = fresh_layout("restore")
        await ensure_topics(connection, layout)
        write_s = await write_changelog(connection, layout.totals, keys, layout.partitions)
        print(f"wrote {keys:,} changelog records in {write_s:.1f}s")
        times = []
        for round_ in range(rounds):
            seconds, restored = await restore_once(connection, layout.totals, layout.partitions)
            assert restored == keys, f"restored {restored} keys, wrote {keys}"
            times.append(seconds)
            print(f"round {round_ + 1}: restored {restored:,} keys in {seconds:.2f}s ({restored / seconds:,.0f} keys/s)")
        restore_s = median(times)
        print(f"\n| keys | rounds | median restore | keys/s |\n|---|---|---|---|\n| {keys:,} | {rounds} | {restore_s:.2f} s | {keys / restore_s:,.0f} |")
        emit({"keys": keys, "rounds": rounds, "restore_s": round(restore_s, 3), "keys_per_s": round(keys / restore_s)})


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="100,000 keys, 1 round")
    args = parser.parse_args()
    asyncio.run(main(100_000 if args.quick else 1_000_000, 1 if args.quick else 3))
