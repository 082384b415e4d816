"""The contract between the middleware, the aggregator and billing consumers: pydantic models only."""

from schemas.errors import DecodeError, SchemaError
from schemas.limits import QuotaLimit
from schemas.notices import Heartbeat, QuotaNotice, QuotaState
from schemas.topics import DEFAULT_PREFIX, TopicLayout, TopicSpec
from schemas.totals import TotalsRecord
from schemas.usage import USAGE_SCHEMA_VERSION, UsageEvent

__all__ = [
    "DEFAULT_PREFIX",
    "USAGE_SCHEMA_VERSION",
    "DecodeError",
    "Heartbeat",
    "QuotaLimit",
    "QuotaNotice",
    "QuotaState",
    "SchemaError",
    "TopicLayout",
    "TopicSpec",
    "TotalsRecord",
    "UsageEvent",
]
