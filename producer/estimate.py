"""Token estimates, for reservations before a call and for streams whose provider never says.

About four characters a token, as providers' tokenizers average on English. An estimate only
ever stands in for a count the provider did not give, and the event says so (``estimated``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

# Per-message framing tokens (role, separators) that chat formats add around the text.
MESSAGE_OVERHEAD = 4


def tokens_for_chars(chars: int) -> int:
    return (chars + 3) // 4


def estimate_text_tokens(text: str) -> int:
    return tokens_for_chars(len(text))


def estimate_input_tokens(messages: Iterable[Any]) -> int:
    total = 0
    for message in messages:
        total += MESSAGE_OVERHEAD + estimate_text_tokens(getattr(message, "text", "") or "")
    return max(total, 1)
