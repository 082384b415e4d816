"""On the real broker: staleness that sees lag (issue 11, item 6). An aggregator that is alive (its
heartbeats arrive on time) but behind this process's own acknowledged usage makes the partition
stale, and it is fresh again once the aggregator has caught up.

How a real aggregator is made to fall behind: it runs with ``batch_max=1``, an ``AggregatorConfig``
setting that exists for batching. Each batch then applies one record and goes through the whole
commit order (changelog and notices produced and acknowledged, offsets committed) before the next,
so it applies a few hundred records a second, while the middleware's publisher writes a thousand in
a fraction of a second. Its heartbeats still go out between batches (every 0.2 s here), carrying
the offset it has really applied. That is the case the issue names, a fleet outrunning its
aggregator, with nothing of the aggregator faked. (Stopping it, SIGSTOP or a dead consumer, would
also stop its heartbeats: that is silence, already covered by test_stale_keep_known.)

One more case writes a heartbeat to the real notices topic as a stand-in for an aggregator that
reports an old offset, to show the feed and the store read a genuine record's offset the same way.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from aggregator import AggregatorConfig
from producer import KafkaQuotaStore, ProducerConfig
from producer.snapshot import STALE_REASON
from schemas.notices import Heartbeat
from schemas.wire import encode, heartbeat_key
from tests.helpers import RawRecord, call_usage, eventually, running_aggregator, send_records

pytestmark = pytest.mark.integration

PERIOD = "2026-04"
EVENTS = 250


def member(base: ProducerConfig, tmp_path: Path, name: str, **changes: Any) -> ProducerConfig:
    return replace(base, instance_id=name, spool_dir=tmp_path / name, **changes)


@pytest.mark.slow  # ~8 s: a real aggregator drains a backlog of 500 records one batch at a time
@pytest.mark.timeout(120)
async def test_an_aggregator_alive_but_behind_makes_the_partition_stale_until_it_catches_up(
    producer_config: ProducerConfig, aggregator_config: AggregatorConfig, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    slow = replace(aggregator_config, batch_max=1)
    # Silence needs 15 s (the default): anything stale below is stale for lag, not silence.
    by_events = member(producer_config, tmp_path, "by-events", max_lag_events=100, max_lag_s=None,
                       lag_policy="fail_closed")
    by_time = member(producer_config, tmp_path, "by-time", max_lag_events=None, max_lag_s=1.0,
                     lag_policy="keep_known")
    tenant = "fleet"
    async with running_aggregator(slow) as aggregator, KafkaQuotaStore(by_events) as counting, \
            KafkaQuotaStore(by_time) as timing:
        partition = counting.publisher.partition_of(tenant)
        for store in (counting, timing):
            await eventually(lambda s=store: s.snapshot.heard_offset(partition) is not None, 30, "first heartbeat")
            assert not store.is_stale(tenant) and store.check(tenant, PERIOD, 10**9).allowed

        with caplog.at_level(logging.WARNING, logger="producer.kafka_store"):
            for _ in range(EVENTS):  # the fleet outruns its aggregator
                counting.record(call_usage(tenant, 1, period=PERIOD, quota=10**9))
                timing.record(call_usage(tenant, 1, period=PERIOD, quota=10**9))

            await eventually(lambda: counting.is_stale(tenant), 20, "stale for lag (events)")
            refused = counting.check(tenant, PERIOD, 10**9)
            assert not refused.allowed and refused.reason == STALE_REASON, "fail_closed, as for silence"
            # Alive, not silent: its heartbeats are fresh, and by its own measure it is far behind.
            age = counting.snapshot.heartbeat_age(partition)
            assert age is not None and age < 2.0
            assert aggregator.lag().get(partition, 0) > 100

            await eventually(lambda: timing.is_stale(tenant), 20, "stale for lag (time)")
            assert timing.check(tenant, PERIOD, 10**9).allowed, "keep_known: the snapshot's decision"
            assert timing.stats.lag_stale_decisions == 1

            # It catches up: within the bounds first (fresh again while still a little behind), then
            # all the way.
            for store in (counting, timing):
                await eventually(lambda s=store: not s.is_stale(tenant), 90, "within the lag bounds again")
                assert store.check(tenant, PERIOD, 10**9).allowed
            last = 2 * EVENTS - 1  # offsets 0.. of this fresh topic, ours only
            await eventually(lambda: timing.snapshot.heard_offset(partition) == last, 90, "caught up")
            assert aggregator.state.partition_offsets[partition] == last
            # The offset a heartbeat reports is the last record applied, not the next one: our last
            # event is covered by it, so nothing is left to age past max_lag_s.
            await asyncio.sleep(2 * by_time.max_lag_s)  # type: ignore[operator]
            assert timing._acked.pending(partition) == 0 and not timing.is_stale(tenant)
            assert timing.check(tenant, PERIOD, 10**9).allowed

        assert counting.stats.lag_stale_decisions == counting.stats.stale_decisions == 1
        assert counting.stats.stale_refusals == 1
        lines = [r.getMessage() for r in caplog.records if r.name == "producer.kafka_store"]
        assert sum("alive but" in line for line in lines) == 2, lines  # once per store
        assert sum("caught up" in line for line in lines) == 2, lines
        assert not any("silent" in line or "never heard" in line for line in lines), lines


@pytest.mark.timeout(60)
async def test_a_heartbeat_reporting_an_old_offset_on_the_real_topic(producer_config: ProducerConfig, tmp_path: Path) -> None:
    """A stand-in for an aggregator stuck behind: a heartbeat record on the real notices topic, as
    the aggregator writes it (key and encoding), at the offset just below our last event."""
    config = member(producer_config, tmp_path, "alone", max_lag_events=1, max_lag_s=None, lag_policy="fail_closed")
    tenant = "stuck"
    async with KafkaQuotaStore(config) as store:
        partition = store.publisher.partition_of(tenant)
        for _ in range(3):
            store.record(call_usage(tenant, 1, period=PERIOD, quota=10**9))
        await eventually(lambda: store.snapshot.used(tenant, PERIOD) == 3 and store._acked.pending(partition) == 3,
                         20, "acknowledged")

        async def heartbeat(offset: int) -> None:
            record = Heartbeat(usage_partition=partition, usage_offset=offset, aggregator_id="stand-in",
                               emitted_at=datetime.now(UTC))
            await send_records(producer_config.connection, producer_config.topics.notices,
                               [RawRecord(heartbeat_key(partition), encode(record))])
            await eventually(lambda: store.snapshot.heard_offset(partition) == offset, 20, f"heartbeat at {offset}")

        await heartbeat(0)  # events at 0, 1, 2: two records behind, more than max_lag_events=1
        assert store.is_stale(tenant) and store.check(tenant, PERIOD, 10**9).reason == STALE_REASON
        await heartbeat(1)  # one behind: not more than 1
        assert not store.is_stale(tenant) and store.check(tenant, PERIOD, 10**9).allowed
        await heartbeat(2)  # all three applied
        assert not store.is_stale(tenant) and store._acked.pending(partition) == 0, "covered, so forgotten"
