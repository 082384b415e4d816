"""Write-ahead journal: every usage event on disk before the call that spent it returns.

The publisher sends from an in-memory queue on the agent's own event loop; a process killed
(SIGKILL, the OOM killer, a node lost, an orchestrator past its grace period) loses what is still
queued, and an agent loop that never yields never lets the publisher run at all. So ``record``
also appends the encoded event to this journal with one ``os.write``: the bytes are in the
kernel's page cache when the call returns, and survive the process (not a power loss; the spool's
fsync on close covers a graceful stop).

The journal is a folder of the spool (``<spool dir>/<uuid>/NNN.jsonl``, one encoded event per
line, locked while its process runs), so after a crash the next process to start on the host
adopts it like any orphaned spool folder and delivers its events; those Kafka had already taken
come again and are dropped by event id. While the process runs, a segment is deleted once every
event in it is *settled* (acknowledged by Kafka or written to the spool): the publisher's queue is
FIFO with one batch in flight, so "settled" is a count of the first events published.
"""

from __future__ import annotations

import fcntl
import os
import uuid
from collections import deque
from pathlib import Path

from producer.spool import FOLDER_MODE, _open_private, _remove_folder

SEGMENT_EVENTS = 4096


class Journal:
    """Appends encoded events, numbered from 1; deletes segments the publisher has settled."""

    def __init__(self, root: Path, *, segment_events: int = SEGMENT_EVENTS) -> None:
        self.root = root
        self.segment_events = segment_events
        self.written = 0
        self._dir: Path | None = None
        self._lock_fd: int | None = None
        self._fd: int | None = None
        self._in_segment = 0
        self._sequence = 0
        self._closed: deque[tuple[Path, int]] = deque()  # (segment, number of its last event)
        self._current: Path | None = None

    def open(self) -> None:
        if self._dir is not None:
            return
        self.root.mkdir(mode=FOLDER_MODE, parents=True, exist_ok=True)
        self._dir = self.root / uuid.uuid4().hex
        self._dir.mkdir(mode=FOLDER_MODE)
        self._lock_fd = _open_private(self._dir / ".lock", os.O_CREAT | os.O_RDWR)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def append(self, line: bytes) -> None:
        """One encoded event, in the kernel's hands when this returns (one write system call)."""
        if self._fd is None:
            self._rotate()
        assert self._fd is not None
        os.write(self._fd, line + b"\n")
        self.written += 1
        self._in_segment += 1
        if self._in_segment >= self.segment_events:
            self._finish_segment()

    def release(self, settled: int) -> None:
        """The first ``settled`` events are acknowledged or spooled: delete the segments they fill."""
        closed = self._closed
        while closed and closed[0][1] <= settled:
            segment, _ = closed.popleft()
            segment.unlink(missing_ok=True)

    def close(self, *, settled: int) -> None:
        """Stop journaling. With every event settled the folder goes; else it stays, locked no more,
        for the next process on the host to adopt. Idempotent."""
        if self._dir is None:
            return
        self._finish_segment()
        self.release(settled)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        if not self._closed:
            _remove_folder(self._dir)
        self._dir = None

    def _rotate(self) -> None:
        assert self._dir is not None, "open() the journal first"
        self._sequence += 1
        self._current = self._dir / f"{self._sequence:012d}.jsonl"
        self._fd = _open_private(self._current, os.O_CREAT | os.O_WRONLY | os.O_APPEND)
        self._in_segment = 0

    def _finish_segment(self) -> None:
        if self._fd is None or self._current is None:
            return
        os.close(self._fd)
        self._closed.append((self._current, self.written))
        self._fd, self._current = None, None
