"""A chat client whose provider reports hostile usage and model names, streaming or not, and the
table of such reports: the producer tests (unit and on the broker) hold the middleware to turning
each into an event the aggregator reads. Like ``openai_stub``, a provider double, not a test."""

from __future__ import annotations

from typing import Any

from agent_framework import ChatResponse, ChatResponseUpdate, Content, Message, ResponseStream

from producer.scripted import ScriptedChatClient


def details(inp: Any = None, out: Any = None, total: Any = None) -> dict[str, Any]:
    """A provider's usage details, as Agent Framework hands them over."""
    return {"input_token_count": inp, "output_token_count": out, "total_token_count": total}


HOSTILE_USAGE = [
    details(-5, None, None),
    details(None, None, None),
    details(10, 20, 5),
    details("12", 3.7, "nope"),
    details(10**30, 10**30, 10**30),
    details(True, False, None),
    {"input_token_count": 5, "output_token_count": 5, "total_token_count": 10,
     "cache_read_input_token_count": -3, "reasoning_output_token_count": 10**40},
    {},
]
HOSTILE_MODELS = ["m" * 10_000, "\x00\x1b[2J" * 100, "x\ud800y", "é" * 257, 12345, None, ""]


class Hostile(ScriptedChatClient):
    """Reports whatever usage and model name it is told to, streaming or not."""

    def __init__(self, usage: dict[str, Any], model: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.hostile_usage = usage
        self.model = model

    def _inner_get_response(self, *, messages: Any, stream: bool, options: Any, **kwargs: Any) -> Any:
        self.calls += 1
        text = "a fair reply of a few words"
        if stream:
            return ResponseStream(self._updates(text), finalizer=ChatResponse.from_updates)
        return self._answer(text)

    async def _answer(self, text: str) -> ChatResponse:
        return ChatResponse(messages=[Message(role="assistant", contents=[text])],
                            usage_details=self.hostile_usage or None, model=self.model)

    async def _updates(self, text: str) -> Any:
        contents = [Content.from_text(text)]
        if self.hostile_usage:
            contents.append(Content.from_usage(self.hostile_usage))  # type: ignore[arg-type]
        yield ChatResponseUpdate(role="assistant", contents=contents, model=self.model)
