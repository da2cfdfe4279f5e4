"""Fault-injecting fakes of an OpenAI-compatible provider and of Anthropic's Messages API (tests only).

Each fake is an aiohttp server on its own thread and event loop, so synchronous tests (the ``openai``
client against real service processes) and asynchronous tests can both use it. Tests script what the
next calls get (``fake.script(...)``: an answer, a status with headers, a slow first byte, a stream cut
midway, malformed JSON, a wrong content type...) and read what the fake received (``fake.calls``).
With nothing scripted a call gets a normal answer: ``pong`` followed by the last user message's words.
The OpenAI-compatible fake also answers ``POST /v1/embeddings``: a vector per input made from its text
(``vector``), so a test knows each input's vector; as floats or base64, of ``dimensions`` if asked.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import struct
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from deploy.topology import free_port


@dataclass
class Fault:
    """What one call gets. ``kind``: ok, status, slow, cut, malformed, wrong_type, stream_error, raw."""

    kind: str = "ok"
    status: int = 200
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    every_s: float = 0.0  # late_end: a keep-alive comment this often
    after: int = 0
    text: str | None = None
    usage: dict[str, Any] = field(default_factory=dict)  # more usage fields (OpenAI's prompt_tokens_details...)
    events: list[str] | None = None  # a raw answer's server-sent events, as written

    @classmethod
    def ok(cls, text: str | None = None, delay_s: float = 0.0, **usage: Any) -> Fault:
        """A normal answer (``text`` or the default echo), optionally after ``delay_s``, its usage with
        ``usage``'s fields added."""
        return cls("ok", text=text, delay_s=delay_s, usage=usage)

    @classmethod
    def error(cls, status: int, body: Any = None, **headers: str) -> Fault:
        """An error status with a JSON body (the provider's error shape by default) and headers."""
        return cls("status", status=status, body=body, headers={k.replace("_", "-"): v for k, v in headers.items()})

    @classmethod
    def raw(cls, status: int = 200, body: Any = None, events: list[str] | None = None) -> Fault:
        """Exactly this answer: ``body`` as JSON with ``status``, or ``events`` (whole server-sent events, as
        written) as a stream: to drive what the normal answers do not say (tool calls, stop reasons...)."""
        return cls("raw", status=status, body=body, events=events)

    @classmethod
    def slow(cls, delay_s: float) -> Fault:
        """Nothing at all (no headers) for ``delay_s``, then a normal answer."""
        return cls("slow", delay_s=delay_s)

    @classmethod
    def cut(cls, after: int) -> Fault:
        """A stream that sends ``after`` events and then drops the connection."""
        return cls("cut", after=after)

    @classmethod
    def malformed(cls) -> Fault:
        """A 200 whose JSON (or first stream event) cannot be parsed."""
        return cls("malformed")

    @classmethod
    def wrong_type(cls) -> Fault:
        """A 200 with an HTML page instead of JSON or an event stream."""
        return cls("wrong_type")

    @classmethod
    def drip(cls, gap_s: float, text: str | None = None) -> Fault:
        """A stream whose events come ``gap_s`` apart (a long answer being generated)."""
        return cls("drip", delay_s=gap_s, text=text)

    @classmethod
    def late_end(cls, delay_s: float, keepalive_s: float = 0.0) -> Fault:
        """A normal stream whose body ends ``delay_s`` after its last event (``[DONE]``), sending a keep-alive
        comment every ``keepalive_s`` meanwhile when that is given."""
        return cls("late_end", delay_s=delay_s, every_s=keepalive_s)

    @classmethod
    def stream_error(cls, after: int, message: str | None = None) -> Fault:
        """A stream that reports an error (overloaded, or ``message``) after ``after`` events."""
        return cls("stream_error", after=after, body=message)


@dataclass
class Received:
    """One call as the fake received it."""

    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    at: float
    peer: Any = None  # the client's (address, port): the same port means a reused connection


DIMENSIONS = 8  # of the fake's vectors when a request does not ask for others


