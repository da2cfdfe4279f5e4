"""Parsing and validating routing policies."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.router import policy_cli
from services.router.policy import PolicyError, parse
from tests.support import ROOT


class TestPolicy:
    def test_shipped_policy_is_valid(self) -> None:
        """deploy/policy.yaml parses."""
        policy = parse((ROOT / "deploy" / "policy.yaml").read_text())
        assert policy.rules[-1].name == "default"

    def test_default_policy(self) -> None:
        """A policy without rules routes to the requested model (the local model follows as last resort)."""
        assert parse("local_model: m\n").rules[0].route == ["requested"]

    @pytest.mark.parametrize("text", ["aliases: {a: b, b: m}", "rules: [{name: a, when: {complexity: {gte: 1}},"
                                      " route: [x]}]", "rules: [{name: a, when: {prompt_tokens: {gte: 3, lte: 3}},"
                                      " route: [x]}]"])
    def test_edge_cases_that_can_match_are_valid(self, text: str) -> None:
        """A chain of aliases ending at a model, complexity exactly 1, a range of one value: all fine."""
        parse(text)

    @pytest.mark.parametrize(("text", "where"), [
        ("rules: [{name: a, route: []}]", "rules.0.route"),
        ("rules: [{name: a, route: [local]}]", "local_model"),
        ("rules: [{name: a, when: {uplink: sideways}, route: [x]}]", "rules.0.when.uplink"),
        ("rules: [{name: a, when: {colour: red}, route: [x]}]", "rules.0.when.colour"),
        # a mapping is an experiment (not "no string"): the error names what is wrong in it
        ("aliases: {a: {variants: [{name: v, target: x, weight: 0}]}}",
         "'aliases.a.variants.0.weight': Input should be greater than 0"),
        ("aliases: {a: {variants: [{target: x, weight: 1}]}}", "'aliases.a.variants.0.name': Field required"),
        ("aliases: {a: 3}", "'aliases.a': Input should be a valid string"),
        ("masking: {patterns: [{name: x}]}", "'masking.patterns.0.regex': Field required"),
        ("masking: {patterns: [{name: x, regex: '(('}]}", "masking.patterns"),
        ("rules: [{name: a, route: [x]}, {name: a, route: [y]}]", "unique"),
        ("version: 2", "version"),
        ("aliases: {a: b, b: c, c: a}", "aliases go round in a circle: a -> b -> c -> a"),
        ("rules: [{name: a, when: {prompt_tokens: {gt: 10, lt: 5}}, route: [x]}]", "could never match"),
        ("rules: [{name: a, when: {prompt_tokens: {gt: 3, lte: 3}}, route: [x]}]", "could never match"),
        ("rules: [{name: a, when: {complexity: {gte: 2}}, route: [x]}]", "complexity runs from 0 to 1"),
        ("rules: [{name: a, when: {complexity: {lt: 0}}, route: [x]}]", "complexity runs from 0 to 1"),
    ])
    def test_invalid_policies_say_where(self, text: str, where: str) -> None:
        """An invalid policy is refused with the place of the first problem."""
        with pytest.raises(PolicyError) as exc:
            parse(text)
        assert where in exc.value.message

    @pytest.mark.parametrize("text", ["- just\n- a list\n", "a: [unclosed\n", "42"])
    def test_not_a_mapping(self, text: str) -> None:
        """YAML that is not a mapping is refused."""
        with pytest.raises(PolicyError):
            parse(text)


@pytest.mark.parametrize("name", ["missing.yaml", "."])
def test_validate_a_file_it_cannot_read_says_so_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                            name: str) -> None:
    """`leafwire policy validate` (and push, which validates first) of a missing file or a directory: one line
    on stderr and exit 1, not a traceback."""
    assert policy_cli.main(["validate", str(tmp_path / name)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"cannot read {tmp_path / name}: ")
    assert err.count("\n") == 1
