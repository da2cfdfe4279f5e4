"""The model registry: which local models a worker loads, from a YAML file.

    models:
      - name: smollm2-135m-instruct
        kind: chat                                       # the default
        path: ${LW_MODELS_DIR}/smollm2-135m-instruct   # environment variables are expanded
        context_length: 8192                             # optional: read from genai_config.json
        defaults: {temperature: 0.2, top_p: 0.9, max_tokens: 512}
        batching: {max_batch: 8, max_wait_ms: 50, max_queue: 64}   # optional, per kind defaults
      - name: all-minilm-l6-v2
        kind: embeddings
        path: ${LW_MODELS_DIR}/all-minilm-l6-v2
        context_length: 256                              # tokens per input; longer inputs get a 400
        embeddings: {file: model.onnx, pooling: mean, normalize: true}
        batching: {max_batch: 64, max_wait_ms: 5}        # max_batch counts inputs for embeddings

Workers load it; they announce each model's batching options in their heartbeats, so the batcher needs
no copy of the file.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from schemas.control import BatchingOptions, ModelKind
from shared import paths, yaml_text
from shared.errors import LeafwireError

_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$"
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class RegistryError(LeafwireError):
    """The registry file is missing, malformed, or names a model folder that is not there."""


class SamplingDefaults(BaseModel):
    """Generation parameters used when a request leaves them out."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    temperature: Annotated[float, Field(ge=0, le=2)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    top_k: Annotated[int, Field(ge=0)] = 50
    max_tokens: Annotated[int, Field(ge=1)] = 512
    repetition_penalty: Annotated[float, Field(gt=0)] = 1.0


# Measured defaults (docs/local-inference.md says how the window was chosen).
CHAT_BATCHING = BatchingOptions(max_batch=8, max_wait_ms=50.0, max_queue=64)
EMBEDDINGS_BATCHING = BatchingOptions(max_batch=64, max_wait_ms=5.0, max_queue=256)
EMBEDDINGS_CONTEXT = 512  # BERT's position limit, when the registry gives none


class Batching(BaseModel):
    """Per-model batching options; what is left out comes from the kind's defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    max_batch: Annotated[int | None, Field(ge=1, le=4096)] = None
    max_wait_ms: Annotated[float | None, Field(ge=0, le=10_000)] = None
    max_queue: Annotated[int | None, Field(ge=1, le=100_000)] = None


class EmbeddingOptions(BaseModel):
    """How an embeddings model turns token vectors into one vector per input."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    file: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]+\.onnx$")] = "model.onnx"
    pooling: Literal["mean"] = "mean"
    normalize: bool = True


class ModelSpec(BaseModel):
    """One local model."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: Annotated[str, Field(pattern=_NAME)]
    kind: ModelKind = "chat"
    path: Path
    context_length: Annotated[int | None, Field(ge=16)] = None
    defaults: SamplingDefaults = SamplingDefaults()
    batching: Batching = Batching()
    embeddings: EmbeddingOptions = EmbeddingOptions()

    def resolved_context_length(self) -> int:
        """The context length from the registry, else from the model's genai_config.json (chat) or
        BERT's position limit (embeddings)."""
        if self.context_length is not None:
            return self.context_length
        if self.kind == "embeddings":
            return EMBEDDINGS_CONTEXT
        config = json.loads((self.path / "genai_config.json").read_text())
        return int(config["model"]["context_length"])

    def batching_options(self, chat_max_batch: int | None = None) -> BatchingOptions:
        """The batching options of this model: the registry's, filled in with the kind's defaults."""
        base = CHAT_BATCHING if self.kind == "chat" else EMBEDDINGS_BATCHING
        if chat_max_batch is not None and self.kind == "chat":
            base = base.model_copy(update={"max_batch": chat_max_batch})
        given = {k: v for k, v in self.batching.model_dump().items() if v is not None}
        return BatchingOptions.model_validate({**base.model_dump(), **given})

    def required_files(self) -> list[Path]:
        """Files the model folder must hold."""
        if self.kind == "embeddings":
            return [self.path / self.embeddings.file, self.path / "tokenizer.json"]
        return [self.path / "genai_config.json"]


class Registry(BaseModel):
    """The registry file."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    models: Annotated[list[ModelSpec], Field(min_length=1)]


def _expand(text: str) -> str:
    """Expand ``${VAR}`` and ``${VAR:-default}``; an unset variable without default is an error."""

    def sub(m: re.Match[str]) -> str:
        value = os.environ.get(m.group(1), m.group(2))
        if value is None and m.group(1) == "LW_MODELS_DIR":  # as `just models` builds them
            value = str(paths.models_dir())
        if value is None:
            raise RegistryError(f"model registry uses ${{{m.group(1)}}}, which is not set")
        return value

    return _VAR.sub(sub, text)


def load(path: Path) -> Registry:
    """Read and validate the registry; every model folder must hold its model files."""
    try:
        raw = yaml_text.load(_expand(path.read_text()), str(path))
        registry = Registry.model_validate(raw)
    except FileNotFoundError as exc:
        raise RegistryError(f"model registry {path} not found") from exc
    except (yaml.YAMLError, ValidationError) as exc:
        raise RegistryError(f"model registry {path} is invalid: {exc}") from exc
    names = [m.name for m in registry.models]
    if len(set(names)) != len(names):
        raise RegistryError(f"model registry {path} names a model twice: {names}")
    for spec in registry.models:
        for needed in spec.required_files():
            if not needed.exists():
                raise RegistryError(f"model {spec.name!r}: no {needed.name} in {spec.path} "
                                    "(run `just models` to build the real models)")
    return registry
