"""What every benchmark needs: a broker (the local one unless KAFKA_BOOTSTRAP_SERVERS), fresh
topics, a median, and the closing JSON line."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
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


def head_commit() -> str:
    """The commit measured (the shared working tree may differ from it: the figures say which)."""
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=False)
    return done.stdout.strip() or "unknown"


def result_path(name: str, suffix: str = ".json") -> Path:
    """Where a bench's file goes: bench/results/<name><suffix>, plots beside the JSON."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    return RESULTS / f"{name}{suffix}"


def save_results(name: str, figures: dict[str, object]) -> Path:
    """bench/results/<name>.json: the run's figures with the bench's name, the commit and the time,
    so a README figure can be traced to the run that produced it."""
    record = {"bench": name, "commit": head_commit(), "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              **figures}
    path = result_path(name)
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    return path


def code_env(code: Path) -> dict[str, str]:
    """The environment of a child that runs the packages of ``code``: this checkout, or another
    one (a worktree of an older commit) measured side by side on the same broker."""
    return {**os.environ, "PYTHONPATH": str(code), "TOKENGUARD_BENCH_CODE": str(code)}


class Fleet:
    """Benchmark child processes of ``bench/instance.py``: started together, released together.
    ``code``: the checkout whose packages they run (this one unless told)."""

    def __init__(self, code: Path = REPO) -> None:
        self.children: list[asyncio.subprocess.Process] = []
        self.code = code

    async def spawn(self, *args: str) -> asyncio.subprocess.Process:
        child = await asyncio.create_subprocess_exec(
            sys.executable, str(REPO / "bench" / "instance.py"), *args,
            cwd=self.code, env=code_env(self.code), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
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


async def start_aggregator(bootstrap: str, layout: TopicLayout, group: str, code: Path = REPO) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "aggregator", "--bootstrap-servers", bootstrap, "--topic-prefix", layout.prefix,
        "--partitions", str(layout.partitions), "--group-id", group, "--log-level", "WARNING",
        cwd=code, env=code_env(code), stdin=asyncio.subprocess.DEVNULL,
    )


async def stop_process(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        process.terminate()
    await process.wait()


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]
