"""Calling providers through faults: what is retried, what is not, timeouts, the breaker, the first byte.

The fakes are real HTTP servers (aiohttp, in the test process); the adapter's ``Upstream`` calls them
exactly as it calls a provider. Backoff waits are shortened (base 10 ms) except where a test checks that
a provider's own hint (Retry-After) is honoured.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from pydantic import SecretStr

from schemas.chat import ChatCompletionRequest
from schemas.cloud import BreakerState
from services.cloud_adapter.breaker import Breaker, BreakerPolicy
from services.cloud_adapter.config import Provider, ProviderSpec
from services.cloud_adapter.dialect import Delta, Finish, Piece, Tokens
from services.cloud_adapter.retry import RetryPolicy
from services.cloud_adapter.upstream import Upstream
from shared.errors import (
    InvalidRequest,
    LeafwireError,
    ModelNotFound,
    Overloaded,
    ProviderUnavailable,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamTimeout,
)
from tests.fakes import FakeProvider, Fault

KEY = "sk-test-0123456789abcdef"
FAST = RetryPolicy(max_attempts=3, base_s=0.01, cap_s=0.05, max_wait_s=5)


@pytest.fixture(scope="module", params=["openai", "anthropic"])
def fake(request: pytest.FixtureRequest) -> Iterator[FakeProvider]:
    server = FakeProvider(request.param, key=KEY).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(autouse=True)
def _fresh(fake: FakeProvider) -> None:
    fake.reset()


def spec(fake: FakeProvider, **over: Any) -> ProviderSpec:
    fields: dict[str, Any] = {
        "name": "fake", "kind": "openai-compatible" if fake.kind == "openai" else "anthropic",
        "base_url": fake.url, "local": True, "models": {"m": {"upstream": "fake-model-1"}},
        "timeouts": {"connect_s": 2, "first_byte_s": 1.0, "total_s": 5}, **over}
    return ProviderSpec.model_validate(fields)


@pytest.fixture
async def upstream(fake: FakeProvider) -> AsyncIterator[Upstream]:
    u = Upstream(Provider(spec=spec(fake), key=SecretStr(KEY)), FAST, Breaker("fake", BreakerPolicy(failures=3)))
    await u.start()
    try:
        yield u
    finally:
        await u.close()


def request(stream: bool = False, **kw: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"model": "fake/m", "messages": [{"role": "user", "content": "hello there"}], "stream": stream, **kw})


async def complete(u: Upstream, **kw: Any) -> Any:
    return await u.complete(u.call(request(**kw), "m", u.provider.spec.models["m"], time.time() + 30))


async def stream(u: Upstream, **kw: Any) -> list[Piece]:
    opened = await u.open_stream(u.call(request(stream=True, **kw), "m", u.provider.spec.models["m"],
                                        time.time() + 30))
    pieces = list(opened.first)
    try:
        async for p in opened.rest():
            pieces.append(p)
    finally:
        opened.close(True)
    return pieces


def text(pieces: list[Piece]) -> str:
    return "".join(p.fields.get("content", "") for p in pieces if isinstance(p, Delta))


class TestAnswers:
    async def test_whole_answer_with_usage(self, upstream: Upstream, fake: FakeProvider) -> None:
        """A non-streamed answer comes back as an OpenAI message with the provider's token counts."""
        c = await complete(upstream)
        assert c.message["content"] == "pong hello there"
        assert c.finish == "stop"
        assert c.completion_tokens == 3
        assert c.prompt_tokens == 2
        assert fake.calls[0].body["model"] == "fake-model-1"

    async def test_streamed_answer_with_usage(self, upstream: Upstream) -> None:
        """A streamed answer arrives as text pieces, a finish reason and the provider's usage."""
        pieces = await stream(upstream)
        assert text(pieces) == "pong hello there"
        assert Finish("stop") in pieces
        assert [p.completion for p in pieces if isinstance(p, Tokens) and p.completion is not None] == [3]

    async def test_connections_are_kept_alive(self, upstream: Upstream, fake: FakeProvider) -> None:
        """Whole and streamed calls reuse one pooled connection (no new TCP/TLS handshake per call), even
        when a stream's body ends a little after its last event (the connection is back once it has: a body's
        end read after the caller's stream ended is read in the background)."""
        fake.script(Fault.ok(), Fault.late_end(0.2))
        await complete(upstream)
        await stream(upstream)
        await upstream.drained()
        await stream(upstream)
        await upstream.drained()
        await complete(upstream)
        assert len({c.peer for c in fake.calls}) == 1

    async def test_stream_ends_with_its_last_event(self, upstream: Upstream, fake: FakeProvider) -> None:
        """A provider that keeps the body open after the answer's last event, sending keep-alive comments,
        does not hold the caller's stream open: it ends while the provider is still writing, and the
        connection is closed (not pooled half-read) when the body has not ended a second later."""
        fake.script(Fault.late_end(3, keepalive_s=0.05))
        pieces = await stream(upstream)
        assert text(pieces) == "pong hello there"
        for _ in range(100):  # the fake's own thread counts the body as open once it has sent the last event
            if fake.open_bodies == 1:
                break
            await asyncio.sleep(0.01)
        assert fake.open_bodies == 1  # still writing (3 s more): the caller's stream did not wait for its end
        await upstream.drained()
        await stream(upstream)
        assert len({c.peer for c in fake.calls}) == 2

    async def test_key_goes_in_the_providers_header(self, upstream: Upstream, fake: FakeProvider) -> None:
        """The key is sent the way the provider expects it (Bearer, or x-api-key for Anthropic)."""
        await complete(upstream)
        headers = fake.calls[0].headers
        if fake.kind == "anthropic":
            assert headers["x-api-key"] == KEY
            assert headers["anthropic-version"] == "2023-06-01"
        else:
            assert headers["Authorization"] == f"Bearer {KEY}"


