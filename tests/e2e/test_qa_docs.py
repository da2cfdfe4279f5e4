"""QA of the docs (README.md, docs/): behaviours that contradict them, or that a user of OpenAI, LiteLLM or
Ollama would find wrong. Each test asserts the right behaviour and is expected to fail until it is fixed.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from services.local_inference import registry
from tests.conftest import Stack
from tests.support import ROOT

pytestmark = pytest.mark.e2e
MESSAGES = [{"role": "user", "content": "Why did line 3 stop on the 3rd?"}]


def post(stack: Stack, path: str, body: dict[str, object]) -> httpx.Response:
    return httpx.post(f"{stack.base_url}/{path}", json=body, timeout=30)


class TestWrongTypes:
    @pytest.mark.xfail(strict=True, reason="QA: numeric strings are taken for float parameters; OpenAI answers 400")
    @pytest.mark.parametrize("field", ["temperature", "top_p", "presence_penalty", "frequency_penalty"])
    def test_number_sent_as_a_string_is_refused(self, stack: Stack, field: str) -> None:
        """A float parameter sent as a string ("0.5") is a 400 naming it, as the README's error table says."""
        r = post(stack, "chat/completions", {"model": "tiny", "messages": MESSAGES, "max_tokens": 2, field: "0.5"})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == field

    @pytest.mark.xfail(strict=True, reason="QA: embeddings take dimensions as a string; OpenAI answers 400")
    def test_embeddings_dimensions_as_a_string_is_refused(self, stack: Stack) -> None:
        """`dimensions: "32"` is a wrong type: a 400 naming `dimensions`."""
        r = post(stack, "embeddings", {"model": "tiny-embed", "input": "hello", "dimensions": "32"})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == "dimensions"


class TestOpenAIShapes:
    @pytest.mark.xfail(strict=True, reason="QA: GET /v1/models says created 0 (1970) for every model")
    def test_models_have_a_creation_time(self, stack: Stack) -> None:
        """Each listed model has a real unix `created` time, as OpenAI, LiteLLM and Ollama give."""
        models = stack.client().models.list().data
        assert models
        assert all(m.created > 1_600_000_000 for m in models), [(m.id, m.created) for m in models]

    @pytest.mark.xfail(strict=True, reason="QA: with n > 1 the prompt is counted n times in usage.prompt_tokens")
    def test_n_counts_the_prompt_once(self, stack: Stack) -> None:
        """With `n`, usage counts the prompt once and the completions of every choice, as OpenAI and vLLM do."""
        client = stack.client()
        one = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=3)  # type: ignore[arg-type]
        three = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=3, n=3)  # type: ignore[arg-type]
        assert one.usage is not None
        assert three.usage is not None
        assert three.usage.completion_tokens == 9
        assert three.usage.prompt_tokens == one.usage.prompt_tokens


class TestModelsDir:
    @pytest.mark.xfail(strict=True, reason="QA: LW_MODELS_DIR has no default in the worker; README: $LW_HOME/models")
    def test_registry_defaults_to_lw_home_models(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """deploy/models.yaml loads without LW_MODELS_DIR: its models are looked for in $LW_HOME/models."""
        models = tmp_path / "models"
        (models / "smollm2-135m-instruct").mkdir(parents=True)
        (models / "smollm2-135m-instruct" / "genai_config.json").write_text("{}")
        (models / "all-minilm-l6-v2").mkdir()
        for name in ("model.onnx", "tokenizer.json"):
            (models / "all-minilm-l6-v2" / name).write_text("")
        monkeypatch.delenv("LW_MODELS_DIR", raising=False)
        monkeypatch.setenv("LW_HOME", str(tmp_path))
        loaded = registry.load(ROOT / "deploy" / "models.yaml")
        assert {m.path for m in loaded.models} == {models / "smollm2-135m-instruct", models / "all-minilm-l6-v2"}
