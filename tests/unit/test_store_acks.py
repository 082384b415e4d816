"""What an acknowledgement of this process's own usage tells the store's parts: the notices feed
learns that the usage partition reaches past the acknowledged offset (``NoticesFeed.observe_end``),
so a notice covering that usage is known to be real without asking the broker."""

from __future__ import annotations

from pathlib import Path

from producer.config import ProducerConfig
from producer.kafka_store import KafkaQuotaStore


class Event:
    def __init__(self, tenant: str, tokens: int) -> None:
        self.tenant_id, self.period_key, self.total_tokens, self.event_id = tenant, "2026-11", tokens, f"{tenant}-event"


def test_an_acknowledged_offset_tells_the_notices_feed_where_the_partition_ends_at_least(tmp_path: Path) -> None:
    store = KafkaQuotaStore(ProducerConfig(spool_dir=tmp_path / "spool", create_topics=False))
    store.publisher.partitioner.partitions = 3
    partition = store.publisher.partition_of("a")
    store._delivered(Event("a", 5), partition, 41)  # type: ignore[arg-type]
    store._delivered(Event("a", 5), partition, 7)  # type: ignore[arg-type]  # an older batch: no step back
    assert store.feed._ends[partition] == 42
