"""YAML read from text that came from a file: errors name the file, not ``<unicode string>``."""

from __future__ import annotations

import io
from typing import Any

import yaml


def load(text: str, name: str) -> Any:
    """``yaml.safe_load`` of ``text``; a ``yaml.YAMLError`` points at ``name``, line and column."""
    stream = io.StringIO(text)
    stream.name = name  # what PyYAML's marks call the stream
    return yaml.safe_load(stream)
