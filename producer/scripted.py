"""A chat client that answers from a script and reports realistic usage: demos and tests, no LLM.

It is a real Agent Framework client (``BaseChatClient`` with the middleware and function layers),
so ``Agent``, chat middleware and streaming behave exactly as with a provider's client.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from agent_framework import (
    BaseChatClient,
    ChatMiddlewareLayer,
    ChatResponse,
    ChatResponseUpdate,
    Content,
    FunctionInvocationLayer,
    Message,
    ResponseStream,
    UsageDetails,
)

from producer.estimate import estimate_input_tokens, estimate_text_tokens

_WORDS = ["the", "quota", "holds", "because", "every", "call", "is", "counted", "once", "and", "the", "fleet", "hears", "about", "a", "crossed", "limit", "within", "a", "heartbeat", "so", "tokens", "stay", "inside", "the", "budget", "the", "operator", "set", "for", "each", "tenant"]


class ScriptedChatClient(ChatMiddlewareLayer, FunctionInvocationLayer, BaseChatClient):  # type: ignore[misc]
    """Replies with ``reply_words`` words (random in a range when a tuple) and reports their usage.

    Args:
        model: Reported as the response's model.
        reply_words: Fixed length, or a (low, high) range drawn per call.
        latency_s: Simulated time to first token (and between stream chunks, divided by chunks).
        seed: Seeds the random draw, for reproducible runs.
    """

    OTEL_PROVIDER_NAME = "scripted"

    def __init__(
        self,
        *,
        model: str = "scripted-1",
        reply_words: int | tuple[int, int] = 40,
        latency_s: float = 0.0,
        seed: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.model = model
        self.model_id = model  # where the middleware looks for the model before the call, as on real clients
        self.reply_words = reply_words
        self.latency_s = latency_s
        self._random = random.Random(seed)
        self.calls = 0

    def _reply(self, messages: Sequence[Message], max_tokens: int | None) -> tuple[str, UsageDetails]:
        words = self.reply_words
        count = words if isinstance(words, int) else self._random.randint(words[0], words[1])
        text = " ".join(_WORDS[i % len(_WORDS)] for i in range(count))
        if max_tokens is not None and estimate_text_tokens(text) > max_tokens:
            text = text[: max(1, max_tokens) * 4]  # the model stops at max_tokens, as providers do
        input_tokens = estimate_input_tokens(messages)
        output_tokens = max(1, estimate_text_tokens(text))
        usage = UsageDetails(
            input_token_count=input_tokens,
            output_token_count=output_tokens,
            total_token_count=input_tokens + output_tokens,
        )
        return text, usage

    def _inner_get_response(
        self, *, messages: Sequence[Message], stream: bool, options: Mapping[str, Any], **kwargs: Any
    ) -> Any:
        self.calls += 1
        max_tokens = options.get("max_tokens")
        text, usage = self._reply(messages, max_tokens if isinstance(max_tokens, int) else None)
        if stream:
            return ResponseStream(self._stream(text, usage), finalizer=ChatResponse.from_updates)
        return self._respond(text, usage)

    async def _respond(self, text: str, usage: UsageDetails) -> ChatResponse:
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        return ChatResponse(
            messages=[Message(role="assistant", contents=[text])], usage_details=usage, model=self.model
        )

    async def _stream(self, text: str, usage: UsageDetails) -> AsyncIterator[ChatResponseUpdate]:
        words = text.split(" ")
        chunks = [" ".join(words[i : i + 8]) for i in range(0, len(words), 8)] or [""]
        for index, chunk in enumerate(chunks):
            if self.latency_s:
                await asyncio.sleep(self.latency_s / len(chunks))
            contents = [Content.from_text(chunk if index == 0 else " " + chunk)]
            if index == len(chunks) - 1:
                # Providers report usage once, on the last chunk of the stream.
                contents.append(Content.from_usage(usage))
            yield ChatResponseUpdate(role="assistant", contents=contents, model=self.model)
