"""One agent process of the demo fleet: real Agent Framework agents behind TokenGuardMiddleware.

Run by ``fleet_demo.py``; prints one JSON line with what it allowed, blocked and spent per tenant.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent_framework import Agent

from producer import (
    KafkaConnection,
    KafkaQuotaStore,
    ProducerConfig,
    QuotaExceededError,
    TokenGuardMiddleware,
    tenant_scope,
)
from producer.scripted import ScriptedChatClient
from schemas.topics import TopicLayout

SPOOL_DIR = Path(__file__).resolve().parent.parent / ".cache" / "demo" / "spool"

async def run(args: argparse.Namespace) -> dict:
    limits: dict[str, int] = json.loads(args.tenants)
    config = ProducerConfig(
        connection=KafkaConnection(bootstrap_servers=args.bootstrap_servers),
        topics=TopicLayout(prefix=args.topic_prefix, partitions=args.partitions),
        instance_id=args.instance,
        create_topics=False,
        spool_dir=SPOOL_DIR,
    )
    rng = random.Random(args.seed)
    tally = {tenant: {"allowed": 0, "blocked": 0, "tokens": 0, "streamed": 0} for tenant in limits}

    def on_usage(record: dict) -> None:
        tally[record["user_id"]]["tokens"] += record["total_tokens"]

    async with KafkaQuotaStore(config) as store:
        agents = {
            tenant: Agent(
                ScriptedChatClient(model="scripted-gpt", reply_words=(20, 120), latency_s=args.latency, seed=rng.random()),
                name=f"{tenant}-assistant",
                middleware=[TokenGuardMiddleware(quota_store=store, quota_tokens=limit, on_usage=on_usage)],
            )
            for tenant, limit in limits.items()
        }
        tenants = list(limits)
        deadline = time.monotonic() + args.duration

        async def worker(worker_rng: random.Random) -> None:
            while time.monotonic() < deadline:
                tenant = worker_rng.choice(tenants)
                streaming = worker_rng.random() < 0.3
                try:
                    with tenant_scope(tenant):
                        if streaming:
                            stream = agents[tenant].run("Summarise the quarter's usage.", stream=True)
                            async for _ in stream:
                                pass
                            await stream.get_final_response()
                            tally[tenant]["streamed"] += 1
                        else:
                            await agents[tenant].run("What is our token budget?")
                    tally[tenant]["allowed"] += 1
                except QuotaExceededError:
                    tally[tenant]["blocked"] += 1
                    await asyncio.sleep(args.latency)  # a blocked user retries after a moment

        await asyncio.gather(*(worker(random.Random(rng.random())) for _ in range(args.concurrency)))
        published = store.publisher.stats.published
    return {"instance": args.instance, "published": published, "tenants": tally}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bootstrap-servers", required=True)
    parser.add_argument("--topic-prefix", required=True)
    parser.add_argument("--partitions", type=int, default=3)
    parser.add_argument("--instance", required=True)
    parser.add_argument("--tenants", required=True, help='JSON {"tenant": limit}')
    parser.add_argument("--duration", type=float, default=12.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--latency", type=float, default=0.02, help="simulated LLM latency, seconds")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    print(json.dumps(asyncio.run(run(args))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