def vector(item: str | list[int], dimensions: int = DIMENSIONS) -> list[float]:
    """The fake's vector of one input (a text, or token ids): unit length, float32 values, from its hash."""
    seed = hashlib.sha256(json.dumps(item).encode()).digest()
    raw = [(b - 127.5) / 127.5 for b in (seed * (dimensions // 32 + 1))[:dimensions]]
    norm = sum(x * x for x in raw) ** 0.5
    return list(struct.unpack(f"<{dimensions}f", struct.pack(f"<{dimensions}f", *(x / norm for x in raw))))


def inputs_of(body: dict[str, Any]) -> list[str | list[int]]:
    """The inputs of an embeddings request, one item each (a text, or one input's token ids)."""
    given = body["input"]
    if isinstance(given, str) or (given and isinstance(given[0], int)):
        return [given]
    return list(given)


def words(text: str) -> list[str]:
    return text.split()


def message_text(message: dict[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    return " ".join(p.get("text", "") for p in content or [] if isinstance(p, dict))


def last_user_text(messages: list[dict[str, Any]]) -> str:
    return next((message_text(m) for m in reversed(messages) if m.get("role") == "user"), "")


class FakeProvider:
    """A fake provider server; ``kind`` is ``openai`` or ``anthropic``."""

    def __init__(self, kind: str = "openai", key: str | None = None) -> None:
        self.kind = kind
        self.key = key
        self.port = free_port()
        self.calls: list[Received] = []
        self.disconnects = 0  # streams whose client went away before the end
        self.open_bodies = 0  # answers being written now
        self._script: deque[Fault] = deque()
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}" + ("/v1" if self.kind == "openai" else "")

    def script(self, *faults: Fault) -> None:
        """What the next calls get, in order (then normal answers again)."""
        with self._lock:
            self._script.clear()
            self._script.extend(faults)

    def reset(self) -> None:
        """Forget the calls received and the script."""
        with self._lock:
            self._script.clear()
            self.calls.clear()
            self.disconnects = 0

    def _next(self) -> Fault:
        with self._lock:
            return self._script.popleft() if self._script else Fault.ok()

    def start(self) -> FakeProvider:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._serve(), self._loop).result(10)
        return self

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _serve(self) -> None:
        app = web.Application()
        path = "/v1/chat/completions" if self.kind == "openai" else "/v1/messages"
        app.router.add_post(path, self._handle)
        if self.kind == "openai":
            app.router.add_post("/v1/embeddings", self._embeddings)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    # -- handling

    def _authorised(self, request: web.Request) -> bool:
        if self.key is None:
            return True
        if self.kind == "anthropic":
            return request.headers.get("x-api-key") == self.key
        return request.headers.get("Authorization") == f"Bearer {self.key}"

    async def _receive(self, request: web.Request) -> tuple[dict[str, Any], Fault, web.StreamResponse | None]:
        """Record a call; its body, its fault, and the answer when the fault (or a wrong key) decides it."""
        body = await request.json()
        with self._lock:
            self.calls.append(Received(request.path, dict(request.headers), body, time.time(),
                                       request.transport.get_extra_info("peername") if request.transport else None))
        fault = self._next()
        if not self._authorised(request):
            # Like OpenAI's 401, the message echoes the key it was given: it must never reach a caller.
            given = request.headers.get("Authorization") or request.headers.get("x-api-key") or ""
            return body, fault, self._error(401, f"Incorrect API key provided: {given}.", "invalid_request_error",
                                            "invalid_api_key")
        if fault.kind in ("slow", "ok") and fault.delay_s:
            await asyncio.sleep(fault.delay_s)
        if fault.kind == "status":
            return body, fault, self._status(fault)
        if fault.kind == "raw":
            return body, fault, await self._raw(request, fault)
        if fault.kind == "wrong_type":
            return body, fault, web.Response(text="<html><body>502 Bad Gateway (proxy)</body></html>",
                                             content_type="text/html")
        return body, fault, None

    async def _embeddings(self, request: web.Request) -> web.Response:
        body, fault, decided = await self._receive(request)
        if decided is not None:
            return decided
        if fault.kind == "malformed":
            return web.Response(text='{"object": "list", "data": [', content_type="application/json")
        items = inputs_of(body)
        dimensions = body.get("dimensions", DIMENSIONS)
        data = [{"object": "embedding", "index": i, "embedding": self._encoded(vector(item, dimensions), body)}
                for i, item in enumerate(items)]
        tokens = sum(len(words(item)) if isinstance(item, str) else len(item) for item in items)
        return web.json_response({"object": "list", "data": data[::-1], "model": body["model"],  # any order
                                  "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    @staticmethod
    def _encoded(values: list[float], body: dict[str, Any]) -> list[float] | str:
        if body.get("encoding_format") == "base64":
            return base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode()
        return values

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body, fault, decided = await self._receive(request)
        if decided is not None:
            return decided
        answer = fault.text if fault.text is not None else " ".join(["pong", *words(last_user_text(body["messages"]))])
        prompt_tokens = sum(len(words(message_text(m))) for m in body["messages"])
        texts = [answer]
        if self.kind == "openai" and (n := body.get("n") or 1) > 1:  # a sample a choice: the next scripted texts
            texts += [self._next().text or answer for _ in range(n - 1)]
        if body.get("stream"):
            return await self._stream(request, body, fault, texts, prompt_tokens)
        if fault.kind == "malformed":
            return web.Response(text='{"id": "x", "choices": [', content_type="application/json")
        whole = self._whole(body, answer, prompt_tokens)
        if len(texts) > 1:
            whole["choices"] = [{"index": j, "message": {"role": "assistant", "content": text},
                                 "finish_reason": "stop"} for j, text in enumerate(texts)][::-1]  # any order
            whole["usage"]["completion_tokens"] = sum(len(words(text)) for text in texts)
            whole["usage"]["total_tokens"] = prompt_tokens + whole["usage"]["completion_tokens"]
        whole["usage"].update(fault.usage)
        return web.json_response(whole)

    def _error(self, status: int, message: str, type_: str, code: str | None = None,
               headers: dict[str, str] | None = None) -> web.Response:
        if self.kind == "anthropic":
            body: dict[str, Any] = {"type": "error", "error": {"type": type_, "message": message}}
        else:
            body = {"error": {"message": message, "type": type_, "param": None, "code": code}}
        return web.json_response(body, status=status, headers=headers)

    @staticmethod
    async def _raw(request: web.Request, fault: Fault) -> web.StreamResponse:
        if fault.events is None:
            return web.json_response(fault.body, status=fault.status)
        resp = web.StreamResponse(status=fault.status, headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for event in fault.events:
            await resp.write(event.encode())
        await resp.write_eof()
        return resp

    def _status(self, fault: Fault) -> web.Response:
        if fault.body is not None:
            return web.json_response(fault.body, status=fault.status, headers=fault.headers)
        kind = {400: "invalid_request_error", 401: "authentication_error", 429: "rate_limit_error",
                529: "overloaded_error"}.get(fault.status, "api_error" if self.kind == "anthropic" else "server_error")
        return self._error(fault.status, f"fake {fault.status}", kind, headers=fault.headers)

    def _whole(self, body: dict[str, Any], answer: str, prompt_tokens: int) -> dict[str, Any]:
        n = len(words(answer))
        if self.kind == "anthropic":
            return {"id": "msg_fake", "type": "message", "role": "assistant", "model": body["model"],
                    "content": [{"type": "text", "text": answer}], "stop_reason": "end_turn",
                    "stop_sequence": None, "usage": {"input_tokens": prompt_tokens, "output_tokens": n}}
        return {"id": "chatcmpl-fake", "object": "chat.completion", "created": int(time.time()),
                "model": body["model"], "choices": [{"index": 0, "message": {"role": "assistant", "content": answer},
                                                     "finish_reason": "stop"}],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n}}

    def _events(self, body: dict[str, Any], texts: list[str], prompt_tokens: int,
                more_usage: dict[str, Any]) -> list[bytes]:
        answer = texts[0]
        pieces = [w + " " for w in words(answer)[:-1]] + words(answer)[-1:]
        if self.kind == "anthropic":
            def ev(name: str, data: dict[str, Any]) -> bytes:
                return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()
            return [
                ev("message_start", {"type": "message_start", "message": {
                    "id": "msg_fake", "type": "message", "role": "assistant", "model": body["model"], "content": [],
                    "usage": {"input_tokens": prompt_tokens, "output_tokens": 1, **more_usage}}}),
                ev("content_block_start", {"type": "content_block_start", "index": 0,
                                           "content_block": {"type": "text", "text": ""}}),
                ev("ping", {"type": "ping"}),
                *[ev("content_block_delta", {"type": "content_block_delta", "index": 0,
                                             "delta": {"type": "text_delta", "text": p}}) for p in pieces],
                ev("content_block_stop", {"type": "content_block_stop", "index": 0}),
                ev("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                                     "usage": {"output_tokens": len(pieces)}}),
                ev("message_stop", {"type": "message_stop"}),
            ]

        def chunk(delta: dict[str, Any], finish: str | None = None, usage: Any = None, index: int = 0) -> bytes:
            data = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": int(time.time()),
                    "model": body["model"], "choices": [] if usage else [{"index": index, "delta": delta,
                                                                           "finish_reason": finish}]}
            if usage:
                data["usage"] = usage
            return f"data: {json.dumps(data)}\n\n".encode()
        # Several choices (n) interleave as OpenAI's do: each one's role chunk first, then their pieces in turn.
        split = [[w + " " for w in words(text)[:-1]] + words(text)[-1:] for text in texts]
        out = [chunk({"role": "assistant", "content": ""}, index=j) for j in range(len(texts))]
        for i in range(max(len(p) for p in split)):
            out += [chunk({"content": p[i]}, index=j) for j, p in enumerate(split) if i < len(p)]
        out += [chunk({}, "stop", index=j) for j in range(len(texts))]
        n = sum(len(p) for p in split)
        if (body.get("stream_options") or {}).get("include_usage"):
            out.append(chunk({}, usage={"prompt_tokens": prompt_tokens, "completion_tokens": n,
                                        "total_tokens": prompt_tokens + n, **more_usage}))
        return [*out, b"data: [DONE]\n\n"]

    async def _stream(self, request: web.Request, body: dict[str, Any], fault: Fault, texts: list[str],
                      prompt_tokens: int) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        events = self._events(body, texts, prompt_tokens, fault.usage)
        if fault.kind == "malformed":
            events = [b"data: {not json\n\n", *events]
        try:
            await self._write_events(request, resp, events, fault)
        except (asyncio.CancelledError, ConnectionResetError):
            with self._lock:
                self.disconnects += 1
            raise
        return resp

    async def _write_events(self, request: web.Request, resp: web.StreamResponse, events: list[bytes],
                            fault: Fault) -> None:
        for i, event in enumerate(events):
            if fault.kind == "drip" and i:
                await asyncio.sleep(fault.delay_s)
            if fault.kind == "cut" and i == fault.after:
                assert request.transport is not None
                request.transport.abort()  # the connection drops mid-answer
                return
            if fault.kind == "stream_error" and i == fault.after:
                error = ({"type": "error", "error": {"type": "overloaded_error", "message": fault.body or "Overloaded"}}
                         if self.kind == "anthropic"
                         else {"error": {"message": fault.body or "overloaded", "type": "server_error"}})
                prefix = "event: error\n" if self.kind == "anthropic" else ""
                await resp.write(f"{prefix}data: {json.dumps(error)}\n\n".encode())
                await resp.write_eof()
                return
            await resp.write(event)
        if fault.kind == "late_end":
            await self._late_end(resp, fault.delay_s, fault.every_s)
        await resp.write_eof()

    async def _late_end(self, resp: web.StreamResponse, delay_s: float, keepalive_s: float) -> None:
        self.open_bodies += 1
        try:
            ends = time.monotonic() + delay_s
            while (left := ends - time.monotonic()) > 0:
                await asyncio.sleep(min(left, keepalive_s) if keepalive_s else left)
                if keepalive_s:
                    await resp.write(b": keep-alive\n\n")
        finally:
            self.open_bodies -= 1


def providers_file(path: Path, provider: FakeProvider, key_env: str = "LW_TEST_KEY") -> Path:
    """A providers file with one provider ``fake`` (``local: true``, so loopback is allowed) at ``provider``'s
    URL, its key in ``key_env``, one model ``echo`` at $1 a million tokens each way, short timeouts."""
    path.write_text(json.dumps({"providers": [{
        "name": "fake", "kind": "openai-compatible", "base_url": provider.url, "local": True,
        "api_key_env": key_env, "models": {"echo": {"input_per_mtok": 1, "output_per_mtok": 1}},
        "timeouts": {"connect_s": 2, "first_byte_s": 2, "total_s": 10}}]}))
    return path
