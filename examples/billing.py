"""A billing consumer: replay the usage topic, price every event, write cost per tenant and model.

Uses the verifier's code path (``aggregator.verify.Recompute``): the same validation as the
aggregator, and each event id counted once, so a replay after duplicates bills exactly.

    python examples/billing.py --out costs.csv [--prices prices.json] [--bootstrap-servers ...] [--since 2026-11-01]

Prices come from the deployment's price table (``tokenguard prices set``, on the limits topic),
each event priced at the version in force at its ``event_time`` by ``PriceTable.cost_of``: the
computation the aggregator counts with, so these integers (``cost_micros``) are its integers.
Rows are per tenant, period, model and currency; the cost per tenant and currency is printed, with
the tokens priced at the ``"*"`` default and those with no price at all flagged. Closed periods
are printed as the sealing model bills them (``closed_periods``): the sealed total, then the
adjustments that came after it.

``--prices`` (optional, the example's former price list) adds a float ``cost_usd`` column from a
file mapping a model to USD per million input and output tokens, ``"*"`` as fallback:
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

from aggregator.changelog import read_ranges, read_sealed
from aggregator.cli.prices import read_prices, units
from aggregator.verify import Recompute
from schemas.prices import PriceTable
from schemas.topics import DEFAULT_PREFIX, TopicLayout
from transport.admin import topic_partitions
from transport.connection import KafkaConnection

Prices = dict[str, dict[str, float]]


def price(prices: Prices, model: str | None, input_tokens: int, output_tokens: int) -> float:
    rate = prices.get(model or "", prices.get("*"))
    if rate is None:
        raise KeyError(f"no price for model {model!r} and no '*' fallback")
    return (input_tokens * rate["input"] + output_tokens * rate["output"]) / 1_000_000


FIELDS = ["tenant", "period", "model", "currency", "events", "input_tokens", "output_tokens", "total_tokens",
          "cost_micros", "default_priced_tokens", "unpriced_tokens", "cost_usd"]


async def bill(connection: KafkaConnection, layout: TopicLayout, prices: Prices | None, since: datetime | None,
               table: PriceTable | None = None) -> list[dict]:
    if table is None:
        table, skipped = await read_prices(connection, layout)
        if skipped:
            print(f"skipped unreadable price records: {dict(skipped)}", file=sys.stderr)
    partitions = await topic_partitions(connection, layout.usage)
    recompute = Recompute(len(partitions))
    rows: dict[tuple[str, str, str, str], dict] = defaultdict(
        lambda: {"events": 0, "input_tokens": 0, "output_tokens": 0, "total_tokens": 0, "cost_micros": 0,
                 "default_priced_tokens": 0, "unpriced_tokens": 0, "cost_usd": 0.0}
    )
    ranges = {p: (None, None) for p in partitions}
    async for records in read_ranges(connection, layout.usage, ranges, on_unreadable=recompute.unreadable):
        for record in records:
            event = recompute.add(record)
            if event is None or (since is not None and event.event_time < since):
                continue
            inp = event.input_tokens or 0
            out = event.output_tokens if event.output_tokens is not None else event.total_tokens - inp
            cost = table.cost_of(event)
            row = rows[(event.tenant_id, event.period_key, event.model or "", cost.currency or "")]
            row["events"] += 1
            row["input_tokens"] += inp
            row["output_tokens"] += out
            row["total_tokens"] += event.total_tokens
            row["cost_micros"] += cost.micros
            if cost.priced != "exact":
                row["default_priced_tokens" if cost.priced == "default" else "unpriced_tokens"] += event.total_tokens
            if prices is not None:
                row["cost_usd"] += price(prices, event.model, inp, out)
    if recompute.invalid:
        print(f"skipped invalid records (the aggregator dead-letters them): {dict(recompute.invalid)}", file=sys.stderr)
    return [{"tenant": t, "period": p, "model": m, "currency": c, **figures,
             "cost_usd": round(figures["cost_usd"], 6) if prices is not None else ""}
            for (t, p, m, c), figures in sorted(rows.items())]


def summary(rows: list[dict]) -> list[str]:
    """Cost per tenant and currency, then the tokens of each tenant not priced at their own model's price."""
    costs: dict[tuple[str, str], int] = defaultdict(int)
    flagged: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for row in rows:
        if row["currency"]:
            costs[(row["tenant"], row["currency"])] += row["cost_micros"]
        flagged[row["tenant"]][0] += row["default_priced_tokens"]
        flagged[row["tenant"]][1] += row["unpriced_tokens"]
    lines = [f"cost {tenant} {currency} {units(micros)} ({micros} micros)" for (tenant, currency), micros in sorted(costs.items())]
    for tenant, (default, unpriced) in sorted(flagged.items()):
        if default:
            lines.append(f"flag {tenant}: {default} tokens priced at the '*' default price")
        if unpriced:
            lines.append(f"flag {tenant}: {unpriced} tokens unpriced (no price for their model and no '*')")
    return lines


async def closed_periods(connection: KafkaConnection, layout: TopicLayout) -> list[str]:
    """The bill of each closed tenant-period as the sealing model gives it: its sealed total (the
    events the usage topic took by its seal time) and, after it, one line per late event (an
    adjustment). Both are on the sealed topic; the usage topic above holds every event too."""
    sealed, adjustments = await read_sealed(connection, layout.sealed)
    lines = []
    for key in sorted(set(sealed) | set(adjustments)):
        closed, late = sealed.get(key), adjustments.get(key, {})
        total = f"{closed.used_tokens} tokens in {closed.event_count} events" if closed else "no sealed total"
        lines.append(f"closed {key[0]} {key[1]}: sealed {total}; {len(late)} adjustments, {sum(late.values())} tokens")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prices", type=Path, help="optional: a float price list for the cost_usd column")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--bootstrap-servers", default=os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092"))
    parser.add_argument("--topic-prefix", default=os.environ.get("TOKENGUARD_TOPIC_PREFIX", DEFAULT_PREFIX))
    parser.add_argument("--since", type=datetime.fromisoformat, help="only events at or after this time (UTC if naive)")
    args = parser.parse_args()
    since = args.since.replace(tzinfo=args.since.tzinfo or UTC) if args.since else None
    rows = asyncio.run(bill(KafkaConnection(bootstrap_servers=args.bootstrap_servers),
                            TopicLayout(prefix=args.topic_prefix),
                            json.loads(args.prices.read_text()) if args.prices else None, since))
    with open(args.out, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    for line in summary(rows):
        print(line)
    for line in asyncio.run(closed_periods(KafkaConnection(bootstrap_servers=args.bootstrap_servers),
                                           TopicLayout(prefix=args.topic_prefix))):
        print(line)
    print(f"wrote {len(rows)} rows to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
