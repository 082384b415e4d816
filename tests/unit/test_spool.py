from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import pytest

from producer.spool import SEGMENT_BYTES, Spool, SpoolFull, grants_others, private_mode


def lines(start: int, count: int, width: int = 10) -> list[bytes]:
    return [f"{i:0{width}d}".encode() for i in range(start, start + count)]


def drain(spool: Spool) -> list[bytes]:
    out: list[bytes] = []
    while batch := spool.peek(7):
        out.extend(batch)
        spool.consume(len(batch))
    return out


def test_delivers_in_order_across_segments(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=64 * SEGMENT_BYTES)
    spool.open()
    big = [b"x" * 1000 + str(i).encode() for i in range(10_000)]  # spans several segments
    spool.append(big[:5_000])
    spool.append(big[5_000:])
    assert spool.pending == 10_000
    assert drain(spool) == big
    assert spool.pending == 0 and spool.size_bytes == 0
    spool.close()
    assert list(tmp_path.iterdir()) == []


def test_unconsumed_peek_is_delivered_again(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=SEGMENT_BYTES)
    spool.open()
    spool.append(lines(0, 5))
    assert spool.peek(3) == lines(0, 3)
    assert spool.peek(3) == lines(0, 3), "a failed delivery sees the same lines again"
    spool.consume(3)
    spool.append(lines(5, 2))
    assert drain(spool) == lines(3, 4)
    spool.close()


def test_a_stopped_process_spool_is_adopted_and_delivered_first(tmp_path: Path) -> None:
    first = Spool(tmp_path, max_bytes=SEGMENT_BYTES)
    first.open()
    first.append(lines(0, 4))
    first.close()  # graceful stop with events left
    second = Spool(tmp_path, max_bytes=SEGMENT_BYTES)
    second.open()
    assert second.pending == 4
    second.append(lines(4, 2))
    assert drain(second) == lines(0, 6)
    second.close()
    assert list(tmp_path.iterdir()) == []


def test_a_running_process_spool_is_not_adopted(tmp_path: Path) -> None:
    running = Spool(tmp_path, max_bytes=SEGMENT_BYTES)
    running.open()
    running.append(lines(0, 3))
    other = Spool(tmp_path, max_bytes=SEGMENT_BYTES)
    other.open()
    assert other.pending == 0
    assert drain(running) == lines(0, 3)
    other.close()
    running.close()


def test_full_spool_refuses_whole_appends_and_can_drop_the_oldest(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=SEGMENT_BYTES // 4)
    spool.open()
    chunk = [b"y" * 1023] * 256  # 256 KiB
    spool.append(chunk)
    with pytest.raises(SpoolFull):
        spool.append(chunk * 4)
    assert spool.pending == 256
    assert spool.drop_oldest_segment() == 256
    assert spool.dropped == 256 and spool.pending == 0
    spool.append(chunk)
    assert spool.pending == 256
    spool.close()


def modes(root: Path) -> dict[str, int]:
    """Permission bits of every path under ``root`` (and of ``root``), by relative name."""
    found = {".": stat.S_IMODE(root.stat().st_mode)}
    for path in root.rglob("*"):
        found[str(path.relative_to(root))] = stat.S_IMODE(path.stat().st_mode)
    return found


def test_folders_are_0700_and_files_0600_whatever_the_umask(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    old = os.umask(0o000)  # the most permissive umask: modes must not come from it
    try:
        spool = Spool(root, max_bytes=SEGMENT_BYTES)
        spool.open()
        spool.append(lines(0, 3))
    finally:
        os.umask(old)
    found = modes(root)
    folders = {name: mode for name, mode in found.items() if (root / name).is_dir()}
    files = {name: mode for name, mode in found.items() if (root / name).is_file()}
    assert len(folders) == 2 and len(files) == 2, found  # root, own folder; .lock, one segment
    assert set(folders.values()) == {0o700}, folders
    assert set(files.values()) == {0o600}, files
    spool.close()


def test_existing_loose_folders_and_files_are_tightened_and_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "spool"
    first = Spool(root, max_bytes=SEGMENT_BYTES)
    first.open()
    first.append(lines(0, 4))
    first.close()  # a stopped process's folder, left for adoption
    for path in [root, *root.rglob("*")]:
        os.chmod(path, 0o777 if path.is_dir() else 0o666)  # as an older version or a careless admin left them
    with caplog.at_level(logging.WARNING, logger="producer.spool"):
        second = Spool(root, max_bytes=SEGMENT_BYTES)
        second.open()
    found = modes(root)
    assert {mode for name, mode in found.items() if (root / name).is_dir()} == {0o700}, found
    assert {mode for name, mode in found.items() if (root / name).is_file()} == {0o600}, found
    loose = [r for r in caplog.records if "readable by other users" in r.getMessage()]
    assert len(loose) == 1, [r.getMessage() for r in caplog.records]
    assert second.pending == 4, "the tightened orphan is still adopted"
    second.close()


def test_private_mode_rule() -> None:
    assert private_mode(stat.S_IFDIR | 0o700, folder=True) is None
    assert private_mode(stat.S_IFDIR | 0o755, folder=True) == 0o700
    assert private_mode(stat.S_IFDIR | 0o500, folder=True) == 0o700, "an unwritable folder would stop the spool"
    assert private_mode(stat.S_IFREG | 0o600, folder=False) is None
    assert private_mode(stat.S_IFREG | 0o644, folder=False) == 0o600
    assert grants_others(0o640) and grants_others(0o704) and not grants_others(0o700)
