"""Which tenant a call belongs to.

Agent Framework builds a fresh ``ChatContext`` for every call, so an application has no direct
way to put a tenant on it. ``tenant_scope`` carries one through the async call chain instead.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from producer.validation import check_attributes

_current_tenant: ContextVar[str | None] = ContextVar("tokenguard_tenant", default=None)
_call_attributes: ContextVar[dict[str, str] | None] = ContextVar("tokenguard_attributes", default=None)

# Attributes one scope may add to a call's event: the store's own may already hold up to the schema's 32.
MAX_CALL_ATTRIBUTES = 8


@contextmanager
def tenant_scope(tenant_id: str) -> Iterator[None]:
    """Attribute every call made inside the block to ``tenant_id``::

    with tenant_scope("acme"):
        await agent.run("Hello")
    """
    if not isinstance(tenant_id, str) or not tenant_id:
        raise ValueError("tenant_id must be a non-empty string")
    token = _current_tenant.set(tenant_id)
    try:
        yield
    finally:
        _current_tenant.reset(token)


@contextmanager
def usage_scope(*, user: str | None = None, agent: str | None = None, **attributes: str) -> Iterator[None]:
    """Carry attributes on the usage event of every call made inside the block, over the store's
    own: who the call was for (``user``) and which agent made it (``agent``), or any other. Quota
    rules select by them (``tokenguard limits set ... --user alice``); billing reads them::

        with tenant_scope("acme"), usage_scope(user="alice", agent="support-bot"):
            await agent.run("Hello")

    At most 8, within the usage schema's bounds (``ValueError`` / ``TypeError`` here, not at the
    call). Nested scopes add to the enclosing one.
    """
    named = {name: value for name, value in (("user", user), ("agent", agent)) if value is not None}
    merged = {**(_call_attributes.get() or {}), **named, **attributes}
    if len(merged) > MAX_CALL_ATTRIBUTES:
        raise ValueError(f"usage_scope takes at most {MAX_CALL_ATTRIBUTES} attributes, got {len(merged)}")
    token = _call_attributes.set(check_attributes(merged))
    try:
        yield
    finally:
        _call_attributes.reset(token)


def call_attributes() -> dict[str, str] | None:
    """The enclosing ``usage_scope``'s attributes; None outside any."""
    return _call_attributes.get()


def current_tenant() -> str | None:
    return _current_tenant.get()


def default_user_id_getter(context: Any) -> str:
    """The seed's lookup (``context.user_id``, then ``context.metadata["user_id"]``), then the
    enclosing ``tenant_scope``, then ``"anonymous"``."""
    candidate = getattr(context, "user_id", None)
    if not candidate:
        metadata = getattr(context, "metadata", None)
        candidate = metadata.get("user_id") if isinstance(metadata, dict) else None
    if not candidate:
        candidate = _current_tenant.get()
    return str(candidate) if candidate else "anonymous"
