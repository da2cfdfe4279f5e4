"""Bad input and missing parts: each gets OpenAI's error shape with a clear status and message."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import Stack, stack_services
from tests.support import NatsServer, Service, eventually, metric, running, write_registry

pytestmark = pytest.mark.e2e
MESSAGES = [{"role": "user", "content": "hello"}]


def post(stack: Stack, body: object = None, content: bytes | None = None) -> httpx.Response:
    return httpx.post(f"{stack.base_url}/chat/completions", json=body, content=content, timeout=30,
                      headers={"content-type": "application/json"})


def error_of(resp: httpx.Response) -> dict[str, object]:
    body = resp.json()
    assert set(body) == {"error"}
    assert {"message", "type", "param", "code"} <= set(body["error"])
    return dict(body["error"])


class TestBadRequests:
    def test_no_messages(self, stack: Stack) -> None:
        """An empty message list is a 400 naming `messages`."""
        with pytest.raises(openai.BadRequestError) as exc:
            stack.client().chat.completions.create(model="tiny", messages=[])
        assert exc.value.status_code == 400
        assert exc.value.body["param"] == "messages"  # type: ignore[index]

    def test_missing_messages(self, stack: Stack) -> None:
        """A body without `messages` is a 400 naming `messages`."""
        err = error_of(r := post(stack, {"model": "tiny"}))
        assert r.status_code == 400
        assert err["param"] == "messages"
        assert err["type"] == "invalid_request_error"

    @pytest.mark.parametrize(("field", "value"), [
        ("messages", "hello"),
        ("temperature", "hot"),
        ("temperature", "0.5"),  # lax mode took numbers in strings, and true for 1; OpenAI refuses them
        ("top_p", "0.5"),
        ("presence_penalty", "0.5"),
        ("frequency_penalty", True),
        ("max_tokens", "ten"),
        ("stream", "yes please"),
        ("stream", "yes"),  # pydantic's lax mode took "yes", "true" and 1 for true; OpenAI refuses them
        ("stream", 1),
        ("max_tokens", True),  # lax mode took true for 1
        ("max_tokens", "5"),
        ("cache", "true"),
        ("stop", 7),
    ])
    def test_wrong_types(self, stack: Stack, field: str, value: object) -> None:
        """A field of the wrong type is a 400 whose `param` names the field."""
        r = post(stack, {"model": "tiny", "messages": MESSAGES, field: value})
        assert r.status_code == 400
        assert str(error_of(r)["param"]).startswith(field)

    @pytest.mark.parametrize("role", ["user", "system", "tool"])
    def test_null_content(self, stack: Stack, role: str) -> None:
        """A message other than the assistant's with ``content: null`` is a 400 pointing at it (it was sent on
        to the model as an empty message)."""
        r = post(stack, {"model": "tiny", "messages": [*MESSAGES, {"role": role, "content": None}]})
        assert r.status_code == 400
        err = error_of(r)
        assert str(err["param"]).startswith("messages.1")
        assert f"a {role} message needs content" in str(err["message"])

    def test_bad_role(self, stack: Stack) -> None:
        """An unknown role is a 400 pointing into `messages`."""
        r = post(stack, {"model": "tiny", "messages": [{"role": "robot", "content": "x"}]})
        assert r.status_code == 400
        assert str(error_of(r)["param"]).startswith("messages.0.role")

    @pytest.mark.parametrize("max_tokens", [-1, 0])
    def test_non_positive_max_tokens(self, stack: Stack, max_tokens: int) -> None:
        """max_tokens below 1 is a 400 naming `max_tokens`."""
        with pytest.raises(openai.BadRequestError) as exc:
            stack.client().chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=max_tokens)  # type: ignore[arg-type]
        assert exc.value.body["param"] == "max_tokens"  # type: ignore[index]

    def test_out_of_range_temperature(self, stack: Stack) -> None:
        """temperature above 2 is a 400 naming `temperature`."""
        with pytest.raises(openai.BadRequestError) as exc:
            stack.client().chat.completions.create(model="tiny", messages=MESSAGES, temperature=3)  # type: ignore[arg-type]
        assert exc.value.body["param"] == "temperature"  # type: ignore[index]

    def test_too_many_stop_sequences(self, stack: Stack) -> None:
        """More than four stop sequences is a 400 naming `stop`."""
        r = post(stack, {"model": "tiny", "messages": MESSAGES, "stop": list("abcde")})
        assert r.status_code == 400
        assert error_of(r)["param"] == "stop"

    def test_unknown_model(self, stack: Stack) -> None:
        """A model nobody serves is a 404 with code model_not_found."""
        with pytest.raises(openai.NotFoundError) as exc:
            stack.client().chat.completions.create(model="gpt-17", messages=MESSAGES)
        assert exc.value.code == "model_not_found"
        assert "gpt-17" in exc.value.message

    def test_oversized_body(self, stack: Stack) -> None:
        """A body over the gateway's limit (8 MiB by default) is a 413 in OpenAI's shape."""
        huge = "x" * (9 * 1024 * 1024)
        r = post(stack, {"model": "tiny", "messages": [{"role": "user", "content": huge}]})
        assert r.status_code == 413
        assert error_of(r)["code"] == "request_too_large"

    def test_invalid_json(self, stack: Stack) -> None:
        """A body that is not JSON is a 400 saying so."""
        r = post(stack, content=b"{not json")
        assert r.status_code == 400
        assert "parse the JSON body" in str(error_of(r)["message"])

    def test_json_that_is_not_an_object(self, stack: Stack) -> None:
        """A JSON array or string body is a 400."""
        assert post(stack, ["model", "tiny"]).status_code == 400

    def test_context_overflow_states_both_numbers(self, stack: Stack) -> None:
        """Asking for more tokens than the context holds is a 400 giving the context and the request."""
        with pytest.raises(openai.BadRequestError) as exc:
            stack.client().chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=100_000)
        assert exc.value.code == "context_length_exceeded"
        assert "16384" in exc.value.message
        assert "100000 in the completion" in exc.value.message

    def test_image_content_to_a_text_model(self, stack: Stack) -> None:
        """Image parts sent to a local text-only model are a 400, not silently dropped."""
        content = [{"type": "text", "text": "what is this"},
                   {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]
        r = post(stack, {"model": "tiny", "messages": [{"role": "user", "content": content}]})
        assert r.status_code == 400
        assert "text only" in str(error_of(r)["message"])

    def test_unknown_url_and_method(self, stack: Stack) -> None:
        """Unknown paths are 404 and wrong methods 405, both in OpenAI's shape."""
        assert error_of(r := httpx.get(f"{stack.base_url}/nothing-here"))["code"] == "unknown_url"
        assert r.status_code == 404
        assert httpx.get(f"{stack.base_url}/chat/completions").status_code == 405

    def test_service_survives_bad_input(self, stack: Stack) -> None:
        """After all of the above the stack still answers normally."""
        r = stack.client().chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2)
        assert r.usage is not None
        assert r.usage.completion_tokens == 2


