from __future__ import annotations

from pathlib import Path

import pytest

from producer.spool import SEGMENT_BYTES, Spool, SpoolFull


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
