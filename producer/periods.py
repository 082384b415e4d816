"""The seed's period-key functions, importable from where the seed's users expect them. They live
in ``schemas.periods``: a period key is part of the contract both sides share."""

from schemas.periods import day_key, month_key, period_kind, seed_week_key, week_key

__all__ = ["day_key", "month_key", "period_kind", "seed_week_key", "week_key"]
