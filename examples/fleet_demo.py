"""The demo: a real broker, the aggregator in its own process, and a fleet of agent processes.

``make demo`` runs this. It starts the local Kafka broker (unless ``KAFKA_BOOTSTRAP_SERVERS`` is
set), the aggregator, and ``--agents`` agent processes that call real Agent Framework agents for
several tenants with small limits. A live table shows each tenant's totals as the aggregator
publishes them; the summary checks the aggregator's totals against the sum of the fleet's events.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from rich.console import Console  # noqa: E402
from rich.live import Live  # noqa: E402
from rich.table import Table  # noqa: E402

import localkafka  # noqa: E402
from localkafka.launcher import DEFAULT_PORT  # noqa: E402
from producer import KafkaConnection, ensure_topics  # noqa: E402
from schemas.notices import Heartbeat  # noqa: E402
from schemas.topics import TopicLayout  # noqa: E402
from schemas.totals import TotalsRecord  # noqa: E402
from schemas.wire import decode_notice, decode_totals  # noqa: E402
from transport.follower import TopicFollower  # noqa: E402

TENANTS = {
    "initech": 40_000,
    "acme": 100_000,
    "globex": 250_000,
    "hooli": 400_000,
    "umbrella": 2_000_000,
    "stark": 5_000_000,
}

console = Console(width=max(110, Console().width))


class Watcher:
    """Follows the totals changelog and the notices topic, as an operator's dashboard would."""

    def __init__(self, connection: KafkaConnection, layout: TopicLayout) -> None:
        self.totals: dict[str, TotalsRecord] = {}
        self.heartbeats = 0
        self.notices = 0
        self._followers = [
            TopicFollower(connection, layout.totals, self._take_totals, client_id="demo-totals"),
            TopicFollower(connection, layout.notices, self._take_notices, client_id="demo-notices"),
        ]

    async def start(self) -> None:
        for follower in self._followers:
            await follower.start()

    async def stop(self) -> None:
        for follower in self._followers:
            await follower.stop()

    async def _take_totals(self, records: list) -> None:  # type: ignore[type-arg]
        for record in records:
            totals = decode_totals(record.value)
            self.totals[totals.tenant_id] = totals

    async def _take_notices(self, records: list) -> None:  # type: ignore[type-arg]
        for record in records:
            if isinstance(decode_notice(record.value), Heartbeat):
                self.heartbeats += 1
            else:
                self.notices += 1


def live_table(watcher: Watcher, elapsed: float) -> Table:
    table = Table(title=f"TokenGuard fleet, {elapsed:4.1f}s: aggregator totals per tenant (this period)")
    for column in ("tenant", "used", "limit", "used %", "state"):
        table.add_column(column, justify="left" if column in ("tenant", "state") else "right")
    for tenant, limit in TENANTS.items():
        totals = watcher.totals.get(tenant)
        used = totals.used_tokens if totals else 0
        state = totals.state if totals else "ok"
        style = {"exceeded": "bold red", "warning": "yellow"}.get(state, "green")
        table.add_row(tenant, f"{used:,}", f"{limit:,}", f"{100 * used / limit:5.1f}", f"[{style}]{state}[/]")
    table.caption = f"notices: {watcher.notices}  heartbeats: {watcher.heartbeats}"
    return table


def spawn(args: list[str], log_path: Path, **kwargs: object) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    with open(log_path, "w") as log:
        return subprocess.Popen(
            [sys.executable, *args], env=env, stderr=log, text=True, cwd=REPO, **kwargs  # type: ignore[call-overload]
        )


