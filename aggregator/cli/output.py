"""Output an operator's terminal can trust, and errors read as one line."""

from __future__ import annotations

import json

from pydantic import ValidationError

from schemas.limits import QuotaLimit
from schemas.policy import parse_counter_key
from schemas.totals import TotalsRecord


def printable(value: object) -> str:
    """``str(value)`` with every non-printable character (ESC and other controls, line breaks,
    bidi overrides, zero-width characters) written as its Python escape (``\\x1b``).

    Tenant ids, period keys and reasons come from topics anyone with write access may fill; raw,
    they could clear the operator's screen, forge lines or hide text. Printable text is unchanged.
    """
    text = str(value)
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in text)


def totals_row(record: TotalsRecord) -> str:
    """One ``usage show`` line; a quota rule's counter shows as ``rule <name> <window>`` (its
    used and limit in the rule's unit: tokens, requests or micro-units of its currency)."""
    parsed = parse_counter_key(record.period_key)
    period = f"rule {parsed[0]} {parsed[2]}" if parsed else record.period_key
    return (f"{printable(record.tenant_id):<24} {printable(period):<12} {record.used_tokens:>14,} "
            f"{record.limit_tokens:>14,} {record.event_count:>10,}  {printable(record.state)}")


TOTALS_HEADER = f"{'tenant':<24} {'period':<12} {'used':>14} {'limit':>14} {'events':>10}  state"


def totals_json(record: TotalsRecord) -> str:
    """One ``usage show --json`` line: exact values, every non-ASCII character escaped; a quota
    rule's counter also says its ``rule`` and ``window``."""
    fields = record.model_dump(mode="json")
    parsed = parse_counter_key(record.period_key)
    if parsed:
        fields |= {"rule": parsed[0], "window": parsed[2]}
    return json.dumps(fields, ensure_ascii=True)


def show_limit(limit: QuotaLimit) -> str:
    who = "(default)" if limit.tenant_id is None else printable(limit.tenant_id)
    ratio = f", warning at {limit.warning_ratio:.0%}" if limit.warning_ratio else ""
    return (f"{who}: {limit.limit_tokens:,} tokens per {printable(limit.period)} period{ratio} "
            f"(set {limit.updated_at:%Y-%m-%d %H:%M} UTC)")


def validation_message(exc: ValidationError, flags: dict[str, str] | None = None) -> str:
    """A pydantic error as one line, naming the flag that set each field."""
    flags = flags or {}
    parts = []
    for error in exc.errors():
        field = ".".join(str(part) for part in error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        parts.append(f"{flags.get(field, field)}: {message}" if field else message)
    return "; ".join(parts)
