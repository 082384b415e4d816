"""TokenGuard Stream's aggregator: exact totals per tenant and period, and over-quota notices."""

from aggregator.config import AggregatorConfig
from aggregator.errors import AggregatorError, RestoreError
from aggregator.service import AggregatorService
from aggregator.state import Limits, Totals, TotalsState, classify
from aggregator.stats import AggregatorStats

__all__ = [
    "AggregatorConfig",
    "AggregatorError",
    "AggregatorService",
    "AggregatorStats",
    "Limits",
    "RestoreError",
    "Totals",
    "TotalsState",
    "classify",
]
