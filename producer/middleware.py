"""``TokenGuardMiddleware``: the seed's chat middleware, with the Kafka pipeline as one more store."""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, tzinfo
from typing import Any

from agent_framework import ChatContext, ChatMiddleware

from producer.errors import QuotaExceededError, QuotaUnavailableError
from producer.estimate import estimate_input_tokens, tokens_for_chars
from producer.inflight import InFlight, Reservation
from producer.periods import month_key
from producer.records import quota_alert, usage_record
from producer.rule_gate import Reserve, RuleView, Verdict
from producer.snapshot import STALE_REASON
from producer.store import (
    CallUsage,
    Decision,
    Headroom,
    HeadroomState,
    LimitSource,
    QuotaBackend,
    QuotaStore,
    UsageCallback,
    as_backend,
)
from producer.streams import StreamUsage
from producer.tenancy import current_tenant, default_user_id_getter
from producer.tracing import trace_fields
from producer.validation import Counts, bound_model, check_call_keys, check_quota_tokens, settle_counts
from schemas.periods import key_function_kind, period_kind, seconds_until_end

# Refusals that end when the period key's window does; the others (too many calls in flight, the
# quota state unavailable) end sooner or at an unknown time, so they carry no retry_after_s.
_ENDS_WITH_WINDOW = frozenset({"quota_exceeded_before_call", "headroom_below_minimum"})

log = logging.getLogger(__name__)


@dataclass
class MiddlewareStats:
    calls: int = 0
    blocked: int = 0
    estimated: int = 0
    callback_errors: int = 0
    callback_timeouts: int = 0
    max_tokens_clamped: int = 0


