"""YAML read from text that came from a file: errors name the file, not ``<unicode string>``; a key written
twice in one mapping is an error (PyYAML would keep the last one silently: a model pasted twice, the second
without its prices, would be free)."""

from __future__ import annotations

import io
from typing import Any

import yaml
from yaml.constructor import ConstructorError

_MERGE = "tag:yaml.org,2002:merge"


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (keys merged in with ``<<`` may be
    overridden, as YAML has it)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Mark] = {}
        for key_node, _ in node.value:
            if key_node.tag == _MERGE:
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node.start_mark)
            except TypeError:  # an unhashable key: the constructor itself says what is wrong
                continue
            if first is not key_node.start_mark:
                raise ConstructorError("while reading a mapping", node.start_mark,
                                       f"{key!r} is given twice (first on line {first.line + 1}); "
                                       "each key may be given once", key_node.start_mark)
        return super().construct_mapping(node, deep)


def load(text: str, name: str) -> Any:
    """``yaml.safe_load`` of ``text``, a key given twice refused; a ``yaml.YAMLError`` points at ``name``,
    line and column."""
    stream = io.StringIO(text)
    stream.name = name  # what PyYAML's marks call the stream
    return yaml.load(stream, Loader=_UniqueKeyLoader)  # a SafeLoader: no arbitrary objects
