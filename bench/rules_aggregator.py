"""The aggregator's core with 0, 1 and 3 quota rules counting every event.

The figure is pure ``TotalsState.apply`` over N pre-decoded ``UsageEvent``s (no broker, no
decoding, no changelog or notices: the part of the aggregator's work that rules add to). Each
variant is a fresh ``TotalsState`` whose ``Limits.rules`` holds 0, 1 or 3 default rules (every
tenant counted apart; windows day, month and hour, total tokens, all matching every event); the
variants alternate within each round, order rotated each round, so drift hits all alike. Reported:
events per second (median of rounds) and the ratio of each to the 0-rule figure.

    python bench/rules_aggregator.py                      # 100,000 events over 10,000 tenants, 7 rounds
    python bench/rules_aggregator.py --events 20000 --rounds 3
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import time
from datetime import UTC, datetime

from _common import REPO, emit, median

from aggregator.state import Limits, Outcome, TotalsState
from schemas.policy import QuotaRule
from schemas.usage import UsageEvent


def head() -> str:
    """The commit measured (the working tree may differ: say so when it does)."""
    import subprocess

    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()


RULE_COUNTS = (0, 1, 3)
WINDOWS = ("day", "month", "hour")
EPOCH = datetime(2020, 1, 1, tzinfo=UTC)
RESULTS = REPO / "bench" / "results" / "rules_aggregator.json"


def make_events(count: int, tenants: int) -> list[UsageEvent]:
    rng = random.Random(1)
    now = datetime.now(UTC)
    return [
        UsageEvent(
            event_id=f"bench{i:012d}", tenant_id=f"tenant-{rng.randrange(tenants):05d}", period_key="2026-11",
            model="m", input_tokens=40, output_tokens=60, total_tokens=100, quota_tokens=10**9,
            event_time=now, instance_id="bench",
        )
        for i in range(count)
    ]


def state_with(rules: int) -> TotalsState:
    limits = Limits()
    now = datetime.now(UTC)
    for i in range(rules):
        limits.rules.set(QuotaRule(name=f"r{i}", tenant_id=None, window=WINDOWS[i], limit=10**15,  # type: ignore[arg-type]
                                   effective_from=EPOCH, updated_at=now))
    return TotalsState(limits)


def run(events: list[UsageEvent], rules: int) -> float:
    """Events per second applying ``events`` to a fresh state with ``rules`` default rules."""
    state = state_with(rules)
    apply = state.apply
    gc.collect()
    started = time.perf_counter()
    for offset, event in enumerate(events):
        apply(0, offset, event)
    elapsed = time.perf_counter() - started
    assert len(state.totals) > 0 and apply(0, 0, events[0]) is Outcome.REPLAY
    keys_per_tenant = len(state.totals) / len({e.tenant_id for e in events})
    assert abs(keys_per_tenant - (1 + rules)) < 1e-9, keys_per_tenant
    return len(events) / elapsed


def main(count: int, tenants: int, rounds: int) -> None:
    events = make_events(count, tenants)
    names = [f"rules_{n}" for n in RULE_COUNTS]
    for n in RULE_COUNTS:  # warm up
        run(events[: count // 10], n)
    eps: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(rounds):
        order = RULE_COUNTS[round_ % 3:] + RULE_COUNTS[: round_ % 3]
        for n in order:
            eps[f"rules_{n}"].append(run(events, n))
        print(f"round {round_ + 1}: " + ", ".join(f"{name} {eps[name][-1]:,.0f}/s" for name in names), flush=True)
    med = {name: median(values) for name, values in eps.items()}
    # Per-round ratios (same round, same conditions), then their median.
    ratio = {name: median([a / b for a, b in zip(eps[name], eps["rules_0"], strict=True)]) for name in names}
    us = {name: 1e6 / med[name] for name in names}
    print("\n| rules per event | events/s (median) | us per event | throughput vs 0 rules (median of per-round ratios) |")
    print("|---|---|---|---|")
    for n, name in zip(RULE_COUNTS, names, strict=True):
        print(f"| {n} | {med[name]:,.0f} | {us[name]:.2f} | {ratio[name]:.2f} |")
    per_rule = (us["rules_3"] - us["rules_0"]) / 3
    print(f"\n{count:,} events over {tenants:,} tenants, {rounds} rounds; each rule adds {per_rule:.2f} us per event "
          "(pure TotalsState.apply, events pre-decoded)")
    figures = {
        "bench": "rules_aggregator", "commit": head(), "events": count, "tenants": tenants, "rounds": rounds,
        "scope": "TotalsState.apply only, pre-decoded events, default rules",
        **{f"{name}_eps": round(med[name]) for name in names},
        **{f"{name}_us_per_event": round(us[name], 3) for name in names},
        **{f"{name}_throughput_ratio_to_0": round(ratio[name], 3) for name in names},
        "per_rule_us": round(per_rule, 3),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(figures, indent=2) + "\n")
    emit(figures)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--tenants", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    main(args.events, args.tenants, args.rounds)
