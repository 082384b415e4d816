"""Reservations for calls in flight: concurrent calls of a tenant cannot all pass one check.

Before a call goes out it reserves an estimate of what it may spend; the next call's check counts
the reservations as spent. When the call ends the reservation is released and the real usage
recorded in its place. Pure logic; one event loop owns it.
"""

from __future__ import annotations

from dataclasses import dataclass

Key = tuple[str, str]


@dataclass(slots=True)
class Reservation:
    key: Key
    tokens: int
    released: bool = False


class InFlight:
    def __init__(self) -> None:
        self._tokens: dict[Key, int] = {}
        self._calls: dict[Key, int] = {}

    def tokens(self, key: Key) -> int:
        return self._tokens.get(key, 0)

    def calls(self, key: Key) -> int:
        return self._calls.get(key, 0)

    def reserve(self, key: Key, tokens: int) -> Reservation:
        self._tokens[key] = self._tokens.get(key, 0) + tokens
        self._calls[key] = self._calls.get(key, 0) + 1
        return Reservation(key, tokens)

    def release(self, reservation: Reservation) -> None:
        """Idempotent: every way a call can end releases, and only the first counts."""
        if reservation.released:
            return
        reservation.released = True
        key = reservation.key
        remaining = self._tokens[key] - reservation.tokens
        calls = self._calls[key] - 1
        if calls:
            self._tokens[key], self._calls[key] = remaining, calls
        else:
            del self._tokens[key], self._calls[key]
