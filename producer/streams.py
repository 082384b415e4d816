"""Exactly one usage record per streamed call, however the stream ends.

A stream can end five ways, and Agent Framework tells a middleware about each differently:

- completed: the result hook sees the final response (usage as the provider reported it);
- failed midway, or cancelled while inside ``__anext__``: the stream's cleanup hooks run with the
  error, no final response;
- closed early by the caller: cleanup hooks run, no final response;
- left behind by its task: the consuming task is cancelled while it is busy between chunks (awaiting
  something else), raises, or returns without finishing the stream. The stream is never told: its
  generator just stays suspended. A done-callback on that task catches it;
- abandoned inside a task that lives on (the caller stops iterating and drops it): nothing runs
  until the stream object is garbage-collected, so a ``weakref.finalize`` catches it, the last resort.

``StreamUsage`` records once, from the first of these that fires. Without a provider count it
records an estimate (input estimated from the messages, output from the text streamed so far)
and flags the event ``estimated``; the recorder (``settle_counts``) decides which counts need one.

Why a task done-callback. Before it, a stream left behind by a cancelled task was settled only when
the garbage collector reached it: its async generators sit in reference cycles, so with the cyclic
collector idle (or ``gc.disable()``) the reservation stayed held and the usage unrecorded for as long
as the process ran. ``asyncio.Task.add_done_callback`` is the one signal the loop gives when a task
ends, however it ends; the loop runs the callback on its next iteration, so the record follows the
task's end deterministically (measured through Agent Framework's OpenAI client against a local
endpoint: about 0.2 ms from ``task.cancel()`` to the record, GC disabled; without the callback, no
record until a collection). The alternatives: a ``try/finally`` in the middleware cannot help (the
middleware has returned before the caller iterates); wrapping the stream's iterator sees only what
happens inside ``__anext__``; polling would add latency and wake-ups.

Which task. The task that pulls the stream's updates: noted when the middleware wraps the stream
(Agent Framework runs chat middleware lazily, in the task of the first pull) and moved on each
update to the task that pulled it, so a stream handed to another task is followed there (the first
task's callback is removed; its end no longer settles the stream). A stream handed over before the
other task's first pull is settled if the first task ends in between: a hand-over is only seen at a
pull. A stream pulled outside any task (no running loop, a foreign driver) has no callback: the
cleanup hooks and the finaliser cover it. Once the stream is recorded, by any path, the callback is
removed, so a long-lived task does not accumulate them and a task that ends after fully consuming
its stream records nothing more. The callback holds the accounting, never the stream, so the
finaliser can still run while the task lives.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable, Mapping
from typing import Any

from producer.estimate import tokens_for_chars
from producer.validation import read_count

# (usage details, model, output estimate) -> awaitable or None; the middleware's recording function.
Recorder = Callable[[dict[str, Any], str | None, Callable[[], int]], Any]

_WRONG = -1  # stands for a wrongly reported count in merged details: settle_counts treats it as one


def merge_usage(total: Mapping[str, Any] | None, update: Mapping[str, Any]) -> dict[str, Any]:
    """Add one update's usage to the stream's so far.

    Unlike ``agent_framework.add_usage_details``, which counts None as 0 (a provider that never
    counted would be billed nothing, unflagged), a key that was never reported stays absent and a
    wrong report (negative, not a number) stays wrong, so the recorder estimates and flags it.
    """
    merged = dict(total or {})
    for key, value in update.items():
        count, wrong = read_count(value)
        held = merged.get(key)
        if wrong or held == _WRONG:
            merged[key] = _WRONG
        elif count is not None:
            merged[key] = count if held is None else held + count
    return merged


class StreamUsage:
    def __init__(self, record: Recorder) -> None:
        self._record = record
        self._usage: dict[str, Any] | None = None
        self._output_chars = 0
        self._model: str | None = None
        self._task: asyncio.Task[Any] | None = None
        self.recorded = False

    def attach(self, context: Any) -> None:
        """Register the hooks on a ``ChatContext``; call ``watch`` on the stream after ``call_next``."""
        context.stream_transform_hooks.append(self.on_update)
        context.stream_result_hooks.append(self.on_final)
        context.stream_cleanup_hooks.append(self.on_cleanup)

    def watch(self, stream: object) -> None:
        """Settle when ``stream`` is garbage-collected, or when the task pulling it ends first."""
        if stream is not None:
            weakref.finalize(stream, self._settle)
            self._follow(_current_task())

    def on_update(self, update: Any) -> Any:
        task = _current_task()
        if task is not self._task and task is not None:
            self._follow(task)
        for content in getattr(update, "contents", None) or ():
            if getattr(content, "type", None) == "usage" and content.usage_details:
                self._usage = merge_usage(self._usage, content.usage_details)
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
        self._unfollow()
        return self._record(details, model, self._output_estimate)

    def _follow(self, task: asyncio.Task[Any] | None) -> None:
        """Settle when ``task`` ends (instead of the task followed so far) unless recorded by then."""
        if self.recorded or task is self._task:
            return
        self._unfollow()
        if task is not None and not task.done():
            task.add_done_callback(self._task_ended)
            self._task = task

    def _unfollow(self) -> None:
        if self._task is not None:
            self._task.remove_done_callback(self._task_ended)
            self._task = None

    def _task_ended(self, task: asyncio.Task[Any]) -> None:
        self._task = None
        self._settle()

    def _output_estimate(self) -> int:
        return tokens_for_chars(self._output_chars)


def _current_task() -> asyncio.Task[Any] | None:
    try:
        return asyncio.current_task()
    except RuntimeError:  # no running loop
        return None
