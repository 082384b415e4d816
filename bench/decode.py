"""Decoding alone, pydantic against the compiled decoders, side by side in one run.

The aggregator decodes every usage record (``schemas.wire.decode_usage_record``) and a restore
every changelog record (``schemas.wire.decode_totals``). Each round times both decoders over the
same values, in alternating order, and reports microseconds per record of the process's CPU time
(on a machine shared with other work, wall time would count theirs too; the wall figures are in
the JSON as well); the figures are the medians over rounds, and the ratio pydantic / compiled. No broker: values are built in memory,
usage events as ``bench/pipeline.py`` makes them, encoded as the publisher does
(``schemas.wire.encode_usage``), and totals records as the aggregator's changelog writes them
(``schemas.wire.encode_fields``).

    python bench/decode.py            # 100,000 values of each, 5 rounds
    python bench/decode.py --quick    # 20,000 values, 3 rounds
"""

from __future__ import annotations

import argparse
import gc
import random
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from _common import emit, median, save_results
from pipeline import make_events

from schemas.errors import DecodeError
from schemas.wire import (
    decode_totals,
    decode_totals_model,
    decode_usage,
    decode_usage_record,
    encode_fields,
    encode_usage,
    totals_model,
    usage_model,
)


def pydantic_usage_record(key: bytes | None, value: bytes | None) -> Any:
    """``decode_usage_record`` as it was before the compiled decoder: the model, then the key."""
    event = decode_usage(value)
    if key != event.tenant_id.encode():
        raise DecodeError("key_mismatch", "")
    return event


def usage_values(count: int) -> list[tuple[bytes, bytes]]:
    return [(event.tenant_id.encode(), encode_usage(event)) for event in make_events(count)]


def totals_values(count: int) -> list[bytes]:
    """Changelog records of ``count`` tenant-periods, with the spread of values a real one has."""
    rng = random.Random(2)
    now = datetime.now(UTC)
    values = []
    for i in range(count):
        used = rng.randrange(10**9)
        values.append(encode_fields({
            "tenant_id": f"tenant-{i:07d}", "period_key": "2026-11", "used_tokens": used,
            "event_count": used // 100 + 1, "limit_tokens": 10**9, "state": rng.choice(("ok", "ok", "warning", "exceeded")),
            "usage_partition": i % 6, "applied_offset": rng.randrange(10**7),
            "updated_at": now - timedelta(microseconds=rng.randrange(10**9)),
            "event_quota_tokens": 10**9, "first_offset": rng.randrange(10**6),
        }))
    return values


def per_record_us(run: Callable[[], None], count: int) -> tuple[float, float]:
    """(CPU, wall) microseconds per record."""
    gc.collect()
    cpu, wall = time.process_time(), time.perf_counter()
    run()
    return (time.process_time() - cpu) / count * 1e6, (time.perf_counter() - wall) / count * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="20,000 values of each, 3 rounds")
    parser.add_argument("--count", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None)
    args = parser.parse_args()
    count = args.count or (20_000 if args.quick else 100_000)
    rounds = args.rounds or (3 if args.quick else 5)

    usage = usage_values(count)
    totals = totals_values(count)
    # Both decoders agree on every value before anything is timed.
    for key, value in usage[:1000]:
        assert pydantic_usage_record(key, value) == usage_model(decode_usage_record(key, value))
    for value in totals[:1000]:
        assert decode_totals_model(value) == totals_model(decode_totals(value))

    def usage_pydantic() -> None:
        for key, value in usage:
            pydantic_usage_record(key, value)

    def usage_compiled() -> None:
        for key, value in usage:
            decode_usage_record(key, value)

    def totals_pydantic() -> None:
        for value in totals:
            decode_totals_model(value)

    def totals_compiled() -> None:
        for value in totals:
            decode_totals(value)

    pairs = {"usage": (usage_pydantic, usage_compiled), "totals": (totals_pydantic, totals_compiled)}
    timings: dict[str, dict[str, list[float]]] = {name: {"pydantic": [], "compiled": []} for name in pairs}
    walls: dict[str, dict[str, list[float]]] = {name: {"pydantic": [], "compiled": []} for name in pairs}
    for round_ in range(rounds):
        for name, (pydantic_run, compiled_run) in pairs.items():
            order = [("pydantic", pydantic_run), ("compiled", compiled_run)]
            if round_ % 2:
                order.reverse()
            for label, run in order:
                cpu, wall = per_record_us(run, count)
                timings[name][label].append(cpu)
                walls[name][label].append(wall)
        print(f"round {round_ + 1}/{rounds}: " + ", ".join(
            f"{name} {t['pydantic'][-1]:.2f} -> {t['compiled'][-1]:.2f} us" for name, t in timings.items()), flush=True)

    figures: dict[str, object] = {"values": count, "rounds": rounds}
    for name, t in timings.items():
        slow, fast = median(t["pydantic"]), median(t["compiled"])
        figures |= {
            f"{name}_pydantic_us": round(slow, 3), f"{name}_compiled_us": round(fast, 3), f"{name}_ratio": round(slow / fast, 2),
            f"{name}_compiled_records_per_s": round(1e6 / fast),
            f"{name}_pydantic_wall_us": round(median(walls[name]["pydantic"]), 3),
            f"{name}_compiled_wall_us": round(median(walls[name]["compiled"]), 3),
        }
    print(f"usage record: pydantic {figures['usage_pydantic_us']} us, compiled {figures['usage_compiled_us']} us "
          f"({figures['usage_ratio']}x); totals record: pydantic {figures['totals_pydantic_us']} us, "
          f"compiled {figures['totals_compiled_us']} us ({figures['totals_ratio']}x)  [CPU time, medians of {rounds} rounds]")
    save_results("decode_quick" if args.quick else "decode", figures)
    emit(figures)


if __name__ == "__main__":
    main()
