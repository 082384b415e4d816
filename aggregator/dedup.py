"""A bounded window of recently seen events: drops the duplicates at-least-once delivery makes.

Duplicates of one event share its tenant key, so they land in the same partition, close behind
the original (a publisher re-sending a batch whose acknowledgement was lost, a spool replayed
after an outage). One window per partition, of the last ``capacity`` records, catches them. After
a restart the window is rebuilt from the usage partition itself, the records just before the
committed offset, so it needs no storage of its own.

The identity is (tenant, event id): an id another tenant reuses is a different event. Each entry
keeps the event's content fingerprint, so the same identity with other content is told apart
from a true duplicate (see ``aggregator.intake``).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable


class DedupWindow:
    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self._order: deque[Hashable] = deque()
        self._seen: dict[Hashable, int] = {}

    def __contains__(self, identity: object) -> bool:
        return identity in self._seen

    def __len__(self) -> int:
        return len(self._seen)

    def fingerprint(self, identity: Hashable) -> int | None:
        return self._seen.get(identity)

    def add(self, identity: Hashable, fingerprint: int = 0) -> None:
        """Remember ``identity``; the first content seen for it is the one kept."""
        if identity in self._seen:
            return
        self._order.append(identity)
        self._seen[identity] = fingerprint
        if len(self._order) > self.capacity:
            del self._seen[self._order.popleft()]
