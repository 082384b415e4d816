"""What every benchmark needs: a broker (the local one unless KAFKA_BOOTSTRAP_SERVERS), fresh
topics, a median, and the closing JSON line."""

from __future__ import annotations

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
