"""Cross-tenant isolation on the pure layer (no broker): nothing tenant B writes changes tenant A.

Records are fed exactly as the service feeds them: ``aggregator.intake.accept`` decides whether a
record counts (else it is dead-lettered and only marks the position), ``TotalsState.apply`` counts
it. Tenant B's records may use any key of B's, claim B or A in the value, reuse A's event ids with
any content, carry any ``ce_id`` header and sit on any partition, including A's. A restart (state
rebuilt from its own changelog records and from the accepted records, as ``recovery`` does) may
fall anywhere in the sequence. A's totals must equal those of A's records fed alone.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aggregator.intake import accept, expected_partition
from aggregator.state import Limits, Outcome, TotalsState
from schemas.errors import DecodeError
from schemas.usage import UsageEvent
from schemas.wire import encode
from tests.helpers import FakeRecord, tenant_on

PARTITIONS = 3
A = "tenant-a"
A_HOME = expected_partition(A.encode(), PARTITIONS)


# B on A's partition (shares its dedup window and offsets), B elsewhere, and Bs that look like A.
B_TENANTS = [
    tenant_on(A_HOME, PARTITIONS, "b-same-"),
    tenant_on((A_HOME + 1) % PARTITIONS, PARTITIONS, "b-other-"),
    "tenant-a ",
    "Tenant-a",
    "tenant-\u0430",  # Cyrillic a
    '["tenant-a","2026-04"]',
]
A_IDS = [f"aid{i:08d}" for i in range(8)]
PERIODS = ["2026-04", "2026-05"]
T0 = datetime(2026, 4, 1, tzinfo=UTC)


def event(tenant: str, event_id: str, tokens: int, period: str, quota: int = 1_000) -> UsageEvent:
    return UsageEvent(
        event_id=event_id,
        tenant_id=tenant,
        period_key=period,
        total_tokens=tokens,
        quota_tokens=quota,
        event_time=T0,
        instance_id="prop",
    )


def a_stream(picks: list[tuple[int, int, int]]) -> list[tuple[FakeRecord, UsageEvent | None]]:
    """A's own records: unique ids with some exact re-sends (at-least-once). (record, event if it counts)."""
    out: list[tuple[FakeRecord, UsageEvent | None]] = []
    sent: dict[str, UsageEvent] = {}
    for index, tokens, period in picks:
        event_id = A_IDS[index]
        if event_id in sent:
            e, counts = sent[event_id], None  # an exact duplicate of what was sent
        else:
            e = sent[event_id] = event(A, event_id, tokens, PERIODS[period])
            counts = e
        out.append((FakeRecord(A_HOME, A.encode(), encode(e), [("ce_id", event_id.encode())]), counts))
    return out


ids = st.one_of(st.sampled_from(A_IDS), st.from_regex(r"[A-Za-z0-9_-]{8,12}", fullmatch=True))
headers = st.one_of(
    st.just([]),
    st.builds(lambda i: [("ce_id", i.encode())], ids),
    st.just([("ce_id", None)]),
    st.builds(lambda i: [("ce_id", i.encode()), ("ce_id", b"x")], ids),
)


@st.composite
def b_record(draw: st.DrawFn) -> FakeRecord:
    b = draw(st.sampled_from(B_TENANTS))
    event_id = draw(ids)
    tokens = draw(st.integers(0, 100_000_000))
    period = draw(st.sampled_from(PERIODS))
    claims = draw(st.sampled_from(["b", "a"]))  # whom the value names
    value_tenant = b if claims == "b" else A
    value = encode(event(value_tenant, event_id, tokens, period, quota=draw(st.integers(0, 10**6))))
    shape = draw(st.sampled_from(["plain", "extra", "garbage", "none", "raw_json"]))
    if shape == "extra":
        value = value[:-1] + b',"tenant_id_2":"tenant-a","total_tokens_":1}'
    elif shape == "garbage":
        value = draw(st.binary(max_size=64))
    elif shape == "none":
        value = None
    elif shape == "raw_json":
        value = json.dumps(
            draw(
                st.dictionaries(
                    st.sampled_from(["tenant_id", "event_id", "total_tokens"]), st.sampled_from([A, b, 5, -1, None])
                )
            )
        ).encode()
    # Keyed B (or unkeyed), whatever the value says; or keyed A while the value claims B.
    keys = [b.encode(), None]
    if claims == "b" and shape in ("plain", "extra"):
        keys.append(A.encode())
    key = draw(st.sampled_from(keys))
    return FakeRecord(draw(st.integers(0, PARTITIONS - 1)), key, value, draw(headers))


