"""Recovery: bring back the state of newly assigned usage partitions before any of their records
is applied, and put the consumer where that state ends.

For each partition: the totals of its keys from the changelog (bounded by the usage partition's
end, so a forged record cannot freeze a key), the group's committed offset, the dedup window from
the usage records just before it; then the consumer is sought to the committed offset (the
partition's beginning when the group has none). Seeking here, every time, is what makes the
position independent of anything fetched before the restore: records fetched for a partition
before its state was back are dropped, never re-positioned piecemeal.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, TopicPartition

from aggregator.changelog import read_changelog, recent_events
from aggregator.config import AggregatorConfig
from aggregator.state import TotalsState
from transport.admin import committed_offsets


@dataclass
class Restored:
    keys: int = 0
    event_ids: int = 0
    seconds: float = 0.0
    positions: dict[TopicPartition, int] = field(default_factory=dict)
    rejected: Counter[str] = field(default_factory=Counter)


async def restore(
    config: AggregatorConfig, consumer: AIOKafkaConsumer, state: TotalsState, tps: set[TopicPartition], partitions: int
) -> Restored:
    """Load ``tps``' state into ``state`` and seek ``consumer`` to where it ends. The caller keeps
    the partitions paused until this returns, and must hold off applying their records until then."""
    started = time.monotonic()
    result = Restored()
    numbers = {tp.partition for tp in tps}
    usage_ends = {tp.partition: end for tp, end in (await consumer.end_offsets(list(tps))).items()}
    changelog = await read_changelog(
        config.connection, config.topics.totals, numbers,
        usage_ends=usage_ends, partition_count=partitions, rejected=result.rejected,
    )
    for record in changelog.values():
        state.restore(record)
    everything = await committed_offsets(config.connection, config.group_id, config.topics.usage)
    committed = {p: offset for p, offset in everything.items() if p in numbers and offset > 0}
    beginnings = await consumer.beginning_offsets(list(tps))
    for tp in tps:
        position = committed.get(tp.partition, beginnings[tp])
        state.mark_position(tp.partition, position - 1)
        consumer.seek(tp, position)
        result.positions[tp] = position
    recent = await recent_events(config.connection, config.topics.usage, committed, config.dedup_window, partitions)
    for partition, events in recent.items():
        state.remember(partition, events)
    result.keys = len(changelog)
    result.event_ids = sum(len(events) for events in recent.values())
    result.seconds = time.monotonic() - started
    return result
