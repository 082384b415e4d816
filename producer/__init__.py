"""TokenGuard Stream, the part that runs inside every agent process.

The seed's names (``TokenGuardMiddleware``, ``QuotaStore``, ``InMemoryQuotaStore``,
``QuotaExceededError``, ``month_key``, ``week_key``, ``day_key``) are importable from here and from
``producer.token_tracker``; ``KafkaQuotaStore`` is the fleet-wide store over Kafka.
"""

from producer.config import KafkaConnection, ProducerConfig
from producer.errors import (
    InvalidCallError,
    KafkaUnavailableError,
    PublisherError,
    QuotaExceededError,
    TokenGuardError,
    WaitTimeoutError,
)
from producer.kafka_store import KafkaQuotaStore
from producer.middleware import TokenGuardMiddleware
from producer.periods import day_key, month_key, seed_week_key, week_key
from producer.publisher import UsagePublisher
from producer.snapshot import QuotaSnapshot
from producer.store import CallUsage, Decision, InMemoryQuotaStore, QuotaBackend, QuotaStore, UsageCallback
from producer.tenancy import default_user_id_getter, tenant_scope, usage_scope
from transport.admin import TopicMismatchError, ensure_topics

__all__ = [
    "CallUsage",
    "Decision",
    "InMemoryQuotaStore",
    "InvalidCallError",
    "KafkaConnection",
    "KafkaQuotaStore",
    "KafkaUnavailableError",
    "ProducerConfig",
    "PublisherError",
    "QuotaBackend",
    "QuotaExceededError",
    "QuotaSnapshot",
    "QuotaStore",
    "TokenGuardError",
    "TokenGuardMiddleware",
    "TopicMismatchError",
    "UsageCallback",
    "UsagePublisher",
    "WaitTimeoutError",
    "day_key",
    "default_user_id_getter",
    "ensure_topics",
    "month_key",
    "seed_week_key",
    "tenant_scope",
    "usage_scope",
    "week_key",
]
