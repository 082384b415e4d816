"""A local OpenAI-compatible chat-completions endpoint on 127.0.0.1, for driving Agent Framework's
own ``OpenAIChatCompletionClient`` through real HTTP, streaming included.

The requested model name picks the behaviour:

- ``stub-complete``: streams the reply, then a usage chunk (when ``stream_options.include_usage``);
- ``stub-no-usage``: streams the reply and never reports usage;
- ``stub-fail``: streams two chunks, then breaks the connection mid-body;
- ``stub-slow``: like complete, with 200 ms between chunks (time to cancel or walk away).
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

PROMPT_TOKENS = 21
WORDS = ["Tokens", " are", " counted", " once", " and", " only", " once", "."]


class OpenAIStub:
    def __init__(self) -> None:
        self._server: asyncio.Server | None = None
        self.port = 0
        self.requests: list[dict[str, Any]] = []
        self.streams_finished = 0
        self._handlers: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def __aenter__(self) -> OpenAIStub:
        self._server = await asyncio.start_server(self._handle, host="127.0.0.1", port=0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):  # streams a client walked away from
            writer.transport.abort()
        if self._handlers:
            await asyncio.wait(self._handlers, timeout=5)
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self._writers.add(writer)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            headers = {
                name.strip().lower(): value.strip()
                for name, _, value in (line.partition(":") for line in head.decode().split("\r\n")[1:] if line)
            }
            body = json.loads(await reader.readexactly(int(headers.get("content-length", "0"))) or b"{}")
            self.requests.append(body)
            if body.get("stream"):
                await self._stream(body, writer)
            else:
                await self._respond(body, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            self._writers.discard(writer)
            self._handlers.discard(task)

    def _chunk(self, model: str, delta: dict[str, Any] | None, finish: str | None = None, usage: dict | None = None) -> bytes:
        payload: dict[str, Any] = {
            "id": "chatcmpl-stub", "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
        if usage is not None:
            payload["usage"] = usage
        data = f"data: {json.dumps(payload)}\n\n".encode()
        return f"{len(data):x}\r\n".encode() + data + b"\r\n"

    async def _stream(self, body: dict[str, Any], writer: asyncio.StreamWriter) -> None:
        model = body.get("model", "stub-complete")
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"
            b"Connection: close\r\n\r\n"
        )
        delay = 0.2 if model == "stub-slow" else 0.0
        for index, word in enumerate(WORDS):
            delta = {"role": "assistant", "content": word} if index == 0 else {"content": word}
            writer.write(self._chunk(model, delta))
            await writer.drain()
            if model == "stub-fail" and index == 1:
                writer.write(b"400\r\ndata: {\"trunc")  # a chunk cut short, then the connection drops
                await writer.drain()
                writer.transport.abort()
                return
            if delay:
                await asyncio.sleep(delay)
            if writer.transport.is_closing():
                return
        writer.write(self._chunk(model, {}, finish="stop"))
        if model != "stub-no-usage" and (body.get("stream_options") or {}).get("include_usage"):
            writer.write(self._chunk(model, None, usage=usage(len(WORDS))))
        data = b"data: [DONE]\n\n"
        writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n0\r\n\r\n")
        await writer.drain()
        self.streams_finished += 1

    async def _respond(self, body: dict[str, Any], writer: asyncio.StreamWriter) -> None:
        model = body.get("model", "stub-complete")
        payload: dict[str, Any] = {
            "id": "chatcmpl-stub", "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(WORDS)}, "finish_reason": "stop"}],
        }
        if model != "stub-no-usage":
            payload["usage"] = usage(len(WORDS))
        data = json.dumps(payload).encode()
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode()
            + data
        )
        await writer.drain()


def usage(completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": PROMPT_TOKENS,
        "completion_tokens": completion_tokens,
        "total_tokens": PROMPT_TOKENS + completion_tokens,
    }
