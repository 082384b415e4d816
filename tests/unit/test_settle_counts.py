"""``settle_counts`` decides the common case (three good provider counts) in a few comparisons
before its rules; over every combination of counts, good and bad, it gives what the rules give."""

from __future__ import annotations

import itertools
from typing import Any

from producer.validation import MAX_TOKENS_PER_EVENT, Counts, _settle_by_rules, settle_counts

VALUES: list[Any] = [None, 0, 1, 7, 10, MAX_TOKENS_PER_EVENT, MAX_TOKENS_PER_EVENT + 1, -1, True, 3.0, "5"]
EXTRAS: list[Any] = [None, 0, 2, MAX_TOKENS_PER_EVENT + 1, -2, False]
KEYS = ("input_token_count", "output_token_count", "total_token_count")
EXTRA_KEYS = ("cache_creation_input_token_count", "cache_read_input_token_count", "reasoning_output_token_count")
_ABSENT = object()


def details(values: tuple[Any, ...], keys: tuple[str, ...]) -> dict[str, Any]:
    return {key: value for key, value in zip(keys, values, strict=True) if value is not _ABSENT}


def test_the_fast_path_gives_what_the_rules_give_for_every_combination() -> None:
    checked = 0
    for counts in itertools.product([*VALUES, _ABSENT], repeat=3):
        for extra in EXTRAS:
            for position in range(3):
                given = details(counts, KEYS)
                if extra is not None:
                    given[EXTRA_KEYS[position]] = extra
                for estimates in ((lambda: 0, lambda: 0), (lambda: 5, lambda: 9), (None, None)):
                    expected = _settle_by_rules(given, *estimates)
                    assert settle_counts(given, input_estimate=estimates[0], output_estimate=estimates[1]) == expected, given
                    checked += 1
    assert checked > 10_000


def test_good_provider_counts_are_taken_as_they_are() -> None:
    given = {"input_token_count": 10, "output_token_count": 50, "total_token_count": 60, "cache_read_input_token_count": 4}
    assert settle_counts(given) == Counts(10, 50, 60, None, 4, None, False)
