"""What a usage record must be to count, for every reader that counts: the aggregator, the
verifier, replay and billing. One function, so they can never disagree on a record.

Beyond a valid value whose tenant is the record's key (``schemas.wire.decode_usage_record``):

- **Routing.** A record must sit on its key's partition under Kafka's default partitioner
  (murmur2 of the key bytes, made positive, modulo the partition count: the Java client's and
  aiokafka's default; librdkafka-based clients need ``partitioner=murmur2_random``). A tenant's
  totals, replay guard and dedup window live with one partition; a record elsewhere would be
  counted by an aggregator that holds none of them. It is dead-lettered as ``misrouted``, never
  counted, so the totals stay exact and the record can be re-published correctly. The partition
  count is fixed for the life of a deployment: adding partitions re-routes keys (the aggregator
  refuses a totals topic whose count differs).
- **Identity.** The value's ``event_id`` is the event's identity. A CloudEvents ``ce_id`` header,
  when present, must say the same (a header that differs, or is null, is ``id_mismatch``): the
  dedup window is rebuilt after a restart from these records, and a header that disagrees with the
  value must not plant an id that later drops someone else's event.
- **Period keys** starting ``rule:`` are the aggregator's own (a quota rule's counter,
  ``schemas.policy.counter_key``): an event carrying one is ``reserved_period_key``, so no client
  can add to a rule's counter but through the rule.
- **Dedup** is per tenant: (tenant, event id). Another tenant reusing an id changes nothing for
  the first. The same (tenant, id) with different content is an ``id_conflict``, dead-lettered
  and counted, not dropped as an ordinary duplicate; ``fingerprint`` is what "content" means.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from typing import Protocol

from schemas.errors import DecodeError
from schemas.policy import COUNTER_PREFIX
from schemas.usage import UsageEvent
from schemas.wire import decode_usage_record
from transport.partitioning import partition_for as expected_partition  # the producer's partitioner too

Identity = tuple[str, str]  # (tenant id, event id)


class UsageRecord(Protocol):
    """The parts of a consumed record the rules read (aiokafka's ``ConsumerRecord`` has them)."""

    @property
    def partition(self) -> int: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...
    @property
    def headers(self) -> Sequence[tuple[str, bytes | None]]: ...


def accept(record: UsageRecord, partitions: int,
           decode: Callable[[bytes | None, bytes | None], UsageEvent] = decode_usage_record) -> UsageEvent:
    """The event, or ``DecodeError`` with the dead-letter reason. ``decode``: the compiled decoder
    by default; the verifier passes the pydantic one (``wire.decode_usage_record_model``)."""
    event = decode(record.key, record.value)
    assert record.key is not None  # decode_usage_record refuses a key other than the tenant's
    home = expected_partition(record.key, partitions)
    if home != record.partition:
        raise DecodeError(
            "misrouted",
            f"record on partition {record.partition}; its key belongs on partition {home} of {partitions} (murmur2)",
        )
    if event.period_key.startswith(COUNTER_PREFIX):
        raise DecodeError("reserved_period_key", f"period keys starting {COUNTER_PREFIX!r} name rule counters")
    wanted = event.event_id.encode()
    for name, value in record.headers:
        if name == "ce_id" and value != wanted:
            shown = value[:80].decode(errors="replace") if value is not None else None
            raise DecodeError("id_mismatch", f"ce_id header {shown!r} is not the value's event_id")
    return event


def identity(event: UsageEvent) -> Identity:
    return (event.tenant_id, event.event_id)


_content = operator.attrgetter(
    "period_key", "total_tokens", "input_tokens", "output_tokens", "cache_creation_input_tokens",
    "cache_read_input_tokens", "reasoning_output_tokens", "model", "quota_tokens", "event_time", "instance_id",
    "streaming", "estimated",
)


def fingerprint(event: UsageEvent) -> int:
    """What a true duplicate must repeat. Valid within one process only (str hashes are salted),
    which is all it needs: windows are rebuilt from the records, not stored."""
    attributes = event.attributes
    return hash((_content(event), tuple(sorted(attributes.items())) if attributes else ()))
