"""A bounded on-disk spool of encoded usage events, for when Kafka is away or slow.

Layout: ``<root>/<spool id>/<sequence>.jsonl``, one encoded ``UsageEvent`` per line. Each process
writes only its own folder and holds an ``flock`` on it while it runs. A folder whose lock nobody
holds belongs to a process that has stopped (gracefully or not): the next process to start on the
host adopts it and delivers its events first, oldest segment first, so nothing is left behind.

Segments are deleted only after every event in them was acknowledged by the broker; a crash in
between re-delivers the segment, and the aggregator drops the repeats by event id.

Spooled events are a tenant's usage: only the user running the process may read them. Folders
are 0700 and files 0600 whatever the umask, and a folder or file found with looser modes (an
older version, a hand-made folder) is tightened when the spool opens.
"""

from __future__ import annotations

import fcntl
import logging
import os
import stat
import uuid
from pathlib import Path
from typing import BinaryIO

log = logging.getLogger(__name__)

SEGMENT_BYTES = 4 * 1024 * 1024
FOLDER_MODE = 0o700
FILE_MODE = 0o600


def private_mode(mode: int, *, folder: bool) -> int | None:
    """The permission bits a spool path must get, or None when ``mode`` already has them.

    Exact, not merely "no group/other bits": a folder the owner cannot write would stop the spool.
    """
    wanted = FOLDER_MODE if folder else FILE_MODE
    return None if stat.S_IMODE(mode) == wanted else wanted


def grants_others(mode: int) -> bool:
    """Whether a mode let other local users in (worth a warning, not just a fix)."""
    return bool(stat.S_IMODE(mode) & 0o077)


class SpoolFull(Exception):
    """Appending would take the spool past its size limit."""


