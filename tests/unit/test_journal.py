"""The write-ahead journal (issue 13): on disk before the call returns, deleted once settled, and
left for the next process to adopt when its own dies."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from producer.journal import Journal
from producer.spool import Spool


def lines_in(folder: Path) -> list[bytes]:
    return [line for segment in sorted(folder.glob("*.jsonl")) for line in segment.read_bytes().split(b"\n") if line]


def test_each_event_is_on_disk_when_append_returns(tmp_path: Path) -> None:
    journal = Journal(tmp_path, segment_events=3)
    journal.open()
    [folder] = [p for p in tmp_path.iterdir() if p.is_dir()]
    for index in range(7):
        journal.append(b'{"n": %d}' % index)
        assert len(lines_in(folder)) == index + 1  # no buffer in the process: the kernel has it
    assert len(list(folder.glob("*.jsonl"))) == 3


def test_segments_go_once_every_event_in_them_is_settled(tmp_path: Path) -> None:
    journal = Journal(tmp_path, segment_events=3)
    journal.open()
    [folder] = [p for p in tmp_path.iterdir() if p.is_dir()]
    for index in range(7):
        journal.append(b"%d" % index)
    journal.release(2)
    assert len(list(folder.glob("*.jsonl"))) == 3  # the first segment holds events 1-3
    journal.release(6)
    assert lines_in(folder) == [b"6"]  # segments 1-3 and 4-6 gone; the open one stays
    journal.close(settled=7)
    assert not folder.exists()


def test_a_closed_journal_with_unsettled_events_stays_for_adoption(tmp_path: Path) -> None:
    journal = Journal(tmp_path, segment_events=100)
    journal.open()
    for index in range(5):
        journal.append(b'{"n": %d}' % index)
    journal.close(settled=2)  # the process could not deliver three of them
    spool = Spool(tmp_path, max_bytes=10**7)
    spool.open()  # the next process on the host
    assert spool.pending == 5 and spool.peek(10) == [b'{"n": %d}' % i for i in range(5)]
    spool.close()


def test_a_dead_process_journal_is_adopted_a_live_one_is_not(tmp_path: Path) -> None:
    live = Journal(tmp_path)
    live.open()
    live.append(b'{"live": 1}')
    spool = Spool(tmp_path, max_bytes=10**7)
    spool.open()
    assert spool.pending == 0, "a running process's journal is its own"
    spool.close()
    # A killed process: its lock is gone with it, its segment stays.
    assert live._lock_fd is not None
    fcntl.flock(live._lock_fd, fcntl.LOCK_UN)
    os.close(live._lock_fd)
    live._lock_fd = None
    adopter = Spool(tmp_path, max_bytes=10**7)
    adopter.open()
    assert adopter.peek(10) == [b'{"live": 1}']
    adopter.close()