class TestRetries:
    async def test_500_is_retried(self, upstream: Upstream, fake: FakeProvider) -> None:
        """Two 500s then an answer: the caller gets the answer, the provider saw three calls."""
        fake.script(Fault.error(500), Fault.error(500))
        assert (await complete(upstream)).message["content"] == "pong hello there"
        assert len(fake.calls) == 3

    async def test_500s_exhaust_the_attempts(self, upstream: Upstream, fake: FakeProvider) -> None:
        """Three 500s in a row: a 502 upstream_error after exactly three calls."""
        fake.script(Fault.error(500), Fault.error(500), Fault.error(500), Fault.error(500))
        with pytest.raises(UpstreamError) as exc:
            await complete(upstream)
        assert exc.value.status == 502
        assert exc.value.code == "upstream_error"
        assert len(fake.calls) == 3

    async def test_retry_after_is_honoured(self, upstream: Upstream, fake: FakeProvider) -> None:
        """A 429 with Retry-After: 1 makes the next call wait at least a second."""
        fake.script(Fault.error(429, Retry_After="1"))
        await complete(upstream)
        assert fake.calls[1].at - fake.calls[0].at >= 1.0

    async def test_ratelimit_reset_header_is_honoured(self, upstream: Upstream, fake: FakeProvider) -> None:
        """A 429 whose exhausted limit resets in 400ms (x-ratelimit-reset-requests) waits that long."""
        fake.script(Fault.error(429, x_ratelimit_remaining_requests="0", x_ratelimit_reset_requests="400ms",
                                x_ratelimit_remaining_tokens="900", x_ratelimit_reset_tokens="20s"))
        await complete(upstream)
        assert 0.4 <= fake.calls[1].at - fake.calls[0].at < 5

    async def test_long_retry_after_fails_at_once_with_the_hint(self, upstream: Upstream,
                                                                 fake: FakeProvider) -> None:
        """A provider asking to wait longer than allowed is not waited for: 429 carrying its hint."""
        fake.script(Fault.error(429, Retry_After="60"))
        with pytest.raises(UpstreamRateLimited) as exc:
            await complete(upstream)
        assert exc.value.retry_after == 60
        assert len(fake.calls) == 1

    @pytest.mark.parametrize(("status", "error"), [(400, InvalidRequest), (401, UpstreamError),
                                                   (403, UpstreamError), (404, ModelNotFound)])
    async def test_client_errors_are_not_retried(self, upstream: Upstream, fake: FakeProvider, status: int,
                                                 error: type[LeafwireError]) -> None:
        """400, 401, 403 and 404 are answered after one call, never retried."""
        fake.script(Fault.error(status))
        with pytest.raises(error):
            await complete(upstream)
        assert len(fake.calls) == 1

    async def test_insufficient_quota_is_not_retried(self, upstream: Upstream, fake: FakeProvider) -> None:
        """A 429 insufficient_quota (the account is out of credit) is not retried: 502 saying so."""
        fake.script(Fault.error(429, {"error": {"message": "You exceeded your current quota",
                                                "type": "insufficient_quota", "code": "insufficient_quota"}}))
        with pytest.raises(UpstreamError) as exc:
            await complete(upstream)
        assert exc.value.code == "upstream_insufficient_quota"
        assert len(fake.calls) == 1

    async def test_malformed_json_is_retried(self, upstream: Upstream, fake: FakeProvider) -> None:
        """An answer that is not valid JSON counts as a failed try; the next try answers."""
        fake.script(Fault.malformed())
        assert (await complete(upstream)).message["content"] == "pong hello there"
        assert len(fake.calls) == 2

    async def test_wrong_content_type_is_retried(self, upstream: Upstream, fake: FakeProvider) -> None:
        """An HTML page with status 200 (a proxy's, say) is not taken as an answer; the next try is."""
        fake.script(Fault.wrong_type(), Fault.wrong_type(), Fault.wrong_type())
        with pytest.raises(UpstreamError) as exc:
            await stream(upstream)
        assert exc.value.code == "upstream_bad_response"
        assert "content type" in exc.value.message
        assert len(fake.calls) == 3

    async def test_slow_first_byte_times_out_and_is_retried(self, upstream: Upstream, fake: FakeProvider) -> None:
        """No first byte within first_byte_s (1 s here): that try is abandoned (not waited for: the fake
        would answer after 5 s) and the next one answers."""
        fake.script(Fault.slow(5))
        started = time.monotonic()
        assert text(await stream(upstream)) == "pong hello there"
        assert 1.0 <= time.monotonic() - started < 4.5
        assert len(fake.calls) == 2

    async def test_always_slow_is_a_504(self, upstream: Upstream, fake: FakeProvider) -> None:
        """A streaming provider that never answers in time ends as 504 upstream_timeout: three 1 s tries, not
        the fake's 5 s each."""
        fake.script(*[Fault.slow(5)] * 3)
        started = time.monotonic()
        with pytest.raises(UpstreamTimeout) as exc:
            await stream(upstream)
        assert exc.value.status == 504
        assert len(fake.calls) == 3
        assert time.monotonic() - started < 10

    async def test_a_whole_answer_slower_than_first_byte_s_is_waited_for(self, fake: FakeProvider) -> None:
        """A whole answer's first byte comes once it is written: one taking longer than first_byte_s (1 s) but
        within total_s (4 s) is waited for, asked once (a retry would be billed again); past total_s it is a
        504 naming total_s, and no failure for the breaker (a long answer says nothing of the provider's
        health)."""
        long = spec(fake, timeouts={"connect_s": 2, "first_byte_s": 1.0, "total_s": 4})
        u = Upstream(Provider(spec=long, key=SecretStr(KEY)), FAST, Breaker("fake", BreakerPolicy(failures=10)))
        await u.start()
        try:
            fake.script(Fault.slow(2))
            assert (await complete(u)).message["content"] == "pong hello there"
            assert len(fake.calls) == 1
            fake.reset()
            fake.script(Fault.slow(6))
            with pytest.raises(UpstreamTimeout) as exc:
                await complete(u)
            assert len(fake.calls) == 1
            assert exc.value.message == ("fake's call ran out of time: its total_s (4 s, retries included) or "
                                         "the request's deadline came first")
            assert u.breaker.consecutive_failures == 0
        finally:
            await u.close()

    async def test_a_stream_past_total_s_says_so(self, fake: FakeProvider) -> None:
        """A stream whose pieces come in time (every 0.6 s, first_byte_s 1 s) but whose whole answer takes
        longer than total_s (2 s) ends with 504 naming total_s, not a provider "silent for 0.x s"."""
        slow = spec(fake, timeouts={"connect_s": 2, "first_byte_s": 1.0, "total_s": 2})
        u = Upstream(Provider(spec=slow, key=SecretStr(KEY)), FAST, Breaker("fake", BreakerPolicy(failures=10)))
        await u.start()
        fake.script(Fault.drip(0.6, text=" ".join(["word"] * 20)))
        try:
            with pytest.raises(UpstreamTimeout) as exc:
                await stream(u)
        finally:
            await u.close()
        assert exc.value.message == ("fake's call ran out of time: its total_s (2 s, retries included) or the "
                                     "request's deadline came first")

    async def test_connection_refused_is_retried_then_502(self, fake: FakeProvider) -> None:
        """Nothing listening at the provider's address: retried, then 502 saying it could not connect."""
        from deploy.topology import free_port
        dead = spec(fake, base_url=f"http://127.0.0.1:{free_port()}")
        u = Upstream(Provider(spec=dead, key=SecretStr(KEY)), FAST, Breaker("fake", BreakerPolicy(failures=10)))
        await u.start()
        try:
            with pytest.raises(UpstreamError) as exc:
                await complete(u)
        finally:
            await u.close()
        assert "could not connect" in exc.value.message
        assert u.breaker.consecutive_failures == 3