class Spool:
    def __init__(self, root: Path, max_bytes: int) -> None:
        if max_bytes < SEGMENT_BYTES // 4:
            raise ValueError(f"spool max_bytes must be at least {SEGMENT_BYTES // 4}")
        self.root = root
        self.max_bytes = max_bytes
        self._dir: Path | None = None
        self._lock_fd: int | None = None
        self._orphan_locks: list[int] = []
        self._segments: list[Path] = []  # oldest first; the last one of our own is being written
        self._writer: Path | None = None
        self._write_file: BinaryIO | None = None
        self._sequence = 0
        self._reading: Path | None = None
        self._lines: list[bytes] = []
        self._index = 0
        self.size_bytes = 0
        self.pending = 0
        self.dropped = 0
        self._loosened: list[Path] = []  # paths found open to other users, reported once per open()

    def _make_private(self, path: Path, *, folder: bool) -> None:
        """Give ``path`` the spool's modes (chmod, so the umask has no say); note loose ones."""
        mode = path.stat().st_mode
        wanted = private_mode(mode, folder=folder)
        if wanted is not None:
            os.chmod(path, wanted)
            if grants_others(mode):
                self._loosened.append(path)

    def open(self) -> None:
        """Claim a folder of our own and adopt the segments of every unlocked folder."""
        if self._dir is not None:
            return
        self._loosened = []
        self.root.mkdir(mode=FOLDER_MODE, parents=True, exist_ok=True)
        self._make_private(self.root, folder=True)
        adopted = self._adopt_orphans()
        self._dir = self.root / uuid.uuid4().hex
        self._dir.mkdir(mode=FOLDER_MODE)
        self._make_private(self._dir, folder=True)
        self._lock_fd = _open_private(self._dir / ".lock", os.O_CREAT | os.O_RDWR)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if self._loosened:
            log.warning(
                "spool %s: %d folders or files were readable by other users (e.g. %s); made private to this user",
                self.root, len(self._loosened), self._loosened[0],
            )
        self._segments = adopted
        for segment in adopted:
            self.size_bytes += segment.stat().st_size
            self.pending += _count_lines(segment)
        if adopted:
            log.warning("adopted %d spooled usage events from %d segments of stopped processes", self.pending, len(adopted))

    def _adopt_orphans(self) -> list[Path]:
        segments: list[Path] = []
        for folder in sorted(p for p in self.root.iterdir() if p.is_dir()):
            try:
                fd = _open_private(folder / ".lock", os.O_CREAT | os.O_RDWR)
            except PermissionError:
                log.warning("spool folder %s belongs to another user; not adopted", folder)
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue  # a running process owns it
            # Keep the orphan's lock until its segments are delivered: no two adopters.
            self._make_private(folder, folder=True)
            found = sorted(folder.glob("*.jsonl"), key=lambda p: (p.stat().st_mtime_ns, p.name))
            for segment in found:
                self._make_private(segment, folder=False)
            if found:
                segments.extend(found)
                self._orphan_locks.append(fd)
            else:
                _remove_folder(folder)
                os.close(fd)
        return segments

    def close(self) -> None:
        """Make what was written durable and release the folder. Idempotent."""
        if self._dir is None:
            return
        self._close_writer()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        for fd in self._orphan_locks:
            os.close(fd)
        self._orphan_locks = []
        if not any(self._dir.glob("*.jsonl")):
            _remove_folder(self._dir)
        self._dir = None

    def _close_writer(self) -> None:
        if self._write_file is not None:
            self._write_file.flush()
            os.fsync(self._write_file.fileno())
            self._write_file.close()
            self._write_file = None
            self._writer = None

    def append(self, lines: list[bytes]) -> None:
        """Append encoded events in order; ``SpoolFull`` (nothing written) past ``max_bytes``."""
        assert self._dir is not None, "open() the spool first"
        size = sum(len(line) + 1 for line in lines)
        if self.size_bytes + size > self.max_bytes:
            raise SpoolFull(f"spool at {self.size_bytes} bytes cannot take {size} more (limit {self.max_bytes})")
        if self._write_file is None or self._write_file.tell() >= SEGMENT_BYTES:
            self._close_writer()
            self._sequence += 1
            self._writer = self._dir / f"{self._sequence:012d}.jsonl"
            self._write_file = os.fdopen(_open_private(self._writer, os.O_CREAT | os.O_WRONLY | os.O_APPEND), "ab")
            self._segments.append(self._writer)
        write_file = self._write_file
        assert write_file is not None
        write_file.write(b"".join(line + b"\n" for line in lines))
        write_file.flush()
        self.size_bytes += size
        self.pending += len(lines)

    def peek(self, limit: int) -> list[bytes]:
        """Up to ``limit`` of the oldest undelivered lines (the same ones until ``consume``)."""
        if self._reading is None:
            if not self._segments:
                return []
            if self._segments[0] == self._writer:
                self._close_writer()  # never read a segment that is still being written
            self._reading = self._segments[0]
            self._lines = [line for line in self._reading.read_bytes().split(b"\n") if line]
            self._index = 0
        return self._lines[self._index : self._index + limit]

    def consume(self, count: int) -> None:
        """The first ``count`` peeked lines were delivered."""
        self._index += count
        self.pending = max(0, self.pending - count)
        if self._reading is not None and self._index >= len(self._lines):
            self._delete_segment(self._reading)
            self._reading = None
            self._lines = []

    def drop_oldest_segment(self) -> int:
        """Delete the oldest segment undelivered; return how many events were lost with it."""
        if not self._segments:
            return 0
        oldest = self._segments[0]
        if oldest == self._writer:
            self._close_writer()
        lost = (len(self._lines) - self._index) if oldest == self._reading else _count_lines(oldest)
        if oldest == self._reading:
            self._reading, self._lines = None, []
        self._delete_segment(oldest)
        self.pending = max(0, self.pending - lost)
        self.dropped += lost
        return lost

    def _delete_segment(self, segment: Path) -> None:
        self._segments.remove(segment)
        try:
            self.size_bytes -= segment.stat().st_size
            segment.unlink()
        except FileNotFoundError:
            pass
        folder = segment.parent
        if folder != self._dir and not any(folder.glob("*.jsonl")):
            _remove_folder(folder)


def _open_private(path: Path, flags: int) -> int:
    """``os.open`` with mode 0600 whatever the umask; an existing file's mode is tightened too."""
    fd = os.open(path, flags, FILE_MODE)
    try:
        if stat.S_IMODE(os.fstat(fd).st_mode) != FILE_MODE:
            os.fchmod(fd, FILE_MODE)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _count_lines(path: Path) -> int:
    with open(path, "rb") as file:
        return sum(1 for line in file if line.strip())


def _remove_folder(folder: Path) -> None:
    for child in folder.iterdir():
        child.unlink()
    folder.rmdir()
