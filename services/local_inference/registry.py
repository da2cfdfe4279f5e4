"""The model registry: which local models a worker loads, from a YAML file.

    models:
      - name: smollm2-135m-instruct
        path: ${LW_MODELS_DIR}/smollm2-135m-instruct   # environment variables are expanded
        context_length: 8192                             # optional: read from genai_config.json
        defaults: {temperature: 0.2, top_p: 0.9, max_tokens: 512}
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Annotated

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

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


class ModelSpec(BaseModel):
    """One local model."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: Annotated[str, Field(pattern=_NAME)]
    path: Path
    context_length: Annotated[int | None, Field(ge=16)] = None
    defaults: SamplingDefaults = SamplingDefaults()

    def resolved_context_length(self) -> int:
        """The context length from the registry, else from the model's genai_config.json."""
        if self.context_length is not None:
            return self.context_length
        config = json.loads((self.path / "genai_config.json").read_text())
        return int(config["model"]["context_length"])


class Registry(BaseModel):
    """The registry file."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    models: Annotated[list[ModelSpec], Field(min_length=1)]


def _expand(text: str) -> str:
    """Expand ``${VAR}`` and ``${VAR:-default}``; an unset variable without default is an error."""

    def sub(m: re.Match[str]) -> str:
        value = os.environ.get(m.group(1), m.group(2))
        if value is None:
            raise RegistryError(f"model registry uses ${{{m.group(1)}}}, which is not set")
        return value

    return _VAR.sub(sub, text)


def load(path: Path) -> Registry:
    """Read and validate the registry; every model folder must hold a genai_config.json."""
    try:
        raw = yaml.safe_load(_expand(path.read_text()))
        registry = Registry.model_validate(raw)
    except FileNotFoundError as exc:
        raise RegistryError(f"model registry {path} not found") from exc
    except (yaml.YAMLError, ValidationError) as exc:
        raise RegistryError(f"model registry {path} is invalid: {exc}") from exc
    names = [m.name for m in registry.models]
    if len(set(names)) != len(names):
        raise RegistryError(f"model registry {path} names a model twice: {names}")
    for spec in registry.models:
        if not (spec.path / "genai_config.json").exists():
            raise RegistryError(f"model {spec.name!r}: no genai_config.json in {spec.path} "
                                "(run `just models` to build the real models)")
    return registry