class TestAfterFirstByte:
    async def test_stream_cut_midway_is_an_error_not_a_retry(self, upstream: Upstream, fake: FakeProvider) -> None:
        """A stream dropped after its first events ends with an error; the provider is not called again."""
        fake.script(Fault.cut(after=3))
        opened = await upstream.open_stream(upstream.call(request(stream=True), "m",
                                                          upstream.provider.spec.models["m"], time.time() + 30))
        with pytest.raises(UpstreamError) as exc:
            async for _ in opened.rest():
                pass
        opened.close(False)
        assert exc.value.code == "upstream_bad_response"
        assert len(fake.calls) == 1

    async def test_error_event_mid_stream_ends_it(self, upstream: Upstream, fake: FakeProvider) -> None:
        """An error event after the first byte (Anthropic's overloaded_error, say) raises; no retry."""
        fake.script(Fault.stream_error(after=3))
        with pytest.raises(UpstreamError):
            await stream(upstream)
        assert len(fake.calls) == 1

    async def test_malformed_first_event_is_retried(self, upstream: Upstream, fake: FakeProvider) -> None:
        """A first stream event that is not JSON is a failed try (nothing was relayed yet)."""
        fake.script(Fault.malformed())
        assert text(await stream(upstream)) == "pong hello there"
        assert len(fake.calls) == 2