class Feeder:
    """The service's per-record path over the pure layer, with offsets per partition."""

    def __init__(self) -> None:
        self.state = TotalsState(Limits())
        self.next_offset = dict.fromkeys(range(PARTITIONS), 0)
        self.accepted: dict[int, list[UsageEvent]] = {p: [] for p in range(PARTITIONS)}

    def feed(self, record: FakeRecord) -> Outcome | None:
        offset = self.next_offset[record.partition]
        self.next_offset[record.partition] += 1
        try:
            e = accept(record, PARTITIONS)
        except DecodeError:
            self.state.mark_position(record.partition, offset)
            return None
        self.accepted[record.partition].append(e)
        return self.state.apply(record.partition, offset, e)

    def restart(self) -> None:
        """A new process: totals from the changelog records the old one would have written, the
        dedup window from the accepted usage records (as ``recovery.restore`` does)."""
        old = self.state
        self.state = TotalsState(Limits())
        for key, totals in old.totals.items():
            self.state.restore(old.to_record(key, totals, T0))
        for partition, events in self.accepted.items():
            self.state.remember(partition, events)
        for partition, offset in old.partition_offsets.items():
            self.state.mark_position(partition, offset)


def a_view(state: TotalsState) -> dict[tuple[str, str], tuple[int, int, str, int, int]]:
    return {key: (t.used, t.events, t.state, t.limit, t.partition) for key, t in state.totals.items() if key[0] == A}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    a_picks=st.lists(
        st.tuples(st.integers(0, len(A_IDS) - 1), st.integers(0, 5_000), st.integers(0, 1)), min_size=1, max_size=12
    ),
    script=st.lists(st.one_of(b_record(), st.just("A"), st.just("restart")), max_size=60),
)
def test_no_sequence_of_tenant_b_records_changes_tenant_a_totals(a_picks, script) -> None:  # type: ignore[no-untyped-def]
    ours = a_stream(a_picks)

    alone = Feeder()
    for record, _ in ours:
        alone.feed(record)

    mixed = Feeder()
    pending = list(ours)
    for step in script:
        if step == "A":
            if pending:
                mixed.feed(pending.pop(0)[0])
        elif step == "restart":
            mixed.restart()
        else:
            mixed.feed(step)
    for record, _ in pending:
        mixed.feed(record)

    # Independent sum of A's counted events.
    expected: dict[tuple[str, str], list[int]] = {}
    for _, counted in ours:
        if counted is not None:
            slot = expected.setdefault((A, counted.period_key), [0, 0])
            slot[0] += counted.total_tokens
            slot[1] += 1
    assert {k: (v[0], v[1]) for k, v in a_view(alone.state).items()} == {k: tuple(v) for k, v in expected.items()}
    assert a_view(mixed.state) == a_view(alone.state)


def test_b_reusing_a_id_on_a_partition_first_does_not_drop_a_event() -> None:
    """The pointed case: B publishes A's next event id first, on A's own partition."""
    b = B_TENANTS[0]
    feeder = Feeder()
    stolen = event(b, A_IDS[0], 999, PERIODS[0])
    assert feeder.feed(FakeRecord(A_HOME, b.encode(), encode(stolen), [("ce_id", A_IDS[0].encode())])) is Outcome.APPLIED
    mine = event(A, A_IDS[0], 10, PERIODS[0])
    assert feeder.feed(FakeRecord(A_HOME, A.encode(), encode(mine), [("ce_id", A_IDS[0].encode())])) is Outcome.APPLIED
    assert feeder.state.totals[(A, PERIODS[0])].used == 10
