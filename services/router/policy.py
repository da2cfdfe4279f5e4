"""The routing policy: aliases, A/B variants, residency, masking, and ordered rules, from YAML.

    version: 1
    local_model: smollm2-135m-instruct        # what the target `local` means
    aliases:
      fast: smollm2-135m-instruct
      assistant:                               # an A/B alias
        sticky: user                           # user (falls back to tenant) | tenant
        variants:
          - {name: small, target: smollm2-135m-instruct, weight: 80}
          - {name: cloud, target: openai/gpt-4o-mini, weight: 20}
    residency:
      onsite_tenants: [plant-ops]              # never leave the site, whatever a rule says
    masking:
      patterns: [email, phone, national_id]    # built-in names, or {name: ..., regex: ..., replacement: ...}
    rules:                                     # first match wins
      - name: offline
        when: {uplink: down}
        route: [local]
      - name: long-prompts-to-cloud
        when: {model: auto, prompt_tokens: {gt: 1500}}
        route: [openai/gpt-4o-mini, anthropic/claude-3-5-haiku, local]
      - name: default
        route: [requested, local]

A route lists targets tried in order until one takes the request (before the first byte reaches the
client): ``requested`` (the model asked for, after aliases), ``local`` (``local_model``), a local model
name, or ``<provider>/<model>``. ``last_resort: local`` (the default) adds the local model after every
route, so no user is stranded while the site can answer; ``last_resort: none`` turns that off.
No I/O here: parsing and validation only.
"""

from __future__ import annotations

import re
from functools import cached_property
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator, model_validator

from shared import yaml_text
from shared.errors import InvalidRequest

BudgetLevel = Literal["ok", "warning", "exhausted"]
Health = Literal["closed", "half_open", "open"]
REQUESTED = "requested"
LOCAL = "local"


class PolicyError(InvalidRequest):
    """A policy that cannot be used; the message says where and why."""

    default_code = "invalid_policy"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Range(Strict):
    """A numeric condition: every bound given must hold."""

    gt: float | None = None
    gte: float | None = None
    lt: float | None = None
    lte: float | None = None

    @model_validator(mode="after")
    def _not_empty(self) -> Range:
        if not self.meets(float("-inf"), float("inf")):
            raise ValueError("no value meets these bounds together: the rule could never match")
        return self

    def meets(self, low: float, high: float) -> bool:
        """Whether some value between ``low`` and ``high`` (inclusive) is inside every given bound."""
        low_open = high_open = False
        for bound, strict in ((self.gt, True), (self.gte, False)):
            if bound is not None and (bound > low or (bound == low and strict)):
                low, low_open = bound, strict
        for bound, strict in ((self.lt, True), (self.lte, False)):
            if bound is not None and (bound < high or (bound == high and strict)):
                high, high_open = bound, strict
        return low < high or (low == high and not (low_open or high_open))

    def holds(self, value: float) -> bool:
        """True when ``value`` is inside every given bound."""
        return ((self.gt is None or value > self.gt) and (self.gte is None or value >= self.gte)
                and (self.lt is None or value < self.lt) and (self.lte is None or value <= self.lte))


class When(Strict):
    """Conditions of a rule; all given ones must hold (an absent one matches anything)."""

    tenant: list[str] | None = None
    model: list[str] | None = None
    residency: Literal["onsite", "any"] | None = None
    prompt_tokens: Range | None = None
    complexity: Range | None = None
    budget: list[BudgetLevel] | None = None
    provider_health: dict[str, list[Health]] | None = None
    uplink: Literal["up", "down"] | None = None

    @field_validator("complexity")
    @classmethod
    def _in_unit_range(cls, value: Range | None) -> Range | None:
        if value is not None and not value.meets(0.0, 1.0):
            raise ValueError("complexity runs from 0 to 1: these bounds leave nothing to match")
        return value

    @field_validator("tenant", "model", "budget", mode="before")
    @classmethod
    def _one_or_many(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value

    @field_validator("provider_health", mode="before")
    @classmethod
    def _health_one_or_many(cls, value: object) -> object:
        if isinstance(value, dict):
            return {k: [v] if isinstance(v, str) else v for k, v in value.items()}
        return value


class Rule(Strict):
    """A named rule: when its conditions hold, try its route in order."""

    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]
    when: When = When()
    route: Annotated[list[str], Field(min_length=1)]