class TestBreakerAndLimits:
    async def test_breaker_opens_and_refuses_without_calling(self, upstream: Upstream, fake: FakeProvider) -> None:
        """After three failing tries the breaker is open: the next call is refused (503) untouched."""
        fake.script(*[Fault.error(503)] * 3)
        with pytest.raises(UpstreamError):
            await complete(upstream)
        assert upstream.breaker.state is BreakerState.OPEN
        with pytest.raises(ProviderUnavailable) as exc:
            await complete(upstream)
        assert exc.value.code == "provider_unavailable"
        assert exc.value.retry_after is not None
        assert len(fake.calls) == 3

    async def test_bad_requests_do_not_open_the_breaker(self, upstream: Upstream, fake: FakeProvider) -> None:
        """Requests the provider rejects as invalid say nothing about its health."""
        fake.script(*[Fault.error(400)] * 5)
        for _ in range(5):
            with pytest.raises(InvalidRequest):
                await complete(upstream)
        assert upstream.breaker.state is BreakerState.CLOSED

    async def test_concurrency_limit_refuses_at_once(self, fake: FakeProvider) -> None:
        """With max_concurrent calls in flight, one more is refused at once with 429."""
        u = Upstream(Provider(spec=spec(fake, max_concurrent=1), key=SecretStr(KEY)), FAST,
                     Breaker("fake", BreakerPolicy()))
        with u.slot(), pytest.raises(Overloaded), u.slot():
            pass
        with u.slot():
            assert u.inflight == 1


def test_choices_in_one_call_unless_the_provider_has_no_n() -> None:
    """An OpenAI-compatible provider is asked several choices in one call, unless its entry says `n: false`;
    Anthropic's Messages API has no n."""
    def native(kind: str, **over: Any) -> bool:
        provider = ProviderSpec.model_validate({"name": "p", "kind": kind, "base_url": "http://127.0.0.1:9/v1",
                                                "local": True, "models": ["m"], **over})
        return Upstream(Provider(spec=provider, key=SecretStr(KEY)), FAST, Breaker("p", BreakerPolicy())).native_n

    assert native("openai-compatible")
    assert not native("openai-compatible", n=False)
    assert not native("anthropic")
