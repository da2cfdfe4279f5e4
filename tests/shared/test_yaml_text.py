"""YAML of configuration files: errors name the file and line; a key given twice is refused."""

from __future__ import annotations

import pytest
import yaml

from shared import yaml_text


def test_a_key_given_twice_is_refused_naming_both_lines() -> None:
    """A model pasted twice (the second without its prices) would silently be the one kept: refused, saying
    which key, where it was first and where again."""
    text = "models:\n  gpt-4o-mini: {input_per_mtok: 0.15}\n  other: {}\n  gpt-4o-mini: {}\n"
    with pytest.raises(yaml.YAMLError) as caught:
        yaml_text.load(text, "providers.yaml")
    message = str(caught.value)
    assert "'gpt-4o-mini' is given twice (first on line 2)" in message
    assert 'in "providers.yaml", line 4, column 3' in message


def test_the_same_key_in_different_mappings_and_merges_are_fine() -> None:
    """One key per mapping: the same name in two mappings is no repeat, and a key merged in with ``<<`` may be
    overridden, as YAML has it."""
    text = "a: {x: 1}\nb: {x: 2}\nbase: &b {x: 1, y: 2}\nc:\n  <<: *b\n  x: 3\n"
    assert yaml_text.load(text, "f.yaml") == {"a": {"x": 1}, "b": {"x": 2}, "base": {"x": 1, "y": 2},
                                              "c": {"x": 3, "y": 2}}


def test_a_syntax_error_names_the_file() -> None:
    with pytest.raises(yaml.YAMLError, match=r'in "policy\.yaml", line 2'):
        yaml_text.load("a: 1\n b: [\n", "policy.yaml")
