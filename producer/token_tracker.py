"""The seed's ``token_guard_middleware.token_tracker`` names, so only the package name changes:

    from producer.token_tracker import InMemoryQuotaStore, QuotaExceededError
"""

from producer.errors import QuotaExceededError
from producer.periods import day_key, month_key, seed_week_key, week_key
from producer.records import maybe_await
from producer.store import InMemoryQuotaStore, QuotaStore, UsageCallback
from producer.tenancy import default_user_id_getter

__all__ = [
    "InMemoryQuotaStore",
    "QuotaExceededError",
    "QuotaStore",
    "UsageCallback",
    "day_key",
    "default_user_id_getter",
    "maybe_await",
    "month_key",
    "seed_week_key",
    "week_key",
]
