from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest

from producer import default_user_id_getter, tenant_scope
from producer.periods import day_key, month_key, seed_week_key, week_key


def test_iso_week_fixes_the_seed_new_year_split() -> None:
    new_year = datetime(2027, 1, 1, 12, tzinfo=UTC)  # a Friday
    assert seed_week_key(now=new_year) == "2027-W00"
    assert week_key(now=new_year) == "2026-W53"
    assert week_key(now=datetime(2026, 12, 28, tzinfo=UTC)) == "2026-W53"


def test_timezone_choice_moves_the_boundary() -> None:
    instant = datetime(2026, 4, 30, 23, 30, tzinfo=UTC)
    assert month_key(now=instant) == "2026-04"
    assert month_key(now=instant, tz=ZoneInfo("Europe/Berlin")) == "2026-05"
    assert day_key(now=instant, tz=ZoneInfo("Europe/Berlin")) == "2026-05-01"


class _Context:
    def __init__(self, metadata: dict | None = None) -> None:
        self.metadata = metadata or {}


async def test_tenant_scope_is_per_task() -> None:
    async def who(tenant: str) -> str:
        with tenant_scope(tenant):
            await asyncio.sleep(0)
            return default_user_id_getter(_Context())

    assert await asyncio.gather(who("a"), who("b")) == ["a", "b"]
    assert default_user_id_getter(_Context()) == "anonymous"


def test_metadata_user_id_wins_over_scope() -> None:
    with tenant_scope("scoped"):
        assert default_user_id_getter(_Context({"user_id": "meta"})) == "meta"
    with pytest.raises(ValueError), tenant_scope(""):
        pass
