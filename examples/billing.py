"""A billing consumer: replay the usage topic, price every event, write cost per tenant and model.

Uses the verifier's code path (``aggregator.verify.Recompute``): the same validation as the
aggregator, and each event id counted once, so a replay after duplicates bills exactly.

    python examples/billing.py --prices prices.json --out costs.csv [--bootstrap-servers ...] [--since 2026-11-01]

``prices.json`` maps a model to USD per million input and output tokens, with ``"*"`` as fallback:
``{"gpt-4o": {"input": 2.5, "output": 10.0}, "*": {"input": 1.0, "output": 2.0}}``.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import sys
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aggregator.changelog import read_ranges
from aggregator.verify import Recompute
from schemas.topics import DEFAULT_PREFIX, TopicLayout
from transport.admin import topic_partitions
from transport.connection import KafkaConnection

Prices = dict[str, dict[str, float]]


def price(prices: Prices, model: str | None, input_tokens: int, output_tokens: int) -> float:
    rate = prices.get(model or "", prices.get("*"))
    if rate is None:
        raise KeyError(f"no price for model {model!r} and no '*' fallback")
    return (input_tokens * rate["input"] + output_tokens * rate["output"]) / 1_000_000


async def bill(connection: KafkaConnection, layout: TopicLayout, prices: Prices, since: datetime | None) -> list[dict]:
    partitions = await topic_partitions(connection, layout.usage)
    recompute = Recompute(len(partitions))
    rows: dict[tuple[str, str, str], dict] = defaultdict(
        lambda: {"events": 0, "input_tokens": 0, "output_tokens": 0, "total_tokens": 0, "cost_usd": 0.0}
    )
    ranges = {p: (None, None) for p in partitions}
    async for records in read_ranges(connection, layout.usage, ranges, on_unreadable=recompute.unreadable):
        for record in records:
            event = recompute.add(record)
            if event is None or (since is not None and event.event_time < since):
                continue
            inp = event.input_tokens or 0
            out = event.output_tokens if event.output_tokens is not None else event.total_tokens - inp
            row = rows[(event.tenant_id, event.period_key, event.model or "")]
            row["events"] += 1
            row["input_tokens"] += inp
            row["output_tokens"] += out
            row["total_tokens"] += event.total_tokens
            row["cost_usd"] += price(prices, event.model, inp, out)
    if recompute.invalid:
        print(f"skipped invalid records (the aggregator dead-letters them): {dict(recompute.invalid)}", file=sys.stderr)
    return [{"tenant": t, "period": p, "model": m, **figures, "cost_usd": round(figures["cost_usd"], 6)}
            for (t, p, m), figures in sorted(rows.items())]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prices", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--bootstrap-servers", default=os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092"))
    parser.add_argument("--topic-prefix", default=os.environ.get("TOKENGUARD_TOPIC_PREFIX", DEFAULT_PREFIX))
    parser.add_argument("--since", type=datetime.fromisoformat, help="only events at or after this time (UTC if naive)")
    args = parser.parse_args()
    since = args.since.replace(tzinfo=args.since.tzinfo or UTC) if args.since else None
    rows = asyncio.run(bill(KafkaConnection(bootstrap_servers=args.bootstrap_servers),
                            TopicLayout(prefix=args.topic_prefix), json.loads(args.prices.read_text()), since))
    with open(args.out, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=["tenant", "period", "model", "events", "input_tokens",
                                                   "output_tokens", "total_tokens", "cost_usd"])
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {len(rows)} rows to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
