"""What every benchmark needs: a broker (the local one unless KAFKA_BOOTSTRAP_SERVERS), fresh
topics, a median, and the closing JSON line."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import localkafka  # noqa: E402
from schemas.topics import TopicLayout  # noqa: E402


@contextlib.contextmanager
def broker() -> Iterator[str]:
    """The bootstrap address of a broker that runs for the benchmark's duration."""
    configured = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
    if configured:
        yield configured
        return
    started = localkafka.start(None)
    try:
        yield started.bootstrap_servers
    finally:
        localkafka.stop(started.port)


def fresh_layout(name: str, partitions: int = 6) -> TopicLayout:
    return TopicLayout(prefix=f"bench-{name}-{int(time.time() * 1000)}.", partitions=partitions)


def median(values: list[float]) -> float:
    return statistics.median(values)


def emit(figures: dict[str, object]) -> None:
    """The last line of every benchmark: one JSON object."""
    print(json.dumps(figures), flush=True)


class Fleet:
    """Benchmark child processes of ``bench/instance.py``: started together, released together."""

    def __init__(self) -> None:
        self.children: list[asyncio.subprocess.Process] = []

    async def spawn(self, *args: str) -> asyncio.subprocess.Process:
        child = await asyncio.create_subprocess_exec(
            sys.executable, str(REPO / "bench" / "instance.py"), *args,
            cwd=REPO, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )
        self.children.append(child)
        return child

    async def ready(self, timeout: float = 120) -> None:
        async with asyncio.timeout(timeout):
            for child in self.children:
                assert child.stdout is not None
                line = await child.stdout.readline()
                if line.strip() != b"ready":
                    raise RuntimeError(f"a fleet process did not start: {line!r}")

    def go(self) -> None:
        for child in self.children:
            assert child.stdin is not None
            child.stdin.write(b"go\n")

    async def lines(self, child: asyncio.subprocess.Process) -> list[dict]:
        assert child.stdout is not None
        return [json.loads(line) for line in (await child.stdout.read()).splitlines() if line.strip()]

    async def close(self) -> None:
        for child in self.children:
            if child.returncode is None:
                child.terminate()
        for child in self.children:
            await child.wait()


async def start_aggregator(bootstrap: str, layout: TopicLayout, group: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "aggregator", "--bootstrap-servers", bootstrap, "--topic-prefix", layout.prefix,
        "--partitions", str(layout.partitions), "--group-id", group, "--log-level", "WARNING",
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdin=asyncio.subprocess.DEVNULL,
    )


async def stop_process(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        process.terminate()
    await process.wait()


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]