@pytest.fixture
def lone_gateway(nats_server: NatsServer, tmp_path: Path) -> Iterator[tuple[Service, Service, Service]]:
    """A gateway whose router and worker can be stopped and paused by the test."""
    registry = write_registry(tmp_path / "models.yaml")
    worker, router, gateway = stack_services(nats_server.url, registry, site="lonely",
                                             gateway_env={"LW_GATEWAY_IDLE_TIMEOUT_S": "1.5"})
    with running(worker, router, gateway):
        yield worker, router, gateway


class TestMissingParts:
    def client(self, gateway: Service) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{gateway.base}/v1", api_key="x", max_retries=0)

    def test_no_worker_is_503(self, lone_gateway: tuple[Service, Service, Service]) -> None:
        """With the worker gone the request fails at once with 503 and a Retry-After."""
        worker, _, gateway = lone_gateway
        worker.stop()
        r = httpx.post(f"{gateway.base}/v1/chat/completions", timeout=10,
                       json={"model": "tiny", "messages": MESSAGES})
        assert r.status_code == 503
        assert "no worker" in str(error_of(r)["message"])
        assert int(r.headers["retry-after"]) >= 1

    def test_no_router_is_503(self, lone_gateway: tuple[Service, Service, Service]) -> None:
        """With no router on the site the gateway answers 503 naming the site."""
        _, router, gateway = lone_gateway
        router.stop()
        with pytest.raises(openai.APIStatusError) as exc:
            self.client(gateway).chat.completions.create(model="tiny", messages=MESSAGES)
        assert exc.value.status_code == 503
        assert "lonely" in exc.value.message

    def test_hung_router_is_504(self, lone_gateway: tuple[Service, Service, Service]) -> None:
        """A router that takes the request and never answers costs the idle timeout, then 504."""
        _, router, gateway = lone_gateway
        router.pause()
        try:
            with pytest.raises(openai.APIStatusError) as exc:
                self.client(gateway).chat.completions.create(model="tiny", messages=MESSAGES)
            assert exc.value.status_code == 504
        finally:
            router.resume()


def test_worker_at_capacity_is_429(nats_server: NatsServer, tmp_path: Path) -> None:
    """A worker already answering its limit of requests refuses the next with 429 and Retry-After."""
    registry = write_registry(tmp_path / "models.yaml")
    worker, router, gateway = stack_services(nats_server.url, registry, site="busy")
    worker.env["LW_INFERENCE_MAX_INFLIGHT"] = "1"
    url = f"{gateway.base}/v1/chat/completions"
    with running(worker, router, gateway), ThreadPoolExecutor(1) as pool:
        first = pool.submit(httpx.post, url, timeout=60,
                            json={"model": "tiny", "messages": MESSAGES, "max_tokens": 3000})
        eventually(lambda: metric(worker.metrics(), "leafwire_active_rows", model="tiny") == 1, 10,
                   "the first request to be decoding")
        second = httpx.post(url, timeout=10, json={"model": "tiny", "messages": MESSAGES})
        assert second.status_code == 429
        assert error_of(second)["code"] == "overloaded"
        assert int(second.headers["retry-after"]) >= 1
        assert first.result().status_code == 200
