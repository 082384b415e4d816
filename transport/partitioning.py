"""Which partition a record key belongs on: Kafka's default partitioner, in one place.

``murmur2(key)``, made positive, modulo the partition count: what the Java client and aiokafka do
by default (librdkafka-based clients need ``partitioner=murmur2_random`` to agree). The publisher
sends a tenant's usage there, the middleware's staleness check asks which aggregator judges a
tenant, and the aggregator refuses a usage record found anywhere else (``misrouted``); all three
use ``partition_for``, so they can never disagree.

Kafka numbers a topic's partitions 0..n-1, so the index is the partition.
"""

from __future__ import annotations

from schemas.wire import usage_key
from transport.murmur import partition_of

_cache: dict[tuple[bytes, int], int] = {}


def partition_for(key: bytes, partitions: int) -> int:
    """The partition Kafka's default partitioner gives ``key`` (cached: tenants repeat)."""
    cached = _cache.get((key, partitions))
    if cached is None:
        if len(_cache) > 200_000:
            _cache.clear()
        cached = _cache[(key, partitions)] = partition_of(key, partitions)
    return cached


class TenantPartitioner:
    """Tenant id -> usage partition for a usage topic of ``partitions`` partitions.

    Cached by the tenant id itself, so a call on the hot path neither encodes the key nor hashes
    bytes. Before the partition count is known (``partitions == 0``) a call raises
    ``ZeroDivisionError``, as Kafka's own partitioner does with no partitions.
    """

    __slots__ = ("_of", "partitions")

    def __init__(self, partitions: int = 0) -> None:
        self.partitions = partitions
        self._of: dict[str, int] = {}

    def partition(self, tenant_id: str) -> int:
        partition = self._of.get(tenant_id)
        if partition is None:
            if len(self._of) > 100_000:
                self._of.clear()
            partition = self._of[tenant_id] = partition_for(usage_key(tenant_id), self.partitions)
        return partition
