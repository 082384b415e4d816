"""``TokenGuardMiddleware``: the seed's chat middleware, with the Kafka pipeline as one more store."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from typing import Any

from agent_framework import ChatContext, ChatMiddleware

from producer.errors import QuotaExceededError
from producer.periods import month_key
from producer.records import maybe_await, quota_alert, token_counts, usage_record
from producer.store import CallUsage, QuotaBackend, QuotaStore, UsageCallback, as_backend
from producer.tenancy import default_user_id_getter


class TokenGuardMiddleware(ChatMiddleware):
    """Blocks a call before it reaches the LLM when its tenant's quota is used up; records usage after.

    Args:
        on_usage: Called after every call that reported usage, with the seed's usage record. Optional
            when ``quota_store`` is a ``KafkaQuotaStore``, which publishes every call itself.
        quota_store: A seed-style ``QuotaStore`` (``get_usage``/``add_usage``) or a ``QuotaBackend``
            such as ``KafkaQuotaStore``.
        quota_tokens: Tokens allowed per tenant and period, unless the limits topic sets another.
        user_id_getter: Maps a ``ChatContext`` to the tenant whose quota the call spends.
        period_key_fn: Returns the current period key (``month_key`` by default).
        on_quota_exceeded: Called with the seed's alert payload before ``QuotaExceededError`` is raised.
    """

    def __init__(
        self,
        *,
        quota_store: QuotaStore | QuotaBackend,
        quota_tokens: int,
        on_usage: UsageCallback | None = None,
        user_id_getter: Callable[[ChatContext], str] = default_user_id_getter,
        period_key_fn: Callable[[], str] = month_key,
        on_quota_exceeded: UsageCallback | None = None,
    ) -> None:
        if isinstance(quota_tokens, bool) or int(quota_tokens) < 0:
            raise ValueError(f"quota_tokens must be a non-negative integer, got {quota_tokens!r}")
        self.on_usage = on_usage
        self.on_quota_exceeded = on_quota_exceeded
        self.quota_store = quota_store
        self.quota_tokens = int(quota_tokens)
        self.user_id_getter = user_id_getter
        self.period_key_fn = period_key_fn
        self._backend = as_backend(quota_store)

    async def process(self, context: ChatContext, call_next: Callable[[], Awaitable[None]]) -> None:
        tenant_id = self.user_id_getter(context)
        period_key = self.period_key_fn()
        decision = self._backend.check(tenant_id, period_key, self.quota_tokens)
        if not decision.allowed:
            if self.on_quota_exceeded is not None:
                await maybe_await(self.on_quota_exceeded(quota_alert(tenant_id, period_key, decision.used, decision.limit)))
            raise QuotaExceededError(
                f"Quota exceeded for user={tenant_id}. Used={decision.used}, quota={decision.limit}"
            )

        if context.stream:
            captured: dict[str, Any] = {}

            def capture_usage(update: Any) -> Any:
                details = getattr(update, "usage_details", None)
                if details:
                    captured.update(details)
                return update

            async def on_stream_done(response: Any) -> Any:
                details = captured or dict(getattr(response, "usage_details", None) or {})
                if details:
                    await self._record(tenant_id, period_key, getattr(response, "model", None), details, streaming=True)
                return response

            context.stream_transform_hooks.append(capture_usage)
            context.stream_result_hooks.append(on_stream_done)
            await call_next()
            return

        await call_next()
        result = context.result
        details = getattr(result, "usage_details", None) if result else None
        if details:
            await self._record(tenant_id, period_key, getattr(result, "model", None), details, streaming=False)

    async def _record(
        self, tenant_id: str, period_key: str, model: str | None, details: Any, *, streaming: bool
    ) -> None:
        usage = CallUsage(
            tenant_id=tenant_id,
            period_key=period_key,
            model=model,
            quota_tokens=self.quota_tokens,
            streaming=streaming,
            event_time=datetime.now(timezone.utc),
            **token_counts(details),  # type: ignore[arg-type]
        )
        used_after = self._backend.record(usage)
        if self.on_usage is not None:
            await maybe_await(self.on_usage(usage_record(usage, used_after)))
