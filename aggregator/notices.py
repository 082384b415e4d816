"""The notices topic as the aggregator polices it: what each key says there now.

Anyone who can write the topic can write a notice: on a cluster without ACLs, any client. A forged
'exceeded' would block a tenant for good (the aggregator publishes only on a state change), a
forged 'ok' with a huge limit would release one. So every aggregator reads the topic back and
corrects, within one batch, any notice of a key it owns that says other than its own state; and it
re-asserts the state of every key it holds that is not 'ok' on a timer, in case a correction is
itself lost. ACLs (README, ``tokenguard acls``) keep forgers out; this keeps their effect short.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from aiokafka.structs import ConsumerRecord

from aggregator.config import AggregatorConfig
from schemas.errors import DecodeError
from schemas.notices import QuotaNotice
from schemas.wire import decode_notice, parse_tenant_period_key
from transport.follower import TopicFollower

log = logging.getLogger(__name__)

Key = tuple[str, str]
# What a key's notice says now: (state, limit); ("invalid", -1) for bytes that are not a notice;
# absent when the key has no notice (never written, or removed by a tombstone).
Said = tuple[str, int]
INVALID: Said = ("invalid", -1)

OnSeen = Callable[[list[Key]], Awaitable[None]]


class NoticesWatch:
    """Follows the notices topic; keeps what each tenant-period key says; reports changed keys."""

    def __init__(self, config: AggregatorConfig, *, on_seen: OnSeen) -> None:
        self.said: dict[Key, Said] = {}
        self._on_seen = on_seen
        self._follower = TopicFollower(
            config.connection,
            config.topics.notices,
            self._take,
            client_id=f"{config.aggregator_id}-notices",
            catch_up_s=60.0,
            strict=False,
        )

    async def start(self) -> None:
        await self._follower.start()

    async def stop(self) -> None:
        await self._follower.stop()

    async def _take(self, records: list[ConsumerRecord]) -> None:
        changed = []
        for record in records:
            key = parse_tenant_period_key(record.key)
            if key is None:
                continue
            if record.value is None:
                self.said.pop(key, None)
            else:
                try:
                    notice = decode_notice(record.value)
                except DecodeError:
                    self.said[key] = INVALID
                else:
                    is_notice = isinstance(notice, QuotaNotice) and (notice.tenant_id, notice.period_key) == key
                    self.said[key] = (notice.state, notice.limit_tokens) if is_notice else INVALID  # type: ignore[union-attr]
            changed.append(key)
        if changed:
            await self._on_seen(changed)
