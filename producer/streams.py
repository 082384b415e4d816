"""Exactly one usage record per streamed call, however the stream ends.

A stream can end four ways, and Agent Framework tells a middleware about each differently:

- completed: the result hook sees the final response (usage as the provider reported it);
- failed midway or cancelled: the stream's cleanup hooks run with the error, no final response;
- closed early by the caller: cleanup hooks run, no final response;
- abandoned (the caller stops iterating and drops it): nothing runs until the stream object is
  garbage-collected, so a ``weakref.finalize`` catches it.

``StreamUsage`` records once, from the first of these that fires. Without a provider count it
records an estimate (input estimated from the messages, output from the text streamed so far)
and flags the event ``estimated``.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable
from typing import Any

from agent_framework import add_usage_details

from producer.estimate import tokens_for_chars

# (usage details, model, estimated) -> awaitable or None; the middleware's recording function.
Recorder = Callable[[dict[str, Any], str | None, bool], Any]


class StreamUsage:
    def __init__(self, record: Recorder, *, input_estimate: int) -> None:
        self._record = record
        self._input_estimate = input_estimate
        self._usage: dict[str, Any] | None = None
        self._output_chars = 0
        self._model: str | None = None
        self.recorded = False

    def attach(self, context: Any) -> None:
        """Register the hooks on a ``ChatContext``; call ``watch`` on the stream after ``call_next``."""
        context.stream_transform_hooks.append(self.on_update)
        context.stream_result_hooks.append(self.on_final)
        context.stream_cleanup_hooks.append(self.on_cleanup)

    def watch(self, stream: object) -> None:
        if stream is not None:
            weakref.finalize(stream, self._settle)

    def on_update(self, update: Any) -> Any:
        for content in getattr(update, "contents", None) or ():
            if getattr(content, "type", None) == "usage" and content.usage_details:
                self._usage = dict(add_usage_details(self._usage, content.usage_details))  # type: ignore[arg-type]
        text = getattr(update, "text", None)
        if text:
            self._output_chars += len(text)
        model = getattr(update, "model", None)
        if model:
            self._model = model
        return update

    async def on_final(self, response: Any) -> Any:
        if not self.recorded:
            details = self._usage or dict(getattr(response, "usage_details", None) or {})
            model = getattr(response, "model", None) or self._model
            result = self._take(details, model)
            if asyncio.iscoroutine(result):
                await result
        return response

    def on_cleanup(self) -> None:
        # On a normal end the result hook follows at once in the same task; on an error, a cancel or
        # an early close it never comes. Settle after the task yields, by which time it has run.
        try:
            asyncio.get_running_loop().call_soon(self._settle)
        except RuntimeError:
            self._settle()

    def _settle(self) -> None:
        if self.recorded:
            return
        result = self._take(self._usage or {}, self._model)
        if asyncio.iscoroutine(result):
            try:
                asyncio.get_running_loop().create_task(result)
            except RuntimeError:
                result.close()

    def _take(self, details: dict[str, Any], model: str | None) -> Any:
        self.recorded = True
        if details:
            return self._record(details, model, False)
        estimate = {
            "input_token_count": self._input_estimate,
            "output_token_count": tokens_for_chars(self._output_chars),
        }
        return self._record(estimate, model, True)
