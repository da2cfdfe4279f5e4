"""The real SmolLM2-135M-Instruct through the whole path (skipped where `just models` has not run)."""

from __future__ import annotations

import os

import openai
import pytest

from tests.conftest import stack_services
from tests.support import REAL_MODELS, ROOT, NatsServer, running

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.realmodel,
    pytest.mark.skipif(not (REAL_MODELS / "smollm2-135m-instruct" / ".complete").exists(),
                       reason=f"SmolLM2 is not built in {REAL_MODELS}: run `uv run just models`"),
]


def test_capital_of_france(nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Asked for the capital of France, the local model names Paris, streamed and not."""
    monkeypatch.setenv("LW_MODELS_DIR", os.fspath(REAL_MODELS))
    worker, router, gateway = stack_services(nats_server.url, ROOT / "deploy" / "models.yaml")
    with running(worker, router, gateway):
        client = openai.OpenAI(base_url=f"{gateway.base}/v1", api_key="x", max_retries=0)
        question = [{"role": "user", "content": "What is the capital of France?"}]
        answer = client.chat.completions.create(model="smollm2-135m-instruct", messages=question)
        assert "Paris" in (answer.choices[0].message.content or "")
        assert answer.choices[0].finish_reason == "stop"
        stream = client.chat.completions.create(model="smollm2-135m-instruct", messages=question, stream=True)
        assert "Paris" in "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