async def demo(args: argparse.Namespace, bootstrap: str) -> int:
    connection = KafkaConnection(bootstrap_servers=bootstrap)
    layout = TopicLayout(prefix=args.topic_prefix or f"demo{int(time.time())}.", partitions=3)
    logs = REPO / ".cache" / "demo"
    logs.mkdir(parents=True, exist_ok=True)
    await ensure_topics(connection, layout)
    console.print(f"broker {bootstrap}; topics {layout.prefix}*; logs in {logs}")

    aggregator = None
    if not args.external_aggregator:
        aggregator = spawn(
            ["-m", "aggregator", "--bootstrap-servers", bootstrap, "--topic-prefix", layout.prefix,
             "--partitions", str(layout.partitions), "--log-level", "WARNING"],
            logs / "aggregator.log",
        )
    watcher = Watcher(connection, layout)
    await watcher.start()
    agents: list[subprocess.Popen[str]] = []
    try:
        async with asyncio.timeout(60):
            while watcher.heartbeats == 0:  # the aggregator owns its partitions and is publishing
                if aggregator is not None and aggregator.poll() is not None:
                    raise RuntimeError(f"the aggregator exited with {aggregator.returncode}; see {logs}/aggregator.log")
                await asyncio.sleep(0.1)
        baseline = {t: r.used_tokens for t, r in watcher.totals.items()}  # from earlier runs on these topics
        console.print(f"aggregator up; starting {args.agents} agent processes for {args.duration:.0f}s")
        started = time.monotonic()
        for index in range(args.agents):
            agents.append(
                spawn(
                    ["examples/fleet_agent.py", "--bootstrap-servers", bootstrap, "--topic-prefix", layout.prefix,
                     "--partitions", str(layout.partitions), "--instance", f"agent-{index}",
                     "--tenants", json.dumps(TENANTS), "--duration", str(args.duration), "--seed", str(index + 1)],
                    logs / f"agent-{index}.log",
                    stdout=subprocess.PIPE,
                )
            )
        with Live(live_table(watcher, 0.0), console=console, refresh_per_second=4) as live:
            while any(agent.poll() is None for agent in agents):
                live.update(live_table(watcher, time.monotonic() - started))
                await asyncio.sleep(0.25)
            fleet_seconds = time.monotonic() - started
            reports = [json.loads(agent.stdout.read().strip().splitlines()[-1]) for agent in agents]  # type: ignore[union-attr]
            if any(agent.returncode != 0 for agent in agents):
                raise RuntimeError(f"an agent process failed; see {logs}/agent-*.log")
            expected = {t: baseline.get(t, 0) + sum(r["tenants"][t]["tokens"] for r in reports) for t in TENANTS}
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(30):
                    while {t: (watcher.totals[t].used_tokens if t in watcher.totals else 0) for t in TENANTS} != expected:
                        live.update(live_table(watcher, time.monotonic() - started))
                        await asyncio.sleep(0.2)
            live.update(live_table(watcher, time.monotonic() - started))
        return summary(watcher, reports, expected, fleet_seconds)
    finally:
        for agent in agents:
            if agent.poll() is None:
                agent.kill()
            agent.wait()
        await watcher.stop()
        if aggregator is not None:
            stop_aggregator(aggregator)


def stop_aggregator(aggregator: subprocess.Popen[str]) -> None:
    aggregator.send_signal(signal.SIGTERM)
    try:
        code = aggregator.wait(30)
        console.print(f"aggregator stopped on SIGTERM with exit code {code}")
    except subprocess.TimeoutExpired:
        aggregator.kill()
        aggregator.wait()
        console.print("[red]aggregator did not stop on SIGTERM; killed[/]")


def summary(watcher: Watcher, reports: list[dict], expected: dict[str, int], fleet_seconds: float) -> int:
    table = Table(title="Summary per tenant")
    for column in ("tenant", "limit", "aggregated", "sum of events", "allowed", "blocked", "overshoot", "over %"):
        table.add_column(column, justify="left" if column == "tenant" else "right")
    all_match = True
    blocked_tenants = 0
    for tenant, limit in TENANTS.items():
        used = watcher.totals[tenant].used_tokens if tenant in watcher.totals else 0
        allowed = sum(r["tenants"][tenant]["allowed"] for r in reports)
        blocked = sum(r["tenants"][tenant]["blocked"] for r in reports)
        overshoot = max(0, used - limit)
        match = used == expected[tenant]
        all_match &= match
        blocked_tenants += blocked > 0
        table.add_row(
            tenant, f"{limit:,}", f"{used:,}", f"{expected[tenant]:,}" + ("" if match else " [red]MISMATCH[/]"),
            f"{allowed:,}", f"{blocked:,}", f"{overshoot:,}", f"{100 * overshoot / limit:.2f}",
        )
    console.print(table)
    events = sum(r["published"] for r in reports)
    console.print(
        f"{len(reports)} agent processes, {events:,} usage events in {fleet_seconds:.1f}s = "
        f"{events / fleet_seconds:,.0f} events/s (bounded by the simulated LLM latency, not the pipeline)"
    )
    console.print(
        "totals equal the sum of events: " + ("[green]yes[/]" if all_match else "[red]NO[/]")
        + f"; tenants blocked: {blocked_tenants}"
    )
    return 0 if all_match and blocked_tenants > 0 else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--agents", type=int, default=3, help="agent processes (default 3)")
    parser.add_argument("--duration", type=float, default=12.0, help="seconds the fleet calls (default 12)")
    parser.add_argument("--topic-prefix", help="topics to use (default: fresh ones per run)")
    parser.add_argument("--external-aggregator", action="store_true", help="an aggregator already runs (docker compose)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # aiokafka logs transient leader elections right after topics are created; they retry by themselves.
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    bootstrap = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    broker = None
    if not bootstrap:
        console.print("starting the local Kafka broker (first run: Maven resolves the jars)...")
        # The port `make kafka-up` uses: LOCALKAFKA_PORT, else 19092.
        port = int(os.environ.get("LOCALKAFKA_PORT", DEFAULT_PORT))
        already = localkafka.running(port)
        broker = already or localkafka.start(port)
        bootstrap = broker.bootstrap_servers
        if already:
            broker = None  # started by `make kafka-up`: leave it running
    try:
        return asyncio.run(demo(args, bootstrap))
    finally:
        if broker is not None:
            localkafka.stop(broker.port)
            console.print("local Kafka broker stopped")


if __name__ == "__main__":
    sys.exit(main())
