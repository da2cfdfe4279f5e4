"""Bodies the gateway cannot read, and requests it refuses itself: a 4xx in OpenAI's shape, with the headers
every answer carries, naming what is wrong and where; none of them reaches NATS."""

from __future__ import annotations

import gzip
import json
import re
import socket
import time
import uuid
import zlib

import httpx
import nats
import pytest

from tests.conftest import Stack
from tests.support import Service, running

pytestmark = pytest.mark.e2e
REQUEST = {"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 2}
REQUEST_ID = re.compile(r"[0-9a-f]{32}")  # the gateway's own ids (shared.envelope.new_request_id)


def send(stack: Stack, body: bytes, path: str = "chat/completions", **headers: str) -> httpx.Response:
    return httpx.post(f"{stack.base_url}/{path}", content=body, timeout=30,
                      headers={"content-type": "application/json", **headers})


def error_of(resp: httpx.Response) -> dict[str, object]:
    body = resp.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return dict(body["error"])


def with_content(content: object, **fields: object) -> bytes:
    return json.dumps({**REQUEST, "messages": [{"role": "user", "content": content}], **fields}).encode()


class TestContentEncoding:
    @pytest.mark.parametrize("encode", [gzip.compress, zlib.compress])
    def test_compressed_body_is_read(self, stack: Stack, encode: object) -> None:
        """A body compressed with gzip or deflate, as its Content-Encoding says, is answered as usual."""
        assert callable(encode)
        coding = "gzip" if encode is gzip.compress else "deflate"
        r = send(stack, encode(json.dumps(REQUEST).encode()), **{"content-encoding": coding})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 2

    @pytest.mark.parametrize(("coding", "body"), [
        ("gzip", json.dumps(REQUEST).encode()),  # not compressed at all
        ("gzip", gzip.compress(json.dumps(REQUEST).encode())[:-12]),  # cut short
        ("deflate", b"\x78\x9c not deflate at all"),
    ], ids=["plain-as-gzip", "gzip-cut-short", "garbage-as-deflate"])
    def test_body_that_does_not_match_its_encoding(self, stack: Stack, coding: str, body: bytes) -> None:
        """A body its Content-Encoding does not decode is a 400 saying so (it was a 500 and a traceback)."""
        r = send(stack, body, **{"content-encoding": coding})
        assert r.status_code == 400
        err = error_of(r)
        assert err["type"] == "invalid_request_error"
        assert err["code"] == "invalid_content_encoding"
        assert f"could not be decoded as {coding}" in str(err["message"])
        assert REQUEST_ID.fullmatch(r.headers["x-request-id"])

    @pytest.mark.parametrize("coding", ["br", "zstd", "compress"])
    def test_encoding_the_gateway_does_not_decode(self, stack: Stack, coding: str) -> None:
        """A Content-Encoding other than gzip, deflate or identity is a 415 in OpenAI's shape naming those that
        work, with Accept-Encoding listing them (br and zstd were aiohttp's plain-text 400)."""
        r = send(stack, b"\x00compressed", **{"content-encoding": coding})
        assert r.status_code == 415
        err = error_of(r)
        assert err["code"] == "unsupported_content_encoding"
        assert coding in str(err["message"])
        assert "gzip" in str(err["message"])
        assert "deflate" in str(err["message"])
        assert r.headers["accept-encoding"] == "gzip, deflate"
        assert REQUEST_ID.fullmatch(r.headers["x-request-id"])

    def test_body_that_inflates_past_the_limit(self, stack: Stack) -> None:
        """A small gzip body that inflates past the body limit (8 MiB) is a 413, not read whole."""
        body = json.dumps({**REQUEST, "user": "x" * (9 * 1024 * 1024)}).encode()
        r = send(stack, gzip.compress(body), **{"content-encoding": "gzip"})
        assert r.status_code == 413
        assert error_of(r)["code"] == "request_too_large"


LONE = b'"hi \\ud800 there"'


class TestUnreadableJson:
    @pytest.mark.parametrize(("path", "body", "param"), [
        ("embeddings", b'{"model": "tiny-embed", "input": %s}', "input"),
        ("embeddings", b'{"model": "tiny-embed", "input": ["ok", %s]}', "input.1"),
        ("chat/completions", b'{"model": "tiny", "max_tokens": 1, "messages": [{"role": "user", "content": %s}]}',
         "messages.0.content"),
        ("route/dry-run", b'{"model": "tiny", "messages": [{"role": "user", "content": %s}]}',
         "messages.0.content"),
    ], ids=["embeddings", "embeddings-list", "chat", "dry-run"])
    async def test_lone_surrogate(self, stack: Stack, path: str, body: bytes, param: str) -> None:
        """A lone UTF-16 surrogate (``"\\ud800"``) is a 400 naming where it is, and nothing is sent on to the
        site (embeddings were a 500 and a dead letter; chat a 400 about a hex escape, from the router)."""
        marker = f'"marker {uuid.uuid4().hex}"'.encode()
        nc = await nats.connect(stack.nats.url)
        try:
            sub = await nc.subscribe(f"lw.v1.{stack.site}.>")
            await nc.flush()
            async with httpx.AsyncClient(base_url=stack.base_url, timeout=30) as http:
                r = await http.post(path, content=body % LONE, headers={"content-type": "application/json"})
                after = await http.post(path, content=body % marker, headers={"content-type": "application/json"})
            seen = [await sub.next_msg(timeout=10)]
            while marker not in seen[-1].data:  # the gateway publishes in order: the bad one would come first
                seen.append(await sub.next_msg(timeout=10))
        finally:
            await nc.close()  # not drain: it would wait 30 s for the messages nobody reads off this subscription
        assert after.status_code == 200
        assert r.status_code == 400
        err = error_of(r)
        assert err["type"] == "invalid_request_error"
        assert "lone UTF-16 surrogate" in str(err["message"])
        assert err["param"] == param
        assert REQUEST_ID.fullmatch(r.headers["x-request-id"])
        assert not [m for m in seen if b"ud800" in m.data]

    def test_json_nested_too_deep(self, stack: Stack) -> None:
        """JSON nested thousands deep is a 400 (Python's parser gave up with a RecursionError: a 500)."""
        r = send(stack, b'{"model": "tiny", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
        assert r.status_code == 400
        assert "nest" in str(error_of(r)["message"])

    def test_json_only_python_reads(self, stack: Stack) -> None:
        """JSON that no service could parse again (UTF-16 here) is refused at the gateway, not by the router."""
        r = send(stack, json.dumps(REQUEST).encode("utf-16"))
        assert r.status_code == 400
        assert str(error_of(r)["message"]).startswith("Invalid JSON")
        assert REQUEST_ID.fullmatch(r.headers["x-request-id"])


class TestGatewayErrorHeaders:
    @pytest.mark.parametrize(("method", "path", "body", "status"), [
        ("POST", "chat/completions", json.dumps({"model": "tiny"}).encode(), 400),
        ("POST", "chat/completions", b"{not json", 400),
        ("POST", "embeddings", b"[]", 400),
        ("GET", "nothing-here", b"", 404),
        ("GET", "chat/completions", b"", 405),
        ("POST", "chat/completions", b"x" * (9 * 1024 * 1024), 413),
    ], ids=["invalid", "not-json", "not-an-object", "unknown-url", "wrong-method", "too-large"])
    def test_every_error_carries_a_request_id(self, stack: Stack, method: str, path: str, body: bytes,
                                              status: int) -> None:
        """Errors the gateway makes itself carry a fresh ``x-request-id``, as every answer does."""
        ids = set()
        for _ in range(2):
            r = httpx.request(method, f"{stack.base_url}/{path}", content=body or None, timeout=30)
            assert r.status_code == status
            error_of(r)
            assert REQUEST_ID.fullmatch(r.headers.get("x-request-id", ""))
            ids.add(r.headers["x-request-id"])
        assert len(ids) == 2

    def test_method_not_allowed_says_which_are(self, stack: Stack) -> None:
        """A 405 keeps its Allow header."""
        r = httpx.get(f"{stack.base_url}/chat/completions")
        assert r.status_code == 405
        assert error_of(r)["code"] == "method_not_allowed"
        assert r.headers["allow"] == "POST"


class TestValidationMessages:
    @pytest.mark.parametrize(("body", "param", "says"), ids=[
        "text-part-without-text", "text-part-text-not-a-string", "input_text-part", "part-without-type",
        "part-not-an-object", "empty-content", "content-a-number", "stop-not-strings", "n-2", "stream_options-alone",
    ], argvalues=[
        (with_content([{"type": "text"}]), "messages.0.content.0.text", "Field required"),
        (with_content([{"type": "text", "text": "a"}, {"type": "text", "text": 5}]), "messages.0.content.1.text",
         "valid string"),
        (with_content([{"type": "input_text", "text": "hi"}]), "messages.0.content.0.type", "'input_text'"),
        (with_content([{"text": "hi"}]), "messages.0.content.0.type", "Field required"),
        (with_content(["hi"]), "messages.0.content.0", "valid dictionary"),
        (with_content([]), "messages.0.content", "at least 1 item"),
        (with_content(5), "messages.0.content", "valid string"),
        (with_content("hi", stop=[1]), "stop.0", "valid string"),
        (with_content("hi", n=129), "n", "less than or equal to 128"),
        (with_content("hi", stream_options={"include_usage": True}), "stream_options",
         "only allowed when stream is true"),
    ])
    def test_refusal_names_the_parameter(self, stack: Stack, body: bytes, param: str, says: str) -> None:
        """A refused chat request is a 400 whose ``param`` is where the fault is, with none of the union's
        inner names (``str``, ``list[...]``, class names), and whose message says what is wrong."""
        r = send(stack, body)
        assert r.status_code == 400
        err = error_of(r)
        assert err["type"] == "invalid_request_error"
        assert err["param"] == param
        assert says in str(err["message"])
        assert "Value error" not in str(err["message"])

    def test_non_text_part_is_still_told_apart(self, stack: Stack) -> None:
        """An image part to the text-only local model is still the 400 saying it reads text only."""
        r = send(stack, with_content([{"type": "text", "text": "what is this"},
                                      {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]))
        assert r.status_code == 400
        assert "text only" in str(error_of(r)["message"])


def test_a_body_that_never_finishes_arriving_is_408(stack: Stack) -> None:
    """A client that announces a body and stops sending it (or whose chunked framing broke) gets a 408 once
    LW_GATEWAY_BODY_TIMEOUT_S has passed, and its connection is closed: it does not hold a handler for ever."""
    gateway = Service("gateway", {"LW_NATS_URL": stack.nats.url, "LW_SITE": stack.site,
                                  "LW_GATEWAY_BODY_TIMEOUT_S": "1"})
    with running(gateway):
        host, port = gateway.base.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 1000\r\n\r\n{\"model\": \"tiny\"")
            started = time.monotonic()
            answer = b""
            while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                answer += chunk
        waited = time.monotonic() - started
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), head
    assert json.loads(body)["error"]["code"] == "request_timeout"
    assert 0.9 <= waited < 8
