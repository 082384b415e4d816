"""The streamed restore on the real broker: a changelog with several records per key, ties,
tombstones and hostile records, restored by ``aggregator.recovery.read_state`` (what the
aggregator's recovery calls), gives exactly the state and the rejections the old restore gives
from the same records, and ``read_changelog`` still gives its models."""

from __future__ import annotations

from collections import Counter

from aggregator.changelog import read_changelog
from aggregator.recovery import read_state
from aggregator.state import Limits, TotalsState
from schemas.topics import TopicLayout
from tests.helpers import RawRecord, send_records
from tests.restore_corpus import PARTITIONS, USAGE_ENDS, Read, corpus, old_restore, snapshot
from transport.admin import ensure_topics
from transport.connection import KafkaConnection
from transport.reading import read_ranges


async def test_streamed_restore_from_the_broker_is_the_old_restore(connection: KafkaConnection,
                                                                   layout: TopicLayout) -> None:
    assert layout.partitions == PARTITIONS
    await ensure_topics(connection, layout)
    await send_records(connection, layout.totals, [RawRecord(r.key, r.value, partition=r.partition) for r in corpus()])
    stored = [Read(r.partition, r.offset, r.key, r.value)
              async for batch in read_ranges(connection, layout.totals, {p: (None, None) for p in range(PARTITIONS)})
              for r in batch]
    assert len(stored) == len(corpus())

    old, old_rejected = old_restore(stored, usage_ends=USAGE_ENDS, partition_count=PARTITIONS, seal_grace_s=3600.0)
    rejected: Counter[str] = Counter()
    restored = await read_state(connection, layout.totals, set(range(PARTITIONS)), usage_ends=USAGE_ENDS,
                                partition_count=PARTITIONS, rejected=rejected)
    new = TotalsState(Limits(), seal_grace_s=3600.0)
    new.adopt(restored)
    assert snapshot(new) == snapshot(old)
    assert rejected == old_rejected == Counter({
        "invalid_json": 1, "empty_value": 1, "invalid_schema": 2, "oversized": 1,
        "key_mismatch": 2, "wrong_partition": 2, "offset_beyond_end": 2,
    })

    models_rejected: Counter[str] = Counter()
    models = await read_changelog(connection, layout.totals, usage_ends=USAGE_ENDS, partition_count=PARTITIONS,
                                  rejected=models_rejected)
    assert models_rejected == old_rejected
    assert all(type(m).__name__ == "TotalsRecord" for m in models.values())
    assert {k: (m.used_tokens, m.applied_offset, m.state, m.limit_tokens) for k, m in models.items()} == {
        k: (t.used, t.applied_offset, t.state, t.limit) for k, t in old.totals.items()}