class Variant(Strict):
    """One arm of an A/B alias."""

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,32}$")]
    target: str
    weight: Annotated[float, Field(gt=0)]


class Experiment(Strict):
    """An alias split between variants, sticky per user or tenant."""

    variants: Annotated[list[Variant], Field(min_length=1)]
    sticky: Literal["user", "tenant"] = "user"

    @model_validator(mode="after")
    def _unique(self) -> Experiment:
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names):
            raise ValueError(f"variant names must be unique: {names}")
        return self


class Residency(Strict):
    """Who must stay on the site."""

    onsite_tenants: list[str] = Field(default_factory=list)


class Pattern(Strict):
    """A custom masking pattern."""

    name: Annotated[str, Field(pattern=r"^[a-z0-9_]{1,32}$")]
    regex: str
    replacement: str | None = None

    @field_validator("regex")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"regex does not compile: {exc}") from exc
        return value


DEFAULT_PATTERNS = ("email", "phone", "national_id")


TEXT, MAPPING = "(text)", "(mapping)"  # the branches of a name-or-mapping field; left out of error locations


def _text_or_mapping(value: object) -> str:
    return MAPPING if isinstance(value, dict | BaseModel) else TEXT


PatternEntry = Annotated[Annotated[str, Tag(TEXT)] | Annotated[Pattern, Tag(MAPPING)],
                         Discriminator(_text_or_mapping)]


class Masking(Strict):
    """What is masked in prompts that leave the site."""

    enabled: bool = True
    patterns: list[PatternEntry] = Field(default_factory=lambda: list[str | Pattern](DEFAULT_PATTERNS))


AliasTarget = Annotated[Annotated[str, Tag(TEXT)] | Annotated[Experiment, Tag(MAPPING)],
                        Discriminator(_text_or_mapping)]
"""A model name, or an A/B experiment; a mapping is checked as an experiment only, so its error says what
is wrong with it (not that it is no string)."""


class Policy(Strict):
    """A whole routing policy."""

    version: Literal[1] = 1
    local_model: str | None = None
    last_resort: Literal["local", "none"] = "local"
    aliases: dict[str, AliasTarget] = Field(default_factory=dict)
    residency: Residency = Residency()
    masking: Masking = Masking()
    rules: Annotated[list[Rule], Field(min_length=1)] = Field(
        default_factory=lambda: [Rule(name="default", route=[REQUESTED])])

    @cached_property
    def reads_prompt(self) -> bool:
        """Whether a rule looks at the prompt (its token estimate or complexity): if none does, routing
        need not measure it."""
        return any(r.when.prompt_tokens is not None or r.when.complexity is not None for r in self.rules)

    @model_validator(mode="after")
    def _consistent(self) -> Policy:
        names = [r.name for r in self.rules]
        if len(set(names)) != len(names):
            raise ValueError(f"rule names must be unique: {names}")
        for alias in self.aliases:
            if "/" in alias or alias in (REQUESTED, LOCAL, "auto"):
                raise ValueError(f"alias {alias!r} may not contain '/' or be a reserved name")
        for alias in self.aliases:  # each alias must end at a model, not come back to itself
            seen, at = [alias], self.aliases[alias]
            while isinstance(at, str) and at in self.aliases:
                if at in seen:
                    raise ValueError(f"aliases go round in a circle: {' -> '.join([*seen, at])}")
                seen.append(at)
                at = self.aliases[at]
        uses_local = any(LOCAL in r.route for r in self.rules)
        if uses_local and not self.local_model:
            raise ValueError("a rule routes to 'local' but local_model is not set")
        return self


def parse(text: str, source: str = "policy") -> Policy:
    """Parse and validate policy YAML; ``PolicyError`` says what is wrong and where."""
    try:
        raw = yaml_text.load(text, source)
    except yaml.YAMLError as exc:
        raise PolicyError(f"{source} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise PolicyError(f"{source} must be a YAML mapping")
    try:
        return Policy.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"] if p not in (TEXT, MAPPING))
        raise PolicyError(f"{source} is invalid at '{where}': {first['msg']} "
                          f"({exc.error_count()} error(s) in all)") from exc
