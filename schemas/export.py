"""Write the JSON Schema of every model to schemas/json/: ``python -m schemas.export``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pydantic import BaseModel

from schemas.limits import QuotaLimit
from schemas.notices import Heartbeat, QuotaNotice
from schemas.policy import QuotaRule
from schemas.prices import ModelPrice
from schemas.totals import TotalsRecord
from schemas.usage import UsageEvent

JSON_DIR = Path(__file__).resolve().parent / "json"
MODELS: dict[str, type[BaseModel]] = {
    "usage_event": UsageEvent,
    "quota_notice": QuotaNotice,
    "heartbeat": Heartbeat,
    "quota_limit": QuotaLimit,
    "totals_record": TotalsRecord,
    "model_price": ModelPrice,
    "quota_rule": QuotaRule,
}


def rendered() -> dict[str, str]:
    """File name -> file text, exactly as checked in."""
    return {
        f"{name}.schema.json": json.dumps(model.model_json_schema(mode="validation"), indent=2, sort_keys=True) + "\n"
        for name, model in MODELS.items()
    }


def main() -> int:
    JSON_DIR.mkdir(exist_ok=True)
    for file_name, text in rendered().items():
        (JSON_DIR / file_name).write_text(text)
        print(JSON_DIR / file_name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
