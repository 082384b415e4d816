"""A file of proposed quota rules (JSON, or YAML when PyYAML is importable), read into ``QuotaRule``s.

The file is a list of rule objects, or an object ``{"rules": [...]}``. A rule takes the fields of
``schemas.policy.QuotaRule`` by the same names, plus three conveniences for a file written by hand:

- ``effective_from`` may be left out: the beginning of time (1970-01-01T00:00:00Z), so a
  simulation counts the whole topic; ``updated_at`` may be left out: now. A time without an
  offset is UTC, as on the command line.
- ``rate: "60s"`` (or ``"5m"``, ``"1h"``) stands for ``window: rate`` with ``window_seconds``.
- a cost rule's ``limit`` may be given as ``limit_currency: "12.50"``: currency units, converted to
  integer micro-units exactly (a value finer than a micro-unit is an error, never rounded).

A field the rule does not know is an error, not ignored: a misspelt ``limt`` must not simulate a
rule without its limit. Every error is one ``RuleFileError`` line naming the rule and the field.
"""

from __future__ import annotations

import importlib
import json
from datetime import UTC, date, datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from aggregator.errors import AggregatorError
from schemas.policy import QuotaRule
from schemas.prices import MICROS

BEGINNING = datetime(1970, 1, 1, tzinfo=UTC)
MAX_FILE_BYTES = 16 * 1024 * 1024
MAX_RULES = 10_000
CONVENIENCES = frozenset({"rate", "limit_currency"})
FIELDS = frozenset(QuotaRule.model_fields) | CONVENIENCES
_RATE_UNITS = {"s": 1, "m": 60, "h": 3600}


class RuleFileError(AggregatorError, ValueError):
    """The rules file cannot be read or one of its rules is invalid: one line saying where."""


def yaml_available() -> bool:
    """Whether YAML files can be read here (PyYAML importable; it is not a dependency)."""
    try:
        importlib.import_module("yaml")
    except ImportError:
        return False
    return True


def load_rules(path: Path, *, now: datetime | None = None) -> list[QuotaRule]:
    """The rules in the file at ``path``; ``RuleFileError`` for anything wrong with it."""
    try:
        with path.open("rb") as file:
            data = file.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise RuleFileError(f"cannot read rules file {str(path)!r}: {exc.strerror or exc}") from None
    if len(data) > MAX_FILE_BYTES:
        raise RuleFileError(f"rules file {str(path)!r} is over {MAX_FILE_BYTES // (1024 * 1024)} MiB")
    is_yaml = path.suffix.lower() in (".yaml", ".yml")
    return parse_rules(data, yaml=is_yaml, source=str(path), now=now)


def parse_rules(data: bytes | str, *, yaml: bool = False, source: str = "rules file",
                now: datetime | None = None) -> list[QuotaRule]:
    """The rules in ``data`` (JSON; YAML when ``yaml``); ``RuleFileError`` naming ``source``."""
    document = _yaml(data, source) if yaml else _json(data, source)
    if isinstance(document, dict) and set(document) == {"rules"}:
        document = document["rules"]
    if not isinstance(document, list):
        raise RuleFileError(f"{source}: expected a list of rules or {{\"rules\": [...]}}, got {type(document).__name__}")
    if len(document) > MAX_RULES:
        raise RuleFileError(f"{source}: {len(document)} rules, at most {MAX_RULES}")
    stamp = now or datetime.now(UTC)
    rules: list[QuotaRule] = []
    seen: dict[tuple[str | None, str], int] = {}
    for index, item in enumerate(document):
        rule = rule_from(item, index=index, source=source, now=stamp)
        who = (rule.tenant_id, rule.name)
        if who in seen:
            scope = "every tenant" if rule.tenant_id is None else f"tenant {rule.tenant_id!r}"
            raise RuleFileError(f"{source}: rule {index} ({rule.name!r}): a second rule named {rule.name!r} for "
                                f"{scope} (rule {seen[who]}); names are unique per tenant")
        seen[who] = index
        rules.append(rule)
    return rules


