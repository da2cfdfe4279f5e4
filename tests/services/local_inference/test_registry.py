"""The model registry file."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.local_inference import registry
from services.local_inference.registry import RegistryError
from tests.support import FIXTURE_EMBEDDER, FIXTURE_MODEL, ROOT


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "models.yaml"
    path.write_text(text)
    return path


class TestRegistry:
    def test_expands_environment_variables(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """`${VAR}` in a path is read from the environment."""
        monkeypatch.setenv("FIXTURES", str(FIXTURE_MODEL.parent))
        reg = registry.load(write(tmp_path, "models:\n  - name: tiny\n    path: ${FIXTURES}/tiny-llama\n"))
        assert reg.models[0].path == FIXTURE_MODEL

    def test_models_dir_defaults_to_lw_home_models(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """deploy/models.yaml loads without LW_MODELS_DIR: its models are looked for in $LW_HOME/models, where
        `just models` builds them (a worker started by hand used to stop on the unset variable)."""
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

    def test_context_length_comes_from_the_model(self, tmp_path: Path) -> None:
        """Without a context_length the model's genai_config.json decides."""
        reg = registry.load(write(tmp_path, f"models:\n  - name: tiny\n    path: {FIXTURE_MODEL}\n"))
        assert reg.models[0].resolved_context_length() == 16384

    def test_unset_variable_is_an_error(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """An unset variable without a default is refused with its name."""
        monkeypatch.delenv("NOPE_NOT_SET", raising=False)
        with pytest.raises(RegistryError, match="NOPE_NOT_SET"):
            registry.load(write(tmp_path, "models:\n  - name: a\n    path: ${NOPE_NOT_SET}/x\n"))

    def test_missing_model_folder_says_how_to_build(self, tmp_path: Path) -> None:
        """A path without a built model points at `just models`."""
        with pytest.raises(RegistryError, match="just models"):
            registry.load(write(tmp_path, f"models:\n  - name: a\n    path: {tmp_path}\n"))

    def test_duplicate_names_are_refused(self, tmp_path: Path) -> None:
        """Two models with one name are refused."""
        entry = f"  - name: a\n    path: {FIXTURE_MODEL}\n"
        with pytest.raises(RegistryError, match="twice"):
            registry.load(write(tmp_path, "models:\n" + entry + entry))

    @pytest.mark.parametrize("text", ["models: []\n", "models:\n  - name: 'bad name!'\n    path: /x\n",
                                      "models:\n  - name: a\n    path: /x\n    defaults: {temperature: 9}\n",
                                      ": not yaml : [\n"])
    def test_invalid_files_are_refused(self, tmp_path: Path, text: str) -> None:
        """Empty, malformed or out-of-range registries are refused at start."""
        with pytest.raises(RegistryError):
            registry.load(write(tmp_path, text))

    def test_missing_file(self, tmp_path: Path) -> None:
        """A registry file that does not exist is refused with its path."""
        with pytest.raises(RegistryError, match="not found"):
            registry.load(tmp_path / "absent.yaml")


class TestKindsAndBatching:
    def test_embeddings_model_needs_its_onnx_file_and_tokenizer(self, tmp_path: Path) -> None:
        """An embeddings entry is checked for its .onnx file and tokenizer.json, not genai_config.json."""
        entry = f"models:\n  - name: e\n    kind: embeddings\n    path: {FIXTURE_EMBEDDER}\n"
        ok = registry.load(write(tmp_path, entry))
        assert ok.models[0].kind == "embeddings"
        with pytest.raises(RegistryError, match=r"model\.int8\.onnx"):
            registry.load(write(tmp_path, entry + "    embeddings: {file: model.int8.onnx}\n"))

    def test_batching_options_fill_in_from_the_kind(self, tmp_path: Path) -> None:
        """Options left out come from the kind's defaults; the worker's max batch fills in for chat."""
        reg = registry.load(write(tmp_path, f"models:\n  - name: c\n    path: {FIXTURE_MODEL}\n"
                                            "    batching: {max_wait_ms: 3}\n"
                                            f"  - name: e\n    kind: embeddings\n    path: {FIXTURE_EMBEDDER}\n"))
        chat, embed = reg.models
        assert chat.batching_options(4).model_dump() == {"max_batch": 4, "max_wait_ms": 3.0,
                                                         "max_queue": registry.CHAT_BATCHING.max_queue}
        assert embed.batching_options(4) == registry.EMBEDDINGS_BATCHING
        assert embed.resolved_context_length() == registry.EMBEDDINGS_CONTEXT

    def test_unknown_kind_is_refused(self, tmp_path: Path) -> None:
        """Only chat and embeddings models exist."""
        with pytest.raises(RegistryError):
            registry.load(write(tmp_path, f"models:\n  - name: c\n    kind: vision\n    path: {FIXTURE_MODEL}\n"))
