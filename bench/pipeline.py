"""Events per second through the pipeline: the publisher, the consumer's own ceiling, one
aggregator process, two.

1. publish: one process queues N usage events with ``UsagePublisher.publish`` (the middleware's
   hot path) and waits until the broker has acknowledged all of them.
2. ceiling: a group-less consumer, in a fresh process of its own as the aggregator is, with the aggregator's client settings (same fetch sizes, same
   ``getmany`` batch bound) reads the N records; ``getmany`` alone, then decoding each record as
   the aggregator does (``schemas.wire.decode_usage_record``). What this machine and client can
   deliver: the aggregator's figure is reported as a ratio to the second. When confluent-kafka
   (librdkafka) is installed, its ``consume(10000)`` is measured the same way beside it, so the
   choice of client is made with numbers.
3. aggregate: ``python -m aggregator`` processes (1, then 2, each time a new consumer group over
   the same topic) consume the N events: validate, aggregate, changelog, commit. Timed from the
   group's first commit to the moment its lag reaches 0, so process start-up is not counted.
   The processes' CPU time over that span (``/proc/<pid>/stat``) gives CPU microseconds per event:
   two processes on two cores shared with the broker cannot show scale-out in events/s, but CPU
   per event says whether a second member costs anything beyond the work it takes over.

    python bench/pipeline.py            # 400,000 events, 3 rounds
    python bench/pipeline.py --quick    # 100,000 events, 1 round
    python bench/pipeline.py --before /tmp/base   # and one aggregator of another checkout, same topics
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import sys
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

from _common import REPO, broker, code_env, emit, fresh_layout, median, result_path, save_results
from aiokafka import AIOKafkaConsumer, TopicPartition
from plots import plot_throughput

from aggregator.config import AggregatorConfig
from aggregator.verify import end_offsets
from producer import KafkaConnection, ProducerConfig, UsagePublisher, ensure_topics
from schemas.errors import DecodeError
from schemas.topics import TopicLayout
from schemas.wire import UsageDraft, decode_usage_record
from transport.admin import committed_offsets


def make_events(count: int, tenants: int = 10_000) -> list[UsageDraft]:
    """Events as the middleware hands them to the publisher."""
    rng = random.Random(1)
    now = datetime.now(UTC)
    return [
        UsageDraft(
            event_id=f"bench{i:012d}", tenant_id=f"tenant-{rng.randrange(tenants):05d}",
            period_key="2026-11", model="m", input_tokens=40, output_tokens=60, total_tokens=100,
            cache_creation_input_tokens=None, cache_read_input_tokens=None, reasoning_output_tokens=None,
            quota_tokens=10**9, event_time=now, streaming=False, estimated=False, instance_id="bench", attributes={},
            trace_id=None, span_id=None,
        )
        for i in range(count)
    ]


async def publish(config: ProducerConfig, events: list[UsageDraft]) -> float:
    async with UsagePublisher(config) as publisher:
        started = time.perf_counter()
        for start in range(0, len(events), 10_000):
            for event in events[start : start + 10_000]:
                publisher.publish(event)
            await asyncio.sleep(0)  # let the sender run, as an application's event loop would
        await publisher.flush(timeout=300)
        return len(events) / (time.perf_counter() - started)


async def ceiling(connection: KafkaConnection, layout: TopicLayout, decode: bool) -> float:
    """Events/s a bare consumer reaches on this topic with the aggregator's client settings (see
    ``aggregator.service``), timed from the assignment to the last record: librdkafka prefetches
    up to 64 MB in its own threads before the first record is asked for, so timing from the first
    record would credit it with reading done before the clock started."""
    defaults = AggregatorConfig(connection=connection, topics=layout)
    ends = await end_offsets(connection, layout.usage)
    total = sum(ends.values())
    consumer = AIOKafkaConsumer(
        **connection.client_kwargs(), group_id=None, enable_auto_commit=False, auto_offset_reset="earliest",
        fetch_max_wait_ms=min(defaults.batch_window_ms, 100), max_partition_fetch_bytes=4 * 1024 * 1024,
    )
    await consumer.start()
    try:
        consumer.assign([TopicPartition(layout.usage, p) for p in ends])
        await consumer.seek_to_beginning()
        seen = bad = 0
        started = time.perf_counter()
        while seen < total:
            batches = await consumer.getmany(timeout_ms=1000, max_records=defaults.batch_max)
            for records in batches.values():
                seen += len(records)
                if decode:
                    for record in records:
                        try:
                            decode_usage_record(record.key, record.value)
                        except DecodeError:
                            bad += 1
        assert bad == 0, f"{bad} records did not decode"
        return total / (time.perf_counter() - started)
    finally:
        await consumer.stop()


def librdkafka_ceiling(connection: KafkaConnection, layout: TopicLayout, total: int, decode: bool) -> float | None:
    """The same bare read with confluent-kafka (librdkafka), when it is installed; else None."""
    try:
        from confluent_kafka import OFFSET_BEGINNING, Consumer
        from confluent_kafka import TopicPartition as LibTopicPartition
    except ImportError:
        return None
    consumer = Consumer({
        "bootstrap.servers": connection.bootstrap_servers, "group.id": f"{layout.prefix}ceiling",
        "enable.auto.commit": False, "fetch.wait.max.ms": 50, "max.partition.fetch.bytes": 4 * 1024 * 1024,
    })
    try:
        consumer.assign([LibTopicPartition(layout.usage, p, OFFSET_BEGINNING) for p in range(layout.partitions)])
        seen = bad = 0
        started = time.perf_counter()
        deadline = time.monotonic() + 300
        while seen < total and time.monotonic() < deadline:
            messages = consumer.consume(num_messages=10_000, timeout=1.0)
            for message in messages:
                if message.error():
                    bad += 1
                    continue
                seen += 1
                if decode:
                    try:
                        decode_usage_record(message.key(), message.value())
                    except DecodeError:
                        bad += 1
        assert seen == total and bad == 0, f"read {seen} of {total}, {bad} bad"
        return total / (time.perf_counter() - started)
    finally:
        consumer.close()


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process so far (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def aggregate(connection: KafkaConnection, layout: TopicLayout, processes: int, group: str,
                    code: Path = REPO) -> tuple[float, float]:
    """(events/s, CPU microseconds per event summed over the group's processes); ``code``: the
    checkout whose aggregator runs (another one measures an older commit on the same topic)."""
    ends = await end_offsets(connection, layout.usage)
    total = sum(ends.values())
    env = code_env(code)
    logs = REPO / ".cache" / "bench-logs"
    logs.mkdir(parents=True, exist_ok=True)
    children = []
    for index in range(processes):
        with open(logs / f"{group}-{index}.log", "w") as log:  # noqa: ASYNC230 - a local log file
            children.append(await asyncio.create_subprocess_exec(
                sys.executable, "-m", "aggregator", "--bootstrap-servers", connection.bootstrap_servers,
                "--topic-prefix", layout.prefix, "--group-id", group, "--log-level", "INFO",
                cwd=code, env=env, stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log,
            ))
    deadline = time.perf_counter() + 300
    try:
        first_commit_at = None
        done_at_first = 0
        while True:
            if time.perf_counter() > deadline:
                for child in children:
                    child.send_signal(signal.SIGUSR1)  # each prints its asyncio tasks' stacks to its log
                await asyncio.sleep(1)
                raise RuntimeError(f"group {group} did not catch up within 300 s; see {logs}/{group}-*.log")
            committed = await committed_offsets(connection, group, layout.usage)
            done = sum(committed.values())
            now = time.perf_counter()
            if first_commit_at is None and done > 0:
                first_commit_at, done_at_first = now, done
                cpu_at_first = sum(cpu_seconds(child.pid) for child in children)
            if done >= total:
                cpu = sum(cpu_seconds(child.pid) for child in children) - cpu_at_first
                break
            await asyncio.sleep(0.05)
        assert first_commit_at is not None
        processed = total - done_at_first
        return processed / max(now - first_commit_at, 1e-9), cpu * 1e6 / max(processed, 1)
    finally:
        for child in children:
            child.send_signal(signal.SIGTERM)
        for child in children:
            try:
                await asyncio.wait_for(child.wait(), 30)
            except TimeoutError:
                child.send_signal(signal.SIGUSR1)
                await asyncio.sleep(1)
                child.kill()
                await child.wait()
                print(f"an aggregator of {group} did not stop on SIGTERM; its task stacks are in {logs}", file=sys.stderr)


CEILINGS = {"getmany": ("aiokafka", False), "ceiling": ("aiokafka", True),
            "librdkafka": ("librdkafka", False), "librdkafka_decode": ("librdkafka", True)}


async def ceiling_in_child(bootstrap: str, layout: TopicLayout, name: str) -> float | None:
    """One ceiling, read by a fresh process as the aggregator is one: this process holds the N
    events it published, and its collector walking them would slow the reader measured here."""
    child = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--ceiling-child", name, "--prefix", layout.prefix, "--bootstrap", bootstrap,
        "--partitions", str(layout.partitions), stdout=asyncio.subprocess.PIPE, cwd=REPO,
    )
    out, _ = await child.communicate()
    if child.returncode != 0:
        raise RuntimeError(f"the {name} ceiling child failed ({child.returncode})")
    figure: float | None = json.loads(out.decode().strip().splitlines()[-1])["eps"]
    return figure


async def ceiling_child(name: str, prefix: str, bootstrap: str, partitions: int) -> None:
    connection = KafkaConnection(bootstrap_servers=bootstrap)
    layout = TopicLayout(prefix=prefix, partitions=partitions)
    client, decode = CEILINGS[name]
    if client == "aiokafka":
        eps: float | None = await ceiling(connection, layout, decode)
    else:
        total = sum((await end_offsets(connection, layout.usage)).values())
        eps = librdkafka_ceiling(connection, layout, total, decode)
    print(json.dumps({"eps": eps}), flush=True)


async def main(count: int, rounds: int, before: Path | None) -> None:
    with broker() as bootstrap:
        connection = KafkaConnection(bootstrap_servers=bootstrap)
        events = make_events(count)
        names = ("publish", "getmany", "ceiling", "librdkafka", "librdkafka_decode", "aggregate_1", "aggregate_2",
                 "cpu_1", "cpu_2", "before_1", "before_cpu_1")
        results: dict[str, list[float]] = {name: [] for name in names}
        for round_ in range(rounds):
            layout = fresh_layout(f"pipeline{round_}")
            await ensure_topics(connection, layout)
            config = replace(ProducerConfig(connection=connection, topics=layout), instance_id="bench")
            results["publish"].append(await publish(config, events))
            for name in ("getmany", "ceiling", "librdkafka", "librdkafka_decode"):
                figure = await ceiling_in_child(bootstrap, layout, name)
                if figure is not None:
                    results[name].append(figure)
            # The two group sizes alternate in order between rounds, so drift hits both alike.
            order: tuple[int | str, ...] = (1, 2) if round_ % 2 == 0 else (2, 1)
            if before is not None:
                order = (*order, "before") if round_ % 2 == 0 else ("before", *order)
            for variant in order:
                if variant == "before":
                    assert before is not None
                    eps, cpu = await aggregate(connection, layout, 1, f"{layout.prefix}gb", code=before)
                    results["before_1"].append(eps)
                    results["before_cpu_1"].append(cpu)
                    continue
                eps, cpu = await aggregate(connection, layout, int(variant), f"{layout.prefix}g{variant}")
                results[f"aggregate_{variant}"].append(eps)
                results[f"cpu_{variant}"].append(cpu)
            print(
                f"round {round_ + 1}: publish {results['publish'][-1]:,.0f}/s, getmany {results['getmany'][-1]:,.0f}/s, "
                f"getmany+decode {results['ceiling'][-1]:,.0f}/s, 1 aggregator {results['aggregate_1'][-1]:,.0f}/s "
                f"({results['cpu_1'][-1]:.1f} us CPU an event), 2 aggregators {results['aggregate_2'][-1]:,.0f}/s "
                f"({results['cpu_2'][-1]:.1f} us)", flush=True,
            )
        figures = {k: median(v) for k, v in results.items() if v}
        ratio = figures["aggregate_1"] / figures["ceiling"]
        cpu_ratio = figures["cpu_2"] / figures["cpu_1"]
        print(
            "\n| events | rounds | publish eps | getmany eps | consumer ceiling eps | 1 aggregator eps | ratio to ceiling "
            "| 2 aggregators eps | CPU us/event 1 | CPU us/event 2 | CPU 2/1 |\n|---|---|---|---|---|---|---|---|---|---|---|\n"
            f"| {count:,} | {rounds} | {figures['publish']:,.0f} | {figures['getmany']:,.0f} | {figures['ceiling']:,.0f} | "
            f"{figures['aggregate_1']:,.0f} | {ratio:.2f} | {figures['aggregate_2']:,.0f} | {figures['cpu_1']:.1f} | "
            f"{figures['cpu_2']:.1f} | {cpu_ratio:.2f} |"
        )
        print(f"(this machine has {os.cpu_count()} cores; the broker runs on the same machine)")
        results_name = "pipeline" if count >= 400_000 else "pipeline_quick"
        final: dict[str, object] = {
            "events": count, "rounds": rounds, "publish_eps": round(figures["publish"]),
            "getmany_eps": round(figures["getmany"]), "consumer_ceiling_eps": round(figures["ceiling"]),
            "aggregate_eps_1": round(figures["aggregate_1"]), "aggregate_eps_2": round(figures["aggregate_2"]),
            "ratio_to_ceiling": round(ratio, 2), "scaling_2": round(figures["aggregate_2"] / figures["aggregate_1"], 2),
            "cpu_us_per_event_1": round(figures["cpu_1"], 2), "cpu_us_per_event_2": round(figures["cpu_2"], 2),
            "cpu_ratio_2_to_1": round(cpu_ratio, 2),
        }
        if "before_1" in figures:
            print(f"the aggregator of {before} on the same topics: {figures['before_1']:,.0f}/s, "
                  f"{figures['before_cpu_1']:.1f} us CPU an event (now {figures['aggregate_1'] / figures['before_1']:.2f}x "
                  f"the events/s, {figures['cpu_1'] / figures['before_cpu_1']:.2f}x the CPU)")
            final["before_aggregate_eps_1"] = round(figures["before_1"])
            final["before_cpu_us_per_event_1"] = round(figures["before_cpu_1"], 2)
        if "librdkafka" in figures:
            print(f"confluent-kafka (librdkafka) consume(10000): {figures['librdkafka']:,.0f}/s alone, "
                  f"{figures['librdkafka_decode']:,.0f}/s decoding")
            final["librdkafka_eps"] = round(figures["librdkafka"])
            final["librdkafka_decode_eps"] = round(figures["librdkafka_decode"])
        save_results(results_name, {**final, "rounds_raw": results})
        plot_throughput(final, result_path(results_name, ".png"),
                        title=f"Throughput, {count:,} events, median of {rounds} rounds, one run")
        emit(final)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="100,000 events, 1 round")
    parser.add_argument("--before", type=Path, metavar="TREE",
                        help="also run the aggregator of another checkout (a worktree of an older commit), one process")
    parser.add_argument("--ceiling-child", choices=sorted(CEILINGS), help=argparse.SUPPRESS)
    parser.add_argument("--prefix", help=argparse.SUPPRESS)
    parser.add_argument("--bootstrap", help=argparse.SUPPRESS)
    parser.add_argument("--partitions", type=int, default=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ceiling_child:
        asyncio.run(ceiling_child(args.ceiling_child, args.prefix, args.bootstrap, args.partitions))
    else:
        asyncio.run(main(100_000 if args.quick else 400_000, 1 if args.quick else 3, args.before))