class TokenGuardMiddleware(ChatMiddleware):
    """Blocks a call before it reaches the LLM when its tenant's quota is used up; records usage after.

    Args:
        quota_store: A seed-style ``QuotaStore`` (``get_usage``/``add_usage``) or a ``QuotaBackend``
            such as ``KafkaQuotaStore``.
        quota_tokens: Tokens allowed per tenant and period, unless the limits topic sets another:
            a ``KafkaQuotaStore`` follows that topic, so a tenant's own limit (above or below this)
            governs from its first call, and this one only when no limits record applies. The
            governing limit (``Decision.limit``) is what in-flight reservations, ``max_tokens``
            clamping and the warning are judged against. Carried in every usage event as the
            middleware's quota. Within the usage schema's bound (``ValueError`` / ``TypeError``
            otherwise).
        on_usage: Called after every call with the seed's usage record (plus ``estimated``). Optional
            when ``quota_store`` is a ``KafkaQuotaStore``, which publishes every call itself.
        user_id_getter: Maps a ``ChatContext`` to the tenant whose quota the call spends.
        period_key_fn: Returns the current period key (``month_key`` by default). A tenant id or
            period key the usage schema would refuse (length, control characters, not a str) is
            an ``InvalidCallError`` before the LLM is called: its usage could never be counted.
        on_quota_exceeded: Called with the seed's alert payload before ``QuotaExceededError`` is raised.
        alert_details: Add to that payload, after the seed's keys (unchanged), what the caller can
            do: ``limit_source``, ``period_kind``, ``remaining_tokens`` and ``retry_after_s``
            (see ``QuotaExceededError``). Off by default: the seed's payload is exactly its five
            keys. The raised error carries them either way (attributes, and ``error.alert``).
        on_quota_warning: Called once per tenant and period when usage first reaches
            ``warning_ratio`` of the limit.
        warning_ratio: Fraction of the limit that triggers ``on_quota_warning``.
        reserve_in_flight: Count calls in flight against the quota, so concurrent calls of one tenant
            cannot all pass the same check (the seed's race). False restores the seed's behaviour.
        max_in_flight_per_tenant: Calls of one tenant allowed in flight at once in this process.
        default_max_tokens: Output tokens a call is assumed to reserve when it sets no ``max_tokens``.
        clamp_max_tokens: Lower a call's ``max_tokens`` to the tenant's remaining headroom.
        min_headroom_tokens: With ``clamp_max_tokens``, refuse calls whose headroom is smaller.
        callback_timeout_s: How long the call waits for async callbacks (``on_usage``,
            ``on_quota_exceeded``, ``on_quota_warning``) to finish; past it they are cancelled,
            logged and counted (``stats.callback_timeouts``), and the call goes on with its usage
            recorded. A hanging webhook must not hold an agent call. None waits for ever (the
            seed's behaviour). A sync callback runs on the event loop and cannot be bounded.
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
        on_quota_warning: UsageCallback | None = None,
        alert_details: bool = False,
        warning_ratio: float = 0.8,
        reserve_in_flight: bool = True,
        max_in_flight_per_tenant: int = 64,
        default_max_tokens: int = 1024,
        clamp_max_tokens: bool = False,
        min_headroom_tokens: int = 16,
        callback_timeout_s: float | None = 5.0,
    ) -> None:
        quota_tokens = check_quota_tokens(quota_tokens)
        if not 0.0 < warning_ratio <= 1.0:
            raise ValueError(f"warning_ratio must be in (0, 1], got {warning_ratio!r}")
        if max_in_flight_per_tenant < 1 or default_max_tokens < 0 or min_headroom_tokens < 0:
            raise ValueError("max_in_flight_per_tenant must be >= 1; default_max_tokens, min_headroom_tokens >= 0")
        if callback_timeout_s is not None and not callback_timeout_s > 0:
            raise ValueError(f"callback_timeout_s must be positive or None, got {callback_timeout_s!r}")
        self.on_usage = on_usage
        self.on_quota_exceeded = on_quota_exceeded
        self.on_quota_warning = on_quota_warning
        self.alert_details = alert_details
        self.quota_store = quota_store
        self.quota_tokens = quota_tokens
        self.user_id_getter = user_id_getter
        self.period_key_fn = period_key_fn
        self.warning_ratio = warning_ratio
        self.reserve_in_flight = reserve_in_flight
        self.max_in_flight_per_tenant = max_in_flight_per_tenant
        self.default_max_tokens = default_max_tokens
        self.clamp_max_tokens = clamp_max_tokens
        self.min_headroom_tokens = min_headroom_tokens
        self.callback_timeout_s = callback_timeout_s
        self.stats = MiddlewareStats()
        # Timed-out callbacks, cancelled but maybe not finished yet (one that ignores cancellation):
        # referenced until done, so the loop does not collect them mid-flight.
        self._abandoned: set[asyncio.Future[Any]] = set()
        self._backend = as_backend(quota_store)
        # Quota rules, when the store has them (``KafkaQuotaStore``); a seed store has none.
        self._rules_apply: Callable[[str], bool] | None = getattr(self._backend, "rules_apply", None)
        self._admit_rules: Callable[..., Verdict] | None = getattr(self._backend, "admit_rules", None)
        self._release_rules: Callable[[tuple[Reservation, ...]], None] | None = getattr(
            self._backend, "release_rules", None)
        self._take_crossed: Callable[[], list[RuleView]] | None = getattr(self._backend, "take_crossed", None)
        # The middleware's usage is within the schema's bounds already: a store that can skip
        # checking it again (``KafkaQuotaStore.record_fitted``) is told so.
        self._record_usage: Callable[[CallUsage], int] = getattr(self._backend, "record_fitted", self._backend.record)
        self._in_flight = InFlight()
        self._warned: set[tuple[str, str]] = set()
        self._valid_keys: set[tuple[str, str]] = set()

    async def process(self, context: ChatContext, call_next: Callable[[], Awaitable[None]]) -> None:
        self.stats.calls += 1
        tenant_id = self.user_id_getter(context)
        period_key = self.period_key_fn()
        key = (tenant_id, period_key)
        if type(tenant_id) is not str or type(period_key) is not str or key not in self._valid_keys:
            self._check_keys(key)
        decision = self._backend.check(tenant_id, period_key, self.quota_tokens)
        needs_estimate = self.reserve_in_flight or self.clamp_max_tokens
        input_estimate = estimate_input_tokens(context.messages) if needs_estimate else 0
        if decision.allowed and not decision.final and needs_estimate:
            decision = self._judge_in_flight(key, decision, context, input_estimate)
        if not decision.allowed:
            await self._refuse(tenant_id, period_key, decision)
        holds: tuple[Reservation, ...] = ()
        if not decision.final and self._rules_apply is not None and self._rules_apply(tenant_id):
            holds = await self._judge_rules(tenant_id, period_key, context, input_estimate)

        reservation = None
        if self.reserve_in_flight and not decision.final:
            max_tokens = (context.options or {}).get("max_tokens")
            output = max_tokens if isinstance(max_tokens, int) and max_tokens > 0 else self.default_max_tokens
            reservation = self._in_flight.reserve(key, input_estimate + output)

        messages = context.messages

        def estimate_input() -> int:
            return input_estimate or estimate_input_tokens(messages)

        if context.stream:
            def record(details: dict[str, Any], model: str | None, output_estimate: Callable[[], int]) -> Any:
                counts = settle_counts(details, input_estimate=estimate_input, output_estimate=output_estimate)
                return self._record(tenant_id, period_key, decision.limit, reservation, holds, counts, model, True)

            usage = StreamUsage(record)
            usage.attach(context)
            try:
                await call_next()
            except BaseException:
                self._release(reservation, holds)
                raise
            usage.watch(context.result)
            return

        try:
            await call_next()
        finally:
            self._release(reservation, holds)
        result = context.result
        if result is None:
            return
        # Without (usable) provider counts the event carries an estimate, flagged, rather than nothing.
        details = getattr(result, "usage_details", None) or {}
        if type(details) is not dict:
            details = dict(details)
        counts = settle_counts(details, input_estimate=estimate_input, output_estimate=lambda: _output_estimate(result))
        pending = self._record(
            tenant_id, period_key, decision.limit, reservation, holds, counts, getattr(result, "model", None), False)
        if pending is not None:
            await pending

    def _check_keys(self, key: tuple[str, str]) -> None:
        """Refuse, before the LLM is called, a tenant id or period key the schema would reject."""
        check_call_keys(*key)
        if len(self._valid_keys) > 100_000:
            self._valid_keys.clear()
        self._valid_keys.add(key)

    def _judge_in_flight(self, key: tuple[str, str], decision: Decision, context: ChatContext, input_estimate: int) -> Decision:
        """Count reservations as spent; clamp ``max_tokens`` to the headroom when asked to."""
        reserved = self._in_flight.tokens(key) if self.reserve_in_flight else 0
        used = decision.used + reserved
        if used >= decision.limit:
            return Decision(False, used, decision.limit)
        if self.reserve_in_flight and self._in_flight.calls(key) >= self.max_in_flight_per_tenant:
            return Decision(False, used, decision.limit, reason="too_many_calls_in_flight")
        if self.clamp_max_tokens:
            headroom = decision.limit - used - input_estimate
            if headroom < self.min_headroom_tokens:
                return Decision(False, used, decision.limit, reason="headroom_below_minimum")
            options = context.options if context.options is not None else {}
            current = options.get("max_tokens")
            if not isinstance(current, int) or current > headroom:
                context.options = {**options, "max_tokens": headroom}
                self.stats.max_tokens_clamped += 1
        return decision

    async def _judge_rules(
        self, tenant_id: str, period_key: str, context: ChatContext, input_estimate: int
    ) -> tuple[Reservation, ...]:
        """Every quota rule matching the call must have room for its reservation (refused
        otherwise); with ``clamp_max_tokens``, ``max_tokens`` is also held to the tightest token
        rule's headroom. Returns the reservations the rules hold while the call runs."""
        assert self._admit_rules is not None
        options = context.options if context.options is not None else {}
        max_tokens = options.get("max_tokens")
        output = max_tokens if isinstance(max_tokens, int) and max_tokens > 0 else self.default_max_tokens
        if not input_estimate:
            input_estimate = estimate_input_tokens(context.messages)
        model = options.get("model_id") or getattr(context.client, "model_id", None)
        reserve = Reserve(model if isinstance(model, str) else None, input_estimate, output, input_estimate + output)
        verdict = self._admit_rules(tenant_id, reserve, datetime.now(UTC), views=self.clamp_max_tokens)
        if not verdict.allowed:
            await self._refuse_rules(tenant_id, period_key, verdict)
        if self.clamp_max_tokens:
            room = [view.limit - view.used - (input_estimate if view.measure == "total_tokens" else 0)
                    for view in verdict.views if view.blocks and view.measure in ("total_tokens", "output_tokens")]
            if room and (not isinstance(max_tokens, int) or max_tokens > min(room)):
                context.options = {**options, "max_tokens": max(1, min(room))}
                self.stats.max_tokens_clamped += 1
        return verdict.holds

    async def _refuse_rules(self, tenant_id: str, period_key: str, verdict: Verdict) -> None:
        self.stats.blocked += 1
        first = verdict.refused[0]
        rules = [view.as_dict() for view in verdict.refused]
        retry_after_s = max(view.retry_after_s for view in verdict.refused) if verdict.reason == "rule_exceeded" else None
        payload = quota_alert(tenant_id, period_key, first.used, first.limit)
        payload["reason"] = verdict.reason
        detailed = {
            **payload,
            "limit_source": "rule",
            "period_kind": self._window(period_key)[0],
            "remaining_tokens": first.remaining,
            "retry_after_s": retry_after_s,
            "rule": first.name,
            "window": first.counter,
            "rules": rules,
        }
        if self.on_quota_exceeded is not None:
            await self._call_back(self.on_quota_exceeded, dict(detailed) if self.alert_details else payload)
        names = ", ".join(view.name for view in verdict.refused)
        raise QuotaExceededError(
            f"Quota exceeded for user={tenant_id}. Used={first.used}, quota={first.limit} (rule {names})",
            tenant_id=tenant_id, period_key=period_key, period_kind=detailed["period_kind"], used=first.used,
            limit=first.limit, remaining=first.remaining, source="rule", reason=verdict.reason,
            retry_after_s=retry_after_s, alert=detailed, rules=rules,
        )

    async def _refuse(self, tenant_id: str, period_key: str, decision: Decision) -> None:
        self.stats.blocked += 1
        kind, retry_after_s = self._window(period_key)
        if decision.reason not in _ENDS_WITH_WINDOW:
            retry_after_s = None
        source = self._source(tenant_id, period_key)
        remaining = max(0, decision.limit - decision.used)
        payload = quota_alert(tenant_id, period_key, decision.used, decision.limit)
        payload["reason"] = decision.reason
        detailed = {
            **payload,
            "limit_source": source,
            "period_kind": kind,
            "remaining_tokens": remaining,
            "retry_after_s": retry_after_s,
        }
        if self.on_quota_exceeded is not None:
            await self._call_back(self.on_quota_exceeded, dict(detailed) if self.alert_details else payload)
        error = QuotaUnavailableError if decision.reason == STALE_REASON else QuotaExceededError
        raise error(
            f"Quota exceeded for user={tenant_id}. Used={decision.used}, quota={decision.limit}",
            tenant_id=tenant_id,
            period_key=period_key,
            period_kind=kind,
            used=decision.used,
            limit=decision.limit,
            remaining=remaining,
            source=source,
            reason=decision.reason,
            retry_after_s=retry_after_s,
            alert=detailed,
        )

    def headroom(self, tenant_id: str | None = None, period_key: str | None = None, *, model: str | None = None) -> Headroom:
        """What ``tenant_id`` may still spend in ``period_key``, as this process sees it now: for an
        agent to plan (size ``max_tokens``, defer work until ``retry_after_s``). Works with every
        store (a seed ``QuotaStore`` too). No side effects, no network.

        Args:
            tenant_id: Default: the enclosing ``tenant_scope``, else ``"anonymous"`` (as the default
                ``user_id_getter`` decides without a context).
            period_key: Default: ``period_key_fn()``, the key a call made now would count against.
            model: The model the call would use, for quota rules that select by model.
        """
        if tenant_id is None:
            tenant_id = current_tenant() or "anonymous"
        if period_key is None:
            period_key = self.period_key_fn()
        peek = getattr(self._backend, "peek", None)
        decision: Decision = (peek if callable(peek) else self._backend.check)(tenant_id, period_key, self.quota_tokens)
        reserved = self._in_flight.tokens((tenant_id, period_key)) if self.reserve_in_flight else 0
        used = decision.used + reserved
        limit = decision.limit
        state: HeadroomState
        if not decision.allowed and decision.reason == STALE_REASON:
            state = "unavailable"
        elif not decision.allowed or used >= limit:
            state = "exceeded"
        elif used >= limit * self.warning_ratio:
            state = "warning"
        else:
            state = "ok"
        rule_views = getattr(self._backend, "rule_views", None)
        rules = tuple(rule_views(tenant_id, model, datetime.now(UTC))) if callable(rule_views) else ()
        if state != "unavailable" and any(view.blocks and view.used >= view.limit for view in rules):
            state = "exceeded"
        kind, retry_after_s = self._window(period_key)
        return Headroom(
            tenant_id=tenant_id,
            period_key=period_key,
            period_kind=kind,
            used=used,
            limit=limit,
            remaining=max(0, limit - used),
            state=state,
            source=self._source(tenant_id, period_key),
            retry_after_s=retry_after_s,
            rules=rules,
        )

    def _source(self, tenant_id: str, period_key: str) -> LimitSource | None:
        source_of = getattr(self._backend, "source_of", None)
        return source_of(tenant_id, period_key) if callable(source_of) else None

    def _window(self, period_key: str) -> tuple[str | None, float | None]:
        """(kind, seconds until its window ends) of ``period_key``. With one of ``schemas.periods``'
        key functions (or a ``functools.partial`` of one) as ``period_key_fn``, in its time zone;
        with a custom one, by the key's shape (``period_kind``) in UTC, else (None, None)."""
        known = key_function_kind(self.period_key_fn)
        tz: tzinfo = UTC
        kind: str | None
        if known is not None:
            kind, tz = known
        else:
            kind = period_kind(period_key)
        retry_after_s = seconds_until_end(period_key, kind=kind, tz=tz) if kind is not None else None
        return (kind if retry_after_s is not None else period_kind(period_key)), retry_after_s

    def _release(self, reservation: Reservation | None, holds: tuple[Reservation, ...] = ()) -> None:
        if reservation is not None:
            self._in_flight.release(reservation)
        if holds and self._release_rules is not None:
            self._release_rules(holds)

    def _record(
        self,
        tenant_id: str,
        period_key: str,
        limit: int,
        reservation: Reservation | None,
        holds: tuple[Reservation, ...],
        counts: Counts,
        model: Any,
        streaming: bool,
    ) -> Awaitable[None] | None:
        """Record now (synchronously, so it happens even from a GC finalizer); return the user
        callbacks still to await, if any. ``counts`` and the model name are already within the
        usage schema's bounds, so the event can never be dead-lettered for its shape."""
        estimated = counts.estimated
        usage = CallUsage(
            tenant_id=tenant_id,
            period_key=period_key,
            model=bound_model(model),
            input_tokens=counts.input_tokens,
            output_tokens=counts.output_tokens,
            total_tokens=counts.total_tokens,
            cache_creation_input_tokens=counts.cache_creation_input_tokens,
            cache_read_input_tokens=counts.cache_read_input_tokens,
            reasoning_output_tokens=counts.reasoning_output_tokens,
            quota_tokens=self.quota_tokens,
            streaming=streaming,
            event_time=datetime.now(UTC),
            estimated=estimated,
            **trace_fields(),
        )
        used_after = self._record_usage(usage)
        self._release(reservation, holds)
        if estimated:
            self.stats.estimated += 1
        pending: list[Awaitable[Any]] = []
        if self.on_usage is not None:
            self._call_sync(self.on_usage, usage_record(usage, used_after), pending)
        if self.on_quota_warning is not None and used_after >= limit * self.warning_ratio:
            key = (tenant_id, period_key)
            if key not in self._warned:
                if len(self._warned) > 100_000:
                    self._warned.clear()
                self._warned.add(key)
                payload = quota_alert(tenant_id, period_key, used_after, limit)
                payload["reason"] = "quota_warning"
                self._call_sync(self.on_quota_warning, payload, pending)
        if self._take_crossed is not None:
            for view in self._take_crossed():
                if self.on_quota_warning is not None:
                    payload = quota_alert(tenant_id, period_key, view.used, view.limit)
                    payload["reason"] = "rule_limit_reached" if view.used >= view.limit else "rule_threshold"
                    self._call_sync(self.on_quota_warning, {**payload, **view.as_dict()}, pending)
        return self._await_all(pending) if pending else None

    def _call_sync(self, callback: UsageCallback, payload: dict[str, Any], pending: list[Awaitable[Any]]) -> None:
        """Call now; an async callback's awaitable is collected for the caller to await."""
        try:
            result = callback(payload)
        except Exception:
            self._callback_failed(callback)
            return
        if result is not None and inspect.isawaitable(result):
            pending.append(result)

    async def _await_all(self, pending: list[Awaitable[Any]]) -> None:
        """Await the async callbacks of one call together, for at most ``callback_timeout_s``.

        Never awaits a cancelled callback's end: one that ignores its cancellation would hold the
        call for ever. It is kept referenced until it finishes, and its outcome is retrieved.
        """
        futures = [asyncio.ensure_future(awaitable) for awaitable in pending]
        try:
            _, late = await asyncio.wait(futures, timeout=self.callback_timeout_s)
        except asyncio.CancelledError:
            for future in futures:
                future.cancel()  # the call was cancelled: so are its callbacks, as when awaited directly
            raise
        for future in futures:
            if future in late:
                self._callback_timed_out(future)
            elif not future.cancelled() and future.exception() is not None:
                self._callback_failed(future, future.exception())

    def _callback_timed_out(self, future: asyncio.Future[Any]) -> None:
        self.stats.callback_timeouts += 1
        future.cancel()
        self._abandoned.add(future)
        future.add_done_callback(self._forget)
        log.warning(
            "TokenGuard callback %s did not finish within %.3gs and was cancelled; the call is unaffected",
            _callback_name(future), self.callback_timeout_s,
        )

    def _forget(self, future: asyncio.Future[Any]) -> None:
        self._abandoned.discard(future)
        if not future.cancelled() and future.exception() is not None:
            log.debug("TokenGuard callback %s failed after its timeout", _callback_name(future))

    async def _call_back(self, callback: UsageCallback, payload: dict[str, Any]) -> None:
        pending: list[Awaitable[Any]] = []
        self._call_sync(callback, payload, pending)
        if pending:
            await self._await_all(pending)

    def _callback_failed(self, callback: object, error: BaseException | None = None) -> None:
        """A user callback's exception never turns a call into a failure: logged and counted."""
        self.stats.callback_errors += 1
        log.error(
            "TokenGuard callback %s raised; the call is unaffected", _callback_name(callback),
            exc_info=error if error is not None else True,
        )


def _output_estimate(result: Any) -> int:
    """Output tokens of a response from its text, for a provider that did not count them."""
    return tokens_for_chars(sum(len(m.text or "") for m in getattr(result, "messages", ()) or ()))


def _callback_name(callback: object) -> str:
    """A callback's name for the log: never its arguments (they hold tenants' usage)."""
    if isinstance(callback, asyncio.Future):
        coro = callback.get_coro() if isinstance(callback, asyncio.Task) else None
        callback = coro if coro is not None else callback
    name = getattr(callback, "__qualname__", None) or getattr(callback, "__name__", None)
    return str(name) if name else type(callback).__name__
