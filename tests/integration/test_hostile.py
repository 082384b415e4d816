"""Hostile input on the real broker: what an outsider who can write the topics can do to the totals.

Written against the rules (``aggregator.intake``, ``deadletter``, ``changelog``, ``notices``,
``schemas``), not against the implementation's own tests. Each test ends on the aggregator's
durable output (changelog, dead letters, notices) or the independent verifier, never on its
in-memory state alone.

Eight product bugs these tests found are fixed; the tests now guard the fixes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.structs import ConsumerRecord

from aggregator import AggregatorConfig, AggregatorService
from aggregator.changelog import read_changelog
from aggregator.deadletter import MAX_DEAD_LETTER_BYTES
from aggregator.verify import verify
from producer import ProducerConfig, ensure_topics
from schemas.topics import TopicLayout
from schemas.totals import TotalsRecord
from schemas.wire import MAX_RECORD_BYTES, encode, tenant_period_key
from tests.helpers import (
    AggregatorProcess,
    RawRecord,
    eventually,
    notices_feed,
    partition_of,
    read_topic,
    reason_of,
    send_raw_header_record,
    send_records,
    tenant_on,
)
from transport.admin import close_consumer, start_consumer, topic_partitions
from transport.fetch import getmany_safe
from transport.reading import end_offsets

pytestmark = pytest.mark.integration

PARTITIONS = 3
PERIOD = "2026-04"
WHEN = "2026-04-01T00:00:00Z"
Key = tuple[str, str]
_ids = itertools.count()


def home(tenant: str | bytes) -> int:
    return partition_of(tenant, PARTITIONS)


def new_id() -> str:
    return f"hostile{next(_ids):010d}"


def ev(tenant: str, tokens: int, *, event_id: str | None = None, period: str = PERIOD, **fields: object) -> dict:
    """A usage event as a JSON object, field by field, so any field can be made hostile."""
    event = {
        "event_id": event_id or new_id(),
        "schema_version": 1,
        "tenant_id": tenant,
        "period_key": period,
        "total_tokens": tokens,
        "quota_tokens": 10**12,
        "event_time": WHEN,
        "instance_id": "hostile",
    }
    event.update(fields)
    return event


def js(event: dict) -> bytes:
    return json.dumps(event).encode()


def ce(event_id: str) -> list[tuple[str, bytes | None]]:
    return [("ce_specversion", b"1.0"), ("ce_id", event_id.encode()), ("ce_type", b"io.tokenguard.usage.v1")]


@dataclass
class Planned:
    """One record and what it must come to: counted, dropped as a duplicate, or one dead letter."""

    name: str
    record: RawRecord
    count: tuple[str, str, int] | None = None  # (tenant, period, tokens)
    duplicate: bool = False
    reason: str | None = None
    at: tuple[int, int] | None = None  # (partition, offset) once written
    raw_header: bool = False  # written with a header name that is not UTF-8


def good(name: str, event: dict, *, headers: list | None = None, tokens: int | None = None) -> Planned:
    tenant = event["tenant_id"]
    record = RawRecord(tenant.encode(), js(event), ce(event["event_id"]) if headers is None else headers, home(tenant))
    return Planned(
        name, record, count=(tenant, event["period_key"], event["total_tokens"] if tokens is None else tokens)
    )


def bad(
    name: str,
    key: bytes | None,
    value: bytes | None,
    reason: str,
    *,
    headers: list | None = None,
    partition: int | None = None,
) -> Planned:
    if partition is None:
        partition = home(key) if key is not None else 0
    return Planned(name, RawRecord(key, value, headers or [], partition), reason=reason)


def dup(name: str, key: bytes, value: bytes, headers: list | None = None) -> Planned:
    return Planned(name, RawRecord(key, value, headers or [], home(key)), duplicate=True)


async def write(connection, layout: TopicLayout, planned: list[Planned]) -> None:  # type: ignore[no-untyped-def]
    """Write ``planned`` in order; note where each record landed."""
    start = 0
    for end in [i for i, p in enumerate(planned) if p.raw_header] + [len(planned)]:
        chunk = planned[start:end]
        for item, at in zip(chunk, await send_records(connection, layout.usage, [p.record for p in chunk]), strict=True):
            item.at = at
            assert at[0] == item.record.partition
        if end < len(planned):
            item = planned[end]
            r = item.record
            assert r.key is not None and r.value is not None and r.partition is not None
            item.at = (r.partition, await send_raw_header_record(connection, layout.usage, r.key, r.value, r.partition))
        start = end + 1


def unreadable(name: str, event: dict) -> Planned:
    """A valid event with a header whose name aiokafka cannot decode: dead-lettered, never counted."""
    tenant = event["tenant_id"]
    return Planned(
        name, RawRecord(tenant.encode(), js(event), [], home(tenant)), reason="unreadable_record", raw_header=True
    )


async def max_message_bytes(connection, topic: str) -> int:  # type: ignore[no-untyped-def]
    admin = AIOKafkaAdminClient(**connection.client_kwargs())
    await admin.start()
    try:
        responses = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)])
    finally:
        await admin.close()
    entries = {e[0]: e[1] for r in responses for res in r.resources for e in res[4]}
    return int(entries["max.message.bytes"])


async def caught_up(aggregator: AggregatorService, planned: list[Planned], timeout: float = 20) -> None:
    """The aggregator has passed every written record (applied or dead-lettered)."""
    last: dict[int, int] = {}
    for p in planned:
        if p.at is not None:
            last[p.at[0]] = max(last.get(p.at[0], -1), p.at[1])
    await eventually(
        lambda: all(aggregator.state.partition_offsets.get(part, -1) >= off for part, off in last.items()),
        timeout,
        f"aggregator reaching {last}",
    )


async def shutdown(aggregator: AggregatorService) -> None:
    """``stop()``; when it raises (it re-raises a crashed task's error before closing anything),
    close by hand what it left open, so a failing test does not leak clients into the next one."""
    try:
        await aggregator.stop()
        return
    except Exception:
        pass
    for follower in (aggregator._watch._follower, aggregator._limits_feed._follower):
        for _ in range(2):  # the first call may re-raise its dead task's error before closing
            with contextlib.suppress(Exception):
                await follower.stop()
    if aggregator._consumer is not None:
        with contextlib.suppress(Exception):
            await close_consumer(aggregator._consumer)
    if aggregator._producer is not None:
        with contextlib.suppress(Exception):
            await aggregator._producer.stop()
    aggregator._consumer = aggregator._producer = None


async def try_start(config: AggregatorConfig) -> tuple[AggregatorService | None, str | None]:
    """(a started aggregator that has its partitions, None) or (None, why not).

    A ``start()`` that fails closes what it opened; a consume loop that dies after it is closed
    here by ``shutdown()``, so a failing test does not leak clients into the next one."""
    aggregator = AggregatorService(config)
    error = None
    try:
        await asyncio.wait_for(aggregator.start(), 30)
        await eventually(lambda: aggregator.assigned.is_set() or not aggregator.running, 20, "assignment or death")
        if not aggregator.assigned.is_set():
            task = aggregator._task
            died = task.exception() if task is not None and task.done() else None
            error = f"the consume loop ended before its partitions were restored: {died!r}"
    except Exception as exc:
        error = f"start() raised {type(exc).__name__}: {exc}"
    if error is not None:
        await shutdown(aggregator)
    return (None, error) if error is not None else (aggregator, None)


# --------------------------------------------------------------------------------------------
# 1. The table
# --------------------------------------------------------------------------------------------


def table(big_value_bytes: int) -> tuple[list[Planned], list[Planned], list[Planned]]:
    """Three phases: live, written while no aggregator runs, live again after the restart."""
    acme, globex, initech = (
        "acme",
        tenant_on((home("acme") + 1) % PARTITIONS, PARTITIONS, "globex-"),
        tenant_on((home("acme") + 2) % PARTITIONS, PARTITIONS, "initech-"),
    )
    # A tenant sharing acme's partition (and so its dedup window).
    neighbour = tenant_on(home(acme), PARTITIONS, "neighbour-")
    wrong = (home(acme) + 1) % PARTITIONS

    deep = b"[" * 100_000 + b"]" * 100_000
    deep_short = b"[" * 30_000 + b"]" * 30_000
    x1 = ev(acme, 101, event_id="crossphase-0001")
    x2 = ev(globex, 202, event_id="crossphase-0002")
    shared_id = "shared-id-000001"
    dup_src = ev(initech, 33)
    conflict_src = ev(acme, 44)
    padded_ok = js(ev(initech, 7))
    padded_ok += b" " * (MAX_RECORD_BYTES - len(padded_ok))
    padded_over = js(ev(initech, 8))
    padded_over += b" " * (MAX_RECORD_BYTES + 1 - len(padded_over))
    huge = js(ev(globex, 9))
    huge += b" " * (big_value_bytes - len(huge))
    forged_headers = [
        ("tokenguard.error.reason", b"all-good"),
        ("tokenguard.source.offset", b"0"),
        ("tokenguard.source.partition", b"99"),
        ("x-keep", b"kept"),
        ("x-null", None),
    ]
    surrogate = js(ev(acme, 5, model="X")).replace(b'"X"', b'"\\ud800"')
    bad_utf8 = js(ev(acme, 5, model="X")).replace(b'"X"', b'"\xff\xfe"')
    dup_keys = js(ev(acme, 5))[:-1] + b', "total_tokens": 777}'
    re_serialised = json.dumps(dict(reversed(list(dup_src.items()))), indent=2).encode()
    other_offset = dict(dup_src, event_time="2026-04-01T02:00:00+02:00")

    phase1 = [
        good("x1 original (duplicated after the restart)", x1),
        good("x2 original (conflicted after the restart)", x2),
        bad("garbage bytes", acme.encode(), b"\xff\x00\xfe garbage", "invalid_json"),
        bad("empty value", acme.encode(), b"", "empty_value"),
        bad("null value (tombstone)", acme.encode(), None, "empty_value"),
        bad("empty key, null value", b"", None, "empty_value"),  # (aiokafka refuses both null)
        bad("JSON null", acme.encode(), b"null", "invalid_schema"),
        bad("JSON array", acme.encode(), b"[1, 2, 3]", "invalid_schema"),
        bad("JSON string", acme.encode(), b'"acme"', "invalid_schema"),
        bad("JSON number", acme.encode(), b"42", "invalid_schema"),
        bad("tokens as a string", acme.encode(), js(ev(acme, "5")), "invalid_schema"),  # type: ignore[arg-type]
        bad("tokens as a float", acme.encode(), js(ev(acme, 5.0)), "invalid_schema"),  # type: ignore[arg-type]
        bad("tokens as a bool", acme.encode(), js(ev(acme, True)), "invalid_schema"),
        bad("negative tokens", acme.encode(), js(ev(acme, -1)), "invalid_schema"),
        bad("tokens 10**40", acme.encode(), js(ev(acme, 10**40)), "invalid_schema"),
        bad("tokens with 4000 digits", acme.encode(), js(ev(acme, 10**3999)), "invalid_schema"),
        bad(
            "tokens 1e400",
            acme.encode(),
            js(ev(acme, 5)).replace(b'"total_tokens": 5', b'"total_tokens": 1e400'),
            "invalid_schema",
        ),
        bad("tokens one over the per-event cap", acme.encode(), js(ev(acme, 100_000_001)), "invalid_schema"),
        good("tokens exactly the per-event cap", ev(acme, 100_000_000)),
        bad("negative input_tokens", acme.encode(), js(ev(acme, 5, input_tokens=-5)), "invalid_schema"),
        bad("quota over the limit cap", acme.encode(), js(ev(acme, 5, quota_tokens=10**15 + 1)), "invalid_schema"),
        bad("nested JSON 100k deep (200 kB)", acme.encode(), deep, "oversized"),
        bad("nested JSON 30k deep (under 64 kB)", acme.encode(), deep_short, "invalid_json"),
        bad(
            "nested JSON 30k deep inside a field",
            acme.encode(),
            js(ev(acme, 5, model="X")).replace(b'"X"', deep_short),
            "invalid_json",
        ),
        bad("schema_version 3", acme.encode(), js(ev(acme, 5, schema_version=3)), "unsupported_version"),
        bad("schema_version '1'", acme.encode(), js(ev(acme, 5, schema_version="1")), "unsupported_version"),
        bad("key is another tenant", globex.encode(), js(ev(acme, 5)), "key_mismatch"),
        bad("no key", None, js(ev(acme, 5)), "key_mismatch", partition=home(acme)),
        bad("key with a trailing space", b"acme ", js(ev(acme, 5)), "key_mismatch"),
        bad("key not UTF-8", b"\xff\xfeacme", js(ev(acme, 5)), "key_mismatch"),
        bad("key of 600 kB", b"k" * 600_000, js(ev(acme, 5)), "key_mismatch"),
        bad("misrouted", acme.encode(), js(e := ev(acme, 5)), "misrouted", headers=ce(e["event_id"]), partition=wrong),
        bad("ce_id differs", acme.encode(), js(ev(acme, 5)), "id_mismatch", headers=ce("someone-elses-id")),
        bad("ce_id null", acme.encode(), js(ev(acme, 5)), "id_mismatch", headers=[("ce_id", None)]),
        bad(
            "ce_id twice, second wrong",
            acme.encode(),
            js(e := ev(acme, 5)),
            "id_mismatch",
            headers=[("ce_id", e["event_id"].encode()), ("ce_id", b"x" * 9)],
        ),
        good("ce_id twice, both right", e := ev(acme, 6), headers=ce(e["event_id"]) + ce(e["event_id"])),
        good(
            "other headers with null values",
            e := ev(globex, 7),
            headers=[*ce(e["event_id"]), ("x-trace", None), ("", b"")],
        ),
        good("1000 headers", e := ev(initech, 8), headers=ce(e["event_id"]) + [(f"h{i}", b"v") for i in range(1000)]),
        good(
            "forged tokenguard.* headers on a good record",
            e := ev(initech, 9),
            headers=ce(e["event_id"]) + forged_headers,
        ),
        bad("forged tokenguard.* headers on a bad record", acme.encode(), b"{", "invalid_json", headers=forged_headers),
        good("id reused by a tenant on the same partition", ev(neighbour, 11, event_id=x1["event_id"])),
        good("id reused by a tenant elsewhere", ev(initech, 12, event_id=x1["event_id"])),
        good("a shared id, first tenant", ev(acme, 13, event_id=shared_id)),
        good("a shared id, second tenant", ev(neighbour, 14, event_id=shared_id)),
        good("duplicate source", dup_src),
        dup("exact duplicate", initech.encode(), js(dup_src)),
        dup("duplicate re-serialised, no headers", initech.encode(), re_serialised),
        dup(
            "duplicate, same instant at another UTC offset", initech.encode(), js(other_offset), ce(dup_src["event_id"])
        ),
        good("conflict source", conflict_src),
        bad("same id, other tokens", acme.encode(), js(dict(conflict_src, total_tokens=45)), "id_conflict"),
        bad("same id, other period", acme.encode(), js(dict(conflict_src, period_key="2026-05")), "id_conflict"),
        bad("same id, other model", acme.encode(), js(dict(conflict_src, model="gpt")), "id_conflict"),
        unreadable("header name not UTF-8, live", ev(acme, 1_000)),
    ]
    phase2 = [  # written while no aggregator runs: one batch for the restarted one
        dup("x1 duplicated across the restart", acme.encode(), js(x1), ce(x1["event_id"])),
        bad("tenant with a newline", b"ac\nme", js(ev("ac\nme", 5)), "invalid_schema"),
        bad("tenant with a NUL", b"ac\x00me", js(ev("ac\x00me", 5)), "invalid_schema"),
        bad("tenant with a right-to-left override", "ac\u202eme".encode(), js(ev("ac\u202eme", 5)), "invalid_schema"),
        bad("period with a tab", acme.encode(), js(ev(acme, 5, period="2026\t04")), "invalid_schema"),
        bad("period of 65 characters", acme.encode(), js(ev(acme, 5, period="p" * 65)), "invalid_schema"),
        good("period of 64 characters", ev(acme, 15, period="p" * 64)),
        unreadable("header name not UTF-8, read in the restarted aggregator's first fetch", ev(acme, 1_000)),
        bad("tenant of 257 characters", b"t" * 257, js(ev("t" * 257, 5)), "invalid_schema"),
        good("tenant of 256 characters", ev("t" * 256, 16)),
        bad("empty tenant", b"", js(ev("", 5)), "invalid_schema"),
        bad(
            "40 attributes",
            acme.encode(),
            js(ev(acme, 5, attributes={f"k{i}": "v" for i in range(40)})),
            "invalid_schema",
        ),
        good("32 attributes", ev(acme, 17, attributes={f"k{i}": "v" for i in range(32)})),
        bad("attribute value not a string", acme.encode(), js(ev(acme, 5, attributes={"k": 1})), "invalid_schema"),
        bad("event_id of 7", acme.encode(), js(ev(acme, 5, event_id="abcdefg")), "invalid_schema"),
        bad("event_id with a slash", acme.encode(), js(ev(acme, 5, event_id="abcd/efgh")), "invalid_schema"),
        bad("event_id of 65", acme.encode(), js(ev(acme, 5, event_id="e" * 65)), "invalid_schema"),
        bad(
            "required field missing",
            acme.encode(),
            json.dumps({"event_id": new_id(), "tenant_id": acme}).encode(),
            "invalid_schema",
        ),
    ]
    phase3 = [
        bad("x2 with other content after the restart", globex.encode(), js(dict(x2, total_tokens=203)), "id_conflict"),
        dup("x2 exact duplicate after the restart", globex.encode(), js(x2)),
        good(
            "unknown extra fields are ignored",
            ev(globex, 18, future_field={"nested": [1, 2, {"a": None}]}, tenant_id_2="acme"),
        ),
        good("far-future event time", ev(globex, 19, event_time="9999-12-31T23:59:59Z")),
        bad("naive event time", acme.encode(), js(ev(acme, 5, event_time="2026-04-01T00:00:00")), "invalid_schema"),
        bad("event time as epoch seconds", acme.encode(), js(ev(acme, 5, event_time=1_775_000_000)), "invalid_schema"),
        bad("year 0", acme.encode(), js(ev(acme, 5, event_time="0000-01-01T00:00:00Z")), "invalid_schema"),
        good("duplicate JSON keys: the last wins", json.loads(dup_keys), tokens=777),
        bad("byte-order mark", acme.encode(), b"\xef\xbb\xbf" + js(ev(acme, 5)), "invalid_json"),
        bad("trailing garbage", acme.encode(), js(ev(acme, 5)) + b" x", "invalid_json"),
        bad("invalid UTF-8 in a string", acme.encode(), bad_utf8, "invalid_json"),
        bad("lone surrogate escape", acme.encode(), surrogate, "invalid_json"),
        unreadable("header name not UTF-8, on another partition", ev(globex, 1_000)),
        unreadable("header name not UTF-8, on the third partition", ev(initech, 1_000)),
        good("non-ASCII tenant", ev("Ωmega-テナント", 20)),
        good("full-width look-alike of acme is another tenant", ev("ａｃｍｅ", 21)),
        good("tenant that is a JSON key fragment", ev('acme","2026-04', 22)),
        good("64 kB exactly (padded, valid)", json.loads(padded_ok)),
        bad("64 kB + 1 (padded, valid)", initech.encode(), padded_over, "oversized"),
        bad("just under the broker's max message size", globex.encode(), huge, "oversized"),
    ]
    # The duplicate-JSON-keys record must go out as written, not re-encoded.
    for item in phase3:
        if item.name.startswith("duplicate JSON keys"):
            item.record.value = dup_keys
            item.record.headers = ce(json.loads(dup_keys)["event_id"])
        if item.name.startswith("64 kB exactly"):
            item.record.value = padded_ok
    return phase1, phase2, phase3


def interleave(cases: list[Planned], rng: random.Random, tenants: list[str]) -> list[Planned]:
    out: list[Planned] = []
    for case in cases:
        for _ in range(rng.randint(1, 2)):
            out.append(good("filler", ev(rng.choice(tenants), rng.randint(1, 5_000))))
        out.append(case)
    return out


@pytest.mark.slow
async def test_table_of_hostile_usage_records_across_a_restart(
    connection, layout: TopicLayout, aggregator_config: AggregatorConfig
) -> None:  # type: ignore[no-untyped-def]
    await ensure_topics(connection, layout)
    limit = await max_message_bytes(connection, layout.usage)
    big = limit - 300  # the record batch and record framing take the rest
    rng = random.Random(20260401)
    phase1, phase2, phase3 = table(big)
    tenants = ["acme", "filler-a", "filler-b", "filler-c", "filler-d"]
    phase1, phase2, phase3 = (interleave(p, rng, tenants) for p in (phase1, phase2, phase3))

    first = AggregatorService(aggregator_config)
    await first.start()
    try:
        await asyncio.wait_for(first.assigned.wait(), 30)
        half = len(phase1) // 2
        await write(connection, layout, phase1[:half])
        await write(connection, layout, phase1[half:])
        await caught_up(first, phase1)
        assert first.running, "the aggregator died on the first half of the table"
    finally:
        await shutdown(first)

    await write(connection, layout, phase2)  # nobody consuming

    second = AggregatorService(aggregator_config)
    await second.start()
    try:
        await asyncio.wait_for(second.assigned.wait(), 30)
        await write(connection, layout, phase3[: len(phase3) // 2])
        await write(connection, layout, phase3[len(phase3) // 2 :])
        everything = phase1 + phase2 + phase3
        await caught_up(second, everything)
        report = await verify(connection, layout, aggregator_config.group_id, wait_s=30)
        assert second.running, "the aggregator died after the restart"
    finally:
        await shutdown(second)

    # Independent expectations.
    expected: dict[Key, list[int]] = {}
    for item in everything:
        if item.count is not None:
            tenant, period, tokens = item.count
            slot = expected.setdefault((tenant, period), [0, 0])
            slot[0] += tokens
            slot[1] += 1
    letters_expected = {item.at: item.reason for item in everything if item.reason}
    duplicates = sum(item.duplicate for item in everything)
    good_events = sum(item.count is not None for item in everything)

    # Totals: exactly the good events, each once.
    changelog = await read_changelog(connection, layout.totals)
    assert {k: (r.used_tokens, r.event_count) for k, r in changelog.items()} == {
        k: tuple(v) for k, v in expected.items()
    }
    assert first.stats.events + second.stats.events == good_events
    assert first.stats.duplicates_dropped + second.stats.duplicates_dropped == duplicates
    assert first.stats.id_conflicts + second.stats.id_conflicts == Counter(letters_expected.values())["id_conflict"]
    assert (
        first.stats.unreadable_records + second.stats.unreadable_records
        == Counter(letters_expected.values())["unreadable_record"]
        == 4
    )
    assert second.stats.replays_skipped == 0, "a graceful stop commits: nothing is re-read"

    # Dead letters: exactly one per bad record, none for anything else, none again after the restart.
    letters = await read_topic(connection, layout.dead_letters)
    by_source: dict[tuple[int, int], list[ConsumerRecord]] = {}
    for letter in letters:
        h = dict(letter.headers)
        by_source.setdefault((int(h["tokenguard.source.partition"]), int(h["tokenguard.source.offset"])), []).append(
            letter
        )
    assert {at: len(ls) for at, ls in by_source.items() if len(ls) != 1} == {}, "a record dead-lettered more than once"
    got = {at: reason_of(ls[0]) for at, ls in by_source.items()}
    names = {item.at: item.name for item in everything}
    wrong = {names.get(at, at): (got.get(at), want) for at, want in letters_expected.items() if got.get(at) != want}
    extra = {names.get(at, at): got[at] for at in set(got) - set(letters_expected)}
    assert wrong == {} and extra == {}, f"(got, wanted) per record: {wrong}; unexpected letters: {extra}"
    assert first.stats.dead_letters + second.stats.dead_letters == len(letters_expected)

    for item in everything:
        if not item.reason:
            continue
        letter = by_source[item.at][0]
        h = letter.headers
        ours = [(n, v) for n, v in h if n.startswith("tokenguard.")]
        names_once = Counter(n for n, _ in ours)
        assert all(c == 1 for c in names_once.values()), f"{item.name}: repeated tokenguard headers {names_once}"
        d = dict(h)
        assert d["tokenguard.source.topic"] == layout.usage.encode()
        assert d["tokenguard.aggregator"] == aggregator_config.aggregator_id.encode()
        size = (
            len(letter.key or b"") + len(letter.value or b"") + sum(len(n.encode()) + len(v or b"") + 8 for n, v in h)
        )
        assert size <= MAX_DEAD_LETTER_BYTES, item.name
        original = item.record
        whole = (original.key or b"") + (original.value or b"")
        if item.reason == "unreadable_record":
            assert letter.key is None and not letter.value, item.name  # its bytes cannot be had through aiokafka
            continue
        if "tokenguard.error.truncated" in d:
            assert item.name == "just under the broker's max message size", f"{item.name} truncated"
            assert d["tokenguard.original.sha256"] == hashlib.sha256(whole).hexdigest().encode()
            assert int(d["tokenguard.original.value_bytes"]) == len(original.value or b"")
            assert original.value is not None and letter.value is not None
            assert original.value.startswith(letter.value) and len(letter.value) > 800_000
            assert letter.key == original.key
        else:
            assert item.name != "just under the broker's max message size", (
                "the ~1 MB record's dead letter was not truncated"
            )
            assert (letter.key, letter.value) == (original.key, original.value), item.name
            kept = [(n, v) for n, v in original.headers if not n.startswith("tokenguard.") and v is not None]
            assert [(n, v) for n, v in h if not n.startswith("tokenguard.")] == kept, item.name

    # The independent verifier agrees, and classifies the bad records as we did.
    assert report.lag == 0
    assert report.differences == [], "\n".join(map(str, report.differences))
    assert report.duplicates == duplicates
    assert report.invalid == dict(Counter(letters_expected.values()))
    assert report.events == good_events


# --------------------------------------------------------------------------------------------
# 3. Forged control records
# --------------------------------------------------------------------------------------------


class Recorder:
    """Follows every partition of a topic from its beginning; keeps (arrival time, record)."""

    def __init__(self, connection, topic: str) -> None:  # type: ignore[no-untyped-def]
        self.connection, self.topic = connection, topic
        self.seen: list[tuple[float, ConsumerRecord]] = []
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Recorder:
        consumer = AIOKafkaConsumer(
            **self.connection.client_kwargs(),
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=20,
        )
        await start_consumer(consumer)
        tps = [TopicPartition(self.topic, p) for p in await topic_partitions(self.connection, self.topic)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        self._consumer = consumer
        self._task = asyncio.create_task(self._run())
        return self

    async def _run(self) -> None:
        assert self._consumer is not None
        while True:
            batches, _ = await getmany_safe(self._consumer, timeout_ms=50)  # forged records may be unparseable
            now = time.monotonic()
            for records in batches.values():
                self.seen.extend((now, r) for r in records)

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._consumer is not None:
            await close_consumer(self._consumer)

    def latest(self, key: bytes) -> ConsumerRecord | None:
        mine = [r for _, r in self.seen if r.key == key]
        return max(mine, key=lambda r: r.offset) if mine else None

    def latest_notice(self, key: bytes) -> dict | None:
        record = self.latest(key)
        if record is None or record.value is None:
            return None
        try:
            notice = json.loads(record.value)
        except ValueError:
            return None
        return notice if isinstance(notice, dict) else None

    async def until(self, predicate: Callable[[], bool], timeout: float, what: str) -> float:
        started = time.monotonic()
        await eventually(predicate, timeout, what)
        return time.monotonic() - started


def forged_notice(tenant: str, period: str, state: str, **fields: object) -> bytes:
    notice = {
        "type": "notice",
        "tenant_id": tenant,
        "period_key": period,
        "state": state,
        "used_tokens": 0,
        "limit_tokens": 1,
        "usage_partition": home(tenant),
        "usage_offset": 0,
        "reason": "forged",
        "aggregator_id": "forger",
        "emitted_at": datetime.now(UTC).isoformat(),
    }
    notice.update(fields)
    return json.dumps(notice).encode()


async def forge(
    connection,
    layout: TopicLayout,
    key: bytes,
    value: bytes | None,
    topic: str | None = None,
    partition: int | None = None,
) -> float:  # type: ignore[no-untyped-def]
    """Write one forged record; return the monotonic time just before it was sent."""
    sent = time.monotonic()
    await send_records(connection, topic or layout.notices, [RawRecord(key, value, partition=partition)])
    return sent


async def start_aggregator(config: AggregatorConfig) -> AggregatorService:
    """Started, with its partitions; the test stops it with ``shutdown()``, which copes with a
    crashed aggregator (what these tests try to cause)."""
    aggregator = AggregatorService(config)
    await aggregator.start()
    await asyncio.wait_for(aggregator.assigned.wait(), 30)
    return aggregator


async def publish_usage(connection, layout: TopicLayout, events: list[dict]) -> list[tuple[int, int]]:  # type: ignore[no-untyped-def]
    return await send_records(
        connection,
        layout.usage,
        [RawRecord(e["tenant_id"].encode(), js(e), ce(e["event_id"]), home(e["tenant_id"])) for e in events],
    )


def is_ours(notice: dict | None, aggregator: AggregatorService, key: Key) -> bool:
    held = aggregator.state.totals.get(key)
    return (
        notice is not None
        and held is not None
        and notice["aggregator_id"] == aggregator.config.aggregator_id
        and (notice["state"], notice["limit_tokens"], notice["used_tokens"]) == (held.state, held.limit, held.used)
    )


CORRECTION_BOUND_S = 2.0


async def test_forged_exceeded_notice_over_an_ok_tenant_is_corrected_promptly(
    connection, layout: TopicLayout, aggregator_config: AggregatorConfig
) -> None:  # type: ignore[no-untyped-def]
    # Re-assertion far away: only the read-back correction can put it right within the bound.
    config = replace(aggregator_config, reassert_interval_s=120.0)
    tenant = "okay-corp"
    key = (tenant, PERIOD)
    await ensure_topics(connection, layout)
    aggregator = await start_aggregator(config)
    try:
        async with Recorder(connection, layout.notices) as notices:
            await publish_usage(connection, layout, [ev(tenant, 100, quota_tokens=10_000) for _ in range(3)])
            await eventually(
                lambda: (t := aggregator.state.totals.get(key)) is not None and t.used == 300, 20, "usage counted"
            )
            assert aggregator.state.totals[key].state == "ok"
            variants = [
                forged_notice(tenant, PERIOD, "exceeded", used_tokens=10**9, limit_tokens=1),
                forged_notice(tenant, PERIOD, "warning", used_tokens=9_000, limit_tokens=10_000),
                forged_notice(tenant, PERIOD, "ok", used_tokens=0, limit_tokens=10**15),  # right state, wrong limit
                forged_notice("someone-else", PERIOD, "exceeded"),  # value names another key
                b"\x00 not a notice",
                forged_notice(tenant, PERIOD, "exceeded", usage_offset=2**62, emitted_at="2999-01-01T00:00:00+00:00"),
            ]
            bounds = []
            for value in variants:
                count = len(notices.seen)
                sent = await forge(connection, layout, tenant_period_key(*key), value)
                await notices.until(
                    lambda v=value, c=count: any(r.value == v for _, r in notices.seen[c:]),
                    10,
                    "the forged notice on the topic",
                )
                await notices.until(
                    lambda: is_ours(notices.latest_notice(tenant_period_key(*key)), aggregator, key),
                    10,
                    f"correction of {value[:60]!r}",
                )
                corrected_at = max(t for t, r in notices.seen if r.key == tenant_period_key(*key))
                bounds.append(corrected_at - sent)
            await asyncio.sleep(0.5)  # nothing churns afterwards
            assert is_ours(notices.latest_notice(tenant_period_key(*key)), aggregator, key)
            assert aggregator.running
            print(
                f"\ncorrection of forged notices (send -> corrected notice read back): "
                f"max {max(bounds):.3f}s, each {[round(b, 3) for b in bounds]}"
            )
            assert max(bounds) < CORRECTION_BOUND_S, bounds
    finally:
        await shutdown(aggregator)


async def test_forged_notice_for_a_key_not_held_is_tombstoned(
    connection, layout: TopicLayout, aggregator_config: AggregatorConfig
) -> None:  # type: ignore[no-untyped-def]
    config = replace(aggregator_config, reassert_interval_s=0.5)
    await ensure_topics(connection, layout)
    aggregator = await start_aggregator(config)
    try:
        async with Recorder(connection, layout.notices) as notices:
            await publish_usage(connection, layout, [ev("real-tenant", 10)])
            await eventually(lambda: ("real-tenant", PERIOD) in aggregator.state.totals, 20, "usage counted")
            forged_keys = [
                ("ghost-tenant", PERIOD),  # a tenant with no usage at all
                ("real-tenant", "2099-01"),  # a held tenant, a period it has no usage in
                ("ghost\u00e9", PERIOD),
            ]
            for tenant, period in forged_keys:
                await forge(
                    connection, layout, tenant_period_key(tenant, period), forged_notice(tenant, period, "exceeded")
                )
            for tenant, period in forged_keys:
                k = tenant_period_key(tenant, period)
                await notices.until(
                    lambda k=k: (r := notices.latest(k)) is not None and r.value is None, 10, f"tombstone of {k!r}"
                )
            await asyncio.sleep(1.2)  # two re-assertion intervals: no notice comes back for them
            for tenant, period in forged_keys:
                assert notices.latest(tenant_period_key(tenant, period)).value is None  # type: ignore[union-attr]
            assert aggregator.running
    finally:
        await shutdown(aggregator)


async def test_forged_totals_records_do_not_freeze_a_tenant_after_restart(
    connection, layout: TopicLayout, aggregator_config: AggregatorConfig
) -> None:  # type: ignore[no-untyped-def]
    tenant = "frozen-corp"
    key = (tenant, PERIOD)
    p = home(tenant)
    other = (p + 1) % PARTITIONS
    await ensure_topics(connection, layout)
    aggregator = await start_aggregator(aggregator_config)
    try:
        await publish_usage(connection, layout, [ev(tenant, 10) for _ in range(5)])
        await eventually(
            lambda: (t := aggregator.state.totals.get(key)) is not None and t.events == 5, 20, "usage counted"
        )
    finally:
        await shutdown(aggregator)

    def totals(**fields: object) -> bytes:
        record = {
            "tenant_id": tenant,
            "period_key": PERIOD,
            "used_tokens": 10**12,
            "event_count": 1,
            "limit_tokens": 1,
            "state": "exceeded",
            "usage_partition": p,
            "applied_offset": 2**62,
            "updated_at": datetime.now(UTC).isoformat(),
        }
        record.update(fields)
        TotalsRecord.model_validate_json(json.dumps(record))  # each one is a valid record on its own
        return json.dumps(record).encode()

    canonical = tenant_period_key(tenant, PERIOD)
    await send_records(
        connection,
        layout.totals,
        [
            RawRecord(canonical, totals(), partition=p),  # beyond the usage partition's end
            RawRecord(
                canonical, totals(usage_partition=other, applied_offset=3), partition=p
            ),  # claims another usage partition
            RawRecord(b'["frozen-corp", "2026-04"]', totals(applied_offset=4), partition=p),  # not the canonical key
        ],
    )
    aggregator = await start_aggregator(aggregator_config)
    try:
        assert aggregator.stats.changelog_rejected == 3
        assert (aggregator.state.totals[key].used, aggregator.state.totals[key].events) == (50, 5)
        await publish_usage(connection, layout, [ev(tenant, 7) for _ in range(4)])
        await eventually(lambda: aggregator.state.totals[key].events == 9, 20, "the tenant counting on")
        report = await verify(connection, layout, aggregator_config.group_id, wait_s=30)
        assert aggregator.running
    finally:
        await shutdown(aggregator)
    assert report.differences == [] and report.lag == 0
    assert report.changelog_rejected == Counter({"offset_beyond_end": 1, "wrong_partition": 1, "key_mismatch": 1})
    changelog = await read_changelog(connection, layout.totals, usage_ends=await end_offsets(connection, layout.usage))
    assert (changelog[key].used_tokens, changelog[key].event_count) == (78, 9)


async def test_forged_ok_with_huge_usage_offset_over_an_exceeded_tenant_is_reasserted(
    connection, layout: TopicLayout, aggregator_config: AggregatorConfig
) -> None:  # type: ignore[no-untyped-def]
    config = replace(aggregator_config, reassert_interval_s=0.3)
    tenant = "overdrawn"
    key = (tenant, PERIOD)
    k = tenant_period_key(*key)
    await ensure_topics(connection, layout)
    aggregator = await start_aggregator(config)
    try:
        async with Recorder(connection, layout.notices) as notices:
            await publish_usage(connection, layout, [ev(tenant, 600, quota_tokens=1_000) for _ in range(3)])
            await notices.until(
                lambda: (n := notices.latest_notice(k)) is not None and n["state"] == "exceeded", 20, "exceeded"
            )
            count = len(notices.seen)
            forged = forged_notice(
                tenant,
                PERIOD,
                "ok",
                used_tokens=0,
                limit_tokens=10**15,
                usage_offset=2**62,
                emitted_at="2999-01-01T00:00:00+00:00",
            )
            await forge(connection, layout, k, forged)
            await notices.until(
                lambda: any(r.value == forged for _, r in notices.seen[count:]), 10, "the forged notice"
            )
            await notices.until(lambda: is_ours(notices.latest_notice(k), aggregator, key), 5, "exceeded re-asserted")
            # And it keeps being re-asserted on the timer.
            after = len([r for _, r in notices.seen if r.key == k])
            await notices.until(
                lambda: len([r for _, r in notices.seen if r.key == k]) >= after + 2, 5, "re-assertions"
            )
            latest = notices.latest_notice(k)
            assert latest is not None and latest["state"] == "exceeded" and latest["used_tokens"] == 1_800
            assert aggregator.running
    finally:
        await shutdown(aggregator)


# --------------------------------------------------------------------------------------------
# Records aiokafka cannot parse, on the usage topic and on the notices topic
# --------------------------------------------------------------------------------------------


async def dead_letters_of(connection, layout: TopicLayout) -> dict[tuple[int, int], list[str]]:  # type: ignore[no-untyped-def]
    letters: dict[tuple[int, int], list[str]] = {}
    for letter in await read_topic(connection, layout.dead_letters):
        h = dict(letter.headers)
        at = (int(h["tokenguard.source.partition"]), int(h["tokenguard.source.offset"]))
        letters.setdefault(at, []).append(reason_of(letter))
    return letters


async def test_unreadable_record_is_dead_lettered_and_the_aggregator_goes_on(
    connection, layout: TopicLayout, aggregator_config: AggregatorConfig
) -> None:  # type: ignore[no-untyped-def]
    await ensure_topics(connection, layout)
    tenants = [tenant_on(p, PARTITIONS, "t-") for p in range(PARTITIONS)]
    aggregator = await start_aggregator(aggregator_config)
    try:
        await publish_usage(connection, layout, [ev(t, 10) for t in tenants])
        await eventually(lambda: sum(t.events for t in aggregator.state.totals.values()) == 3, 20, "first events")
        p = home(tenants[0])
        offset = await send_raw_header_record(
            connection, layout.usage, tenants[0].encode(), js(ev(tenants[0], 1_000)), p
        )
        await publish_usage(connection, layout, [ev(t, 5) for t in tenants for _ in range(2)])
        with contextlib.suppress(AssertionError):
            await eventually(
                lambda: not aggregator.running or sum(t.events for t in aggregator.state.totals.values()) == 9, 6
            )
        alive = aggregator.running
        report = await verify(connection, layout, aggregator_config.group_id, wait_s=3 if alive else 0)
    finally:
        await shutdown(aggregator)
    assert alive, "the aggregator died on a record aiokafka cannot parse"
    assert report.lag == 0 and report.differences == [], [str(d) for d in report.differences]
    assert await dead_letters_of(connection, layout) == {(p, offset): ["unreadable_record"]}


async def test_records_fetched_together_with_an_unreadable_record_all_count(
    connection, layout: TopicLayout, aggregator_config: AggregatorConfig
) -> None:  # type: ignore[no-untyped-def]
    """``python -m aggregator`` started over a backlog: its first fetch holds good records of every
    partition, then the unreadable one, then more (the records drained before the failure, on its
    partition and the others, must all be applied, in order)."""
    await ensure_topics(connection, layout)
    tenant = "acme"
    others = [tenant_on((home(tenant) + i) % PARTITIONS, PARTITIONS, "o-") for i in (1, 2)]
    await publish_usage(
        connection, layout, [ev(t, 1) for t in others for _ in range(3)] + [ev(tenant, 10) for _ in range(5)]
    )
    offset = await send_raw_header_record(
        connection, layout.usage, tenant.encode(), js(ev(tenant, 1_000)), home(tenant)
    )
    await publish_usage(connection, layout, [ev(tenant, 100) for _ in range(2)] + [ev(t, 2) for t in others])
    process = AggregatorProcess(aggregator_config)
    await process.start()
    try:
        report = await verify(connection, layout, aggregator_config.group_id, wait_s=10)
    finally:
        code = await process.terminate()
    assert code == 0, process.log_path.read_text()[-2000:]
    assert report.lag == 0
    assert report.differences == [], [str(d) for d in report.differences]
    assert report.events == 15 and report.invalid == {"unreadable_record": 1}
    assert await dead_letters_of(connection, layout) == {(home(tenant), offset): ["unreadable_record"]}


async def test_unreadable_record_on_a_quiet_topic_loses_nothing(
    connection, layout: TopicLayout, aggregator_config: AggregatorConfig
) -> None:  # type: ignore[no-untyped-def]
    """The other partitions stay empty: isolating the record must not be cut short by the poll's
    time bound (the records it already stepped over would be lost, or it would start over forever)."""
    await ensure_topics(connection, layout)
    tenant = "acme"
    await publish_usage(connection, layout, [ev(tenant, 10) for _ in range(5)])
    offset = await send_raw_header_record(
        connection, layout.usage, tenant.encode(), js(ev(tenant, 1_000)), home(tenant)
    )
    await publish_usage(connection, layout, [ev(tenant, 100) for _ in range(2)])
    aggregator = await start_aggregator(aggregator_config)
    try:
        report = await verify(connection, layout, aggregator_config.group_id, wait_s=8)
        alive = aggregator.running
    finally:
        await shutdown(aggregator)
    assert alive
    assert report.lag == 0, "the aggregator never got past the unreadable record"
    assert report.differences == [], [str(d) for d in report.differences]
    assert await dead_letters_of(connection, layout) == {(home(tenant), offset): ["unreadable_record"]}


async def test_two_adjacent_unreadable_records_are_both_reported(connection, layout: TopicLayout) -> None:  # type: ignore[no-untyped-def]
    await ensure_topics(connection, layout)
    topic, p = layout.usage, 0
    await send_records(connection, topic, [RawRecord(b"k", b"good-0", partition=p)])
    bad = [await send_raw_header_record(connection, topic, b"k", f"bad-{i}".encode(), p) for i in range(2)]
    await send_records(connection, topic, [RawRecord(b"k", b"good-1", partition=p)])
    consumer = AIOKafkaConsumer(**connection.client_kwargs(), group_id=None, auto_offset_reset="earliest")
    await start_consumer(consumer)
    try:
        tp = TopicPartition(topic, p)
        consumer.assign([tp])
        values, skipped = [], []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (await consumer.position(tp)) < bad[-1] + 2:
            records, unreadable = await getmany_safe(consumer, tp, timeout_ms=200)
            values += [r.value for r in records.get(tp, [])]
            skipped += [u.offset for u in unreadable]
    finally:
        await close_consumer(consumer)
    assert values == [b"good-0", b"good-1"]
    assert skipped == bad


async def test_notices_record_with_a_non_utf8_header_name_does_not_stop_aggregators(
    connection, layout: TopicLayout, aggregator_config: AggregatorConfig
) -> None:  # type: ignore[no-untyped-def]
    """Before start (read in the catch-up) and while running (read by the follower): either way the
    aggregator starts, and keeps correcting forged notices."""
    config = replace(aggregator_config, reassert_interval_s=120.0)
    tenant = "okay-corp"
    key = (tenant, PERIOD)
    k = tenant_period_key(*key)
    await ensure_topics(connection, layout)
    await send_raw_header_record(connection, layout.notices, k, forged_notice(tenant, PERIOD, "exceeded"), home(tenant))
    aggregator, error = await try_start(config)
    assert aggregator is not None, f"the aggregator cannot start: {error}"
    try:
        async with Recorder(connection, layout.notices) as notices:
            await publish_usage(connection, layout, [ev(tenant, 100, quota_tokens=10_000)])
            await eventually(lambda: key in aggregator.state.totals, 20, "usage counted")
            await send_raw_header_record(
                connection, layout.notices, k, forged_notice(tenant, PERIOD, "exceeded", limit_tokens=2), home(tenant)
            )
            await forge(connection, layout, k, forged_notice(tenant, PERIOD, "exceeded", limit_tokens=3))
            await notices.until(
                lambda: is_ours(notices.latest_notice(k), aggregator, key),
                10,
                "correction after the unparseable notice",
            )
            assert aggregator.running
    finally:
        await shutdown(aggregator)


# --------------------------------------------------------------------------------------------
# Notices keys and changelog records that pass the checks the rules list, and still do harm
# --------------------------------------------------------------------------------------------


async def test_forged_notice_key_with_a_lone_surrogate_does_not_kill_the_aggregator(
    connection, layout: TopicLayout, aggregator_config: AggregatorConfig
) -> None:  # type: ignore[no-untyped-def]
    config = replace(aggregator_config, reassert_interval_s=0.3)
    await ensure_topics(connection, layout)
    aggregator = await start_aggregator(config)
    try:
        await forge(connection, layout, b'["\\ud800","2026-04"]', forged_notice("x", PERIOD, "exceeded"))
        await asyncio.sleep(1.5)
        alive = aggregator.running
    finally:
        await shutdown(aggregator)
    restarted, error = await try_start(config)
    if restarted is not None:
        await shutdown(restarted)
    assert alive, "one forged notice record killed the aggregator"
    assert error is None, f"a new aggregator cannot start while the record is on the topic: {error}"


async def test_forged_totals_on_another_partition_does_not_freeze_a_tenant(
    connection, layout: TopicLayout, aggregator_config: AggregatorConfig
) -> None:  # type: ignore[no-untyped-def]
    tenant = "frozen-corp"
    key = (tenant, PERIOD)
    q = (home(tenant) + 1) % PARTITIONS
    await ensure_topics(connection, layout)
    await publish_usage(
        connection, layout, [ev(tenant, 10) for _ in range(3)] + [ev(tenant_on(q, PARTITIONS, "busy-"), 1) for _ in range(200)]
    )
    aggregator = await start_aggregator(aggregator_config)
    try:
        await eventually(
            lambda: (t := aggregator.state.totals.get(key)) is not None and t.events == 3, 20, "usage counted"
        )
    finally:
        await shutdown(aggregator)
    forged = TotalsRecord(
        tenant_id=tenant,
        period_key=PERIOD,
        used_tokens=10**12,
        event_count=1,
        limit_tokens=1,
        state="exceeded",
        usage_partition=q,
        applied_offset=199,
        updated_at=datetime.now(UTC),
    )
    await send_records(connection, layout.totals, [RawRecord(tenant_period_key(*key), encode(forged), partition=q)])
    aggregator = await start_aggregator(aggregator_config)
    try:
        await publish_usage(connection, layout, [ev(tenant, 7) for _ in range(4)])
        report = await verify(connection, layout, aggregator_config.group_id, wait_s=10)
    finally:
        await shutdown(aggregator)
    assert report.differences == [], "\n".join(map(str, report.differences))


# --------------------------------------------------------------------------------------------
# What a middleware ends up believing after the aggregator has policed a forged notice
# --------------------------------------------------------------------------------------------


async def test_middleware_blocks_again_after_a_forged_ok_with_a_huge_usage_offset(
    connection, layout: TopicLayout, aggregator_config: AggregatorConfig, producer_config: ProducerConfig
) -> None:  # type: ignore[no-untyped-def]
    config = replace(aggregator_config, reassert_interval_s=0.3)
    tenant = "overdrawn"
    await ensure_topics(connection, layout)
    aggregator = await start_aggregator(config)
    try:
        async with notices_feed(producer_config) as (feed, snapshot):
            await publish_usage(connection, layout, [ev(tenant, 600, quota_tokens=1_000) for _ in range(3)])
            await feed.wait_until(lambda s: (n := s.notice(tenant, PERIOD)) is not None and n.state == "exceeded", 20)
            await forge(
                connection,
                layout,
                tenant_period_key(tenant, PERIOD),
                forged_notice(tenant, PERIOD, "ok", used_tokens=0, limit_tokens=10**15, usage_offset=2**62),
            )
            await asyncio.sleep(1.5)  # the aggregator corrects, and re-asserts several times
            assert not snapshot.decide(tenant, PERIOD, 1_000).allowed, "the forged 'ok' still releases the tenant"
    finally:
        await shutdown(aggregator)


async def test_middleware_blocks_again_after_a_forged_ok_dated_ahead(
    connection, layout: TopicLayout, aggregator_config: AggregatorConfig, producer_config: ProducerConfig
) -> None:  # type: ignore[no-untyped-def]
    config = replace(aggregator_config, reassert_interval_s=0.3)
    tenant = "overdrawn"
    await ensure_topics(connection, layout)
    aggregator = await start_aggregator(config)
    try:
        async with notices_feed(producer_config) as (feed, snapshot):
            written = await publish_usage(connection, layout, [ev(tenant, 600, quota_tokens=1_000) for _ in range(3)])
            await feed.wait_until(
                lambda s: (
                    (n := s.notice(tenant, PERIOD)) is not None and n.state == "exceeded" and n.used_tokens == 1_800
                ),
                20,
            )
            ahead = datetime.fromtimestamp(time.time() + 50, UTC).isoformat()
            await forge(
                connection,
                layout,
                tenant_period_key(tenant, PERIOD),
                forged_notice(
                    tenant,
                    PERIOD,
                    "ok",
                    used_tokens=0,
                    limit_tokens=10**15,
                    usage_offset=written[-1][1],
                    emitted_at=ahead,
                ),
            )
            await feed.wait_until(lambda s: s.notice(tenant, PERIOD).aggregator_id == "forger", 5)  # type: ignore[union-attr]
            await asyncio.sleep(1.5)  # the aggregator corrects, and re-asserts several times
            assert not snapshot.decide(tenant, PERIOD, 1_000).allowed, "the forged 'ok' still releases the tenant"
    finally:
        await shutdown(aggregator)


async def test_middleware_drops_a_forged_notice_the_aggregator_tombstoned(
    connection, layout: TopicLayout, aggregator_config: AggregatorConfig, producer_config: ProducerConfig
) -> None:  # type: ignore[no-untyped-def]
    tenant = "ghost-tenant"
    k = tenant_period_key(tenant, PERIOD)
    await ensure_topics(connection, layout)
    # Usage of another tenant on the ghost's partition: the forged notice's offset is then a real one.
    await publish_usage(connection, layout, [ev(tenant_on(home(tenant), PARTITIONS, "neighbour-"), 1)])
    aggregator = await start_aggregator(aggregator_config)
    try:
        async with (
            notices_feed(producer_config) as (feed, snapshot),
            Recorder(connection, layout.notices) as notices,
        ):
            await forge(connection, layout, k, forged_notice(tenant, PERIOD, "exceeded", usage_offset=0))
            await notices.until(lambda: (r := notices.latest(k)) is not None and r.value is None, 10, "tombstone")
            await asyncio.sleep(1.5)  # past the feed's end-offset check of held notices (at most once a second)
            assert not feed.ignored, f"the forged notice was not even believable: {feed.ignored}"
            assert snapshot.decide(tenant, PERIOD, 1_000).allowed, (
                "the tombstoned forged 'exceeded' still blocks the tenant"
            )
    finally:
        await shutdown(aggregator)
