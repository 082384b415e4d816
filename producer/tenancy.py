"""Which tenant a call belongs to.

Agent Framework builds a fresh ``ChatContext`` for every call, so an application has no direct
way to put a tenant on it. ``tenant_scope`` carries one through the async call chain instead.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

_current_tenant: ContextVar[str | None] = ContextVar("tokenguard_tenant", default=None)


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
