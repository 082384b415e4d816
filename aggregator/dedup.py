"""A bounded window of recently seen event ids: drops the duplicates at-least-once delivery makes.

Duplicates of one event share its tenant key, so they land in the same partition, close behind
the original (a publisher re-sending a batch whose acknowledgement was lost, a spool replayed
after an outage). One window per partition, of the last ``capacity`` records, catches them. After
a restart the window is rebuilt from the usage partition itself, the records just before the
committed offset, so it needs no storage of its own.
"""

from __future__ import annotations

from collections import deque


class DedupWindow:
    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self._order: deque[str] = deque()
        self._ids: set[str] = set()

    def __contains__(self, event_id: object) -> bool:
        return event_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, event_id: str) -> None:
        if event_id in self._ids:
            return
        self._order.append(event_id)
        self._ids.add(event_id)
        if len(self._order) > self.capacity:
            self._ids.discard(self._order.popleft())