def rule_from(item: object, *, index: int, source: str, now: datetime) -> QuotaRule:
    """One rule object of the file, conveniences applied, validated as a ``QuotaRule``."""
    name = item.get("name") if isinstance(item, dict) else None
    where = f"{source}: rule {index}" + (f" ({name!r:.40})" if isinstance(name, str) else "")

    def fail(field: str, message: str) -> RuleFileError:
        return RuleFileError(f"{where}: {field}: {message}")

    if not isinstance(item, dict):
        raise RuleFileError(f"{where}: expected an object, got {type(item).__name__}")
    unknown = sorted(str(key) for key in item if key not in FIELDS)
    if unknown:
        raise fail(unknown[0], f"unknown field (a rule takes: {', '.join(sorted(FIELDS - {'schema_version'}))})")
    fields = dict(item)
    if "rate" in fields:
        if fields.get("window", "rate") != "rate" or "window_seconds" in fields:
            raise fail("rate", "give either rate or window/window_seconds, not both")
        fields["window"], fields["window_seconds"] = "rate", _seconds(fields.pop("rate"), fail)
    if "limit_currency" in fields:
        if "limit" in fields:
            raise fail("limit_currency", "give either limit (micro-units) or limit_currency, not both")
        if fields.get("measure") != "cost":
            raise fail("limit_currency", "only a rule with measure 'cost' has a limit in currency")
        fields["limit"] = _micros(fields.pop("limit_currency"), fail)
    for field, default in (("effective_from", BEGINNING), ("updated_at", now)):
        fields[field] = _instant(fields.get(field, default), field, fail)
    try:
        return QuotaRule.model_validate_json(json.dumps(fields))
    except ValidationError as exc:
        error = exc.errors()[0]
        field = ".".join(str(part) for part in error["loc"]) or "rule"
        raise fail(field, error["msg"].removeprefix("Value error, ")) from None
    except (TypeError, ValueError) as exc:  # json.dumps of something JSON has no form for (a YAML set)
        raise RuleFileError(f"{where}: {exc}") from None


def _seconds(value: object, fail: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and len(value) >= 2 and value[:-1].isdigit() and value[-1] in _RATE_UNITS:
        return int(value[:-1]) * _RATE_UNITS[value[-1]]
    raise fail("rate", f"{value!r:.40} is not a window length such as '60s', '5m' or '1h'")


def _micros(value: object, fail: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise fail("limit_currency", f"{value!r:.40} must be a decimal string such as \"12.50\"")
    try:
        amount = Decimal(value)
    except InvalidOperation:
        raise fail("limit_currency", f"{value!r:.40} is not a number") from None
    if not amount.is_finite() or amount < 0:
        raise fail("limit_currency", f"{value!r:.40} must be 0 or more")
    micros = amount * MICROS
    if micros != micros.to_integral_value():
        raise fail("limit_currency", f"{value!r:.40} has more than 6 decimal places")
    return int(micros)


def _instant(value: object, field: str, fail: Any) -> str:
    """An ISO 8601 string in UTC; a time without an offset (or a YAML date) is UTC."""
    if isinstance(value, datetime):
        when = value
    elif isinstance(value, date):
        when = datetime(value.year, value.month, value.day)
    elif isinstance(value, str):
        try:
            when = datetime.fromisoformat(value)
        except ValueError:
            raise fail(field, f"{value!r:.60} is not an ISO 8601 time (2026-11-01T00:00:00Z)") from None
    else:
        raise fail(field, f"{value!r:.40} is not an ISO 8601 time")
    when = when.replace(tzinfo=when.tzinfo or UTC)
    return when.isoformat()


def _json(data: bytes | str, source: str) -> Any:
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise RuleFileError(f"{source}: not valid JSON: {exc}") from None


def _yaml(data: bytes | str, source: str) -> Any:
    try:
        yaml = importlib.import_module("yaml")
    except ImportError:
        raise RuleFileError(f"{source}: reading YAML needs PyYAML, which is not installed; write the rules as JSON "
                            "(a list of rule objects)") from None
    try:
        return yaml.safe_load(data)
    except (yaml.YAMLError, RecursionError) as exc:
        message = " ".join(str(exc).split())
        raise RuleFileError(f"{source}: not valid YAML: {message}") from None
