"""The providers file: which cloud providers the adapter may call, their models, keys, limits and prices.

    providers:
      - name: openai                      # [a-z0-9_-]: clients ask for <name>/<model>
        kind: openai-compatible           # or: anthropic
        base_url: https://api.openai.com/v1
        api_key_env: OPENAI_API_KEY       # or api_key_file: /run/secrets/openai (or neither: no key)
        max_concurrent: 64                # calls in flight at once; more are refused (429) at once
        timeouts: {connect_s: 30, first_byte_s: 45, total_s: 60}
        breaker: {failures: 5, open_s: 30} # optional: this provider's own breaker settings
        models:
          gpt-4o-mini: {input_per_mtok: 0.15, output_per_mtok: 0.60}
          mini: {upstream: gpt-4o-mini}   # another name for a provider's model
          text-embedding-3-small: {kind: embeddings, input_per_mtok: 0.02}  # POST /v1/embeddings
    budgets:                              # US dollars; a period without a limit is not limited
      global: {daily_usd: 50, monthly_usd: 1000}
      tenant_default: {daily_usd: 5}
      tenants: {acme: {daily_usd: 20, monthly_usd: 300}}

Provider URLs come only from here. A destination that is private, loopback or link-local is refused
unless the provider says ``local: true``, and only ``https`` is allowed for providers that are not local.
API keys are read from the named environment variable or file once, at start (this module, like the
model registry, reads the environment variables that the file names).
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import quote

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from yarl import URL

from schemas.control import ModelKind
from shared import yaml_text
from shared.errors import LeafwireError

_PROVIDER = r"^[a-z0-9][a-z0-9_-]{0,63}$"
_MODEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:/@+-]{0,127}$")
_HEADER = r"^[A-Za-z0-9-]{1,64}$"
# OpenAI's reasoning models (o1, o3-mini-2025-01-31, o4-mini, gpt-5, gpt-5.1-mini; openai/o3 as a router names
# it; ft:o4-mini-2025-04-16:acme::AbC123, a fine-tune of one): they refuse max_tokens, take max_completion_tokens
_REASONING = re.compile(r"(?:^(?:ft:)?|/)(?:o[1-9]|gpt-5)(?:$|[-.:_])", re.IGNORECASE)
Kind = Literal["openai-compatible", "anthropic"]
PATHS: dict[str, str] = {"openai-compatible": "/chat/completions", "anthropic": "/v1/messages"}
EMBEDDINGS_PATH = "/embeddings"


class ConfigError(LeafwireError):
    """The providers file is malformed or unsafe; the adapter refuses to start with it."""


class Timeouts(BaseModel):
    """How long a provider may take (seconds)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    connect_s: Annotated[float, Field(gt=0, le=600)] = 30.0
    first_byte_s: Annotated[float, Field(gt=0, le=3600)] = 45.0
    total_s: Annotated[float, Field(gt=0, le=3600)] = 60.0

    @model_validator(mode="after")
    def _ordered(self) -> Timeouts:
        if self.total_s < self.first_byte_s:
            raise ValueError("timeouts.total_s must be at least timeouts.first_byte_s")
        return self


class BreakerOverrides(BaseModel):
    """A provider's own breaker settings, where they differ from the adapter's ``LW_CLOUD_BREAKER_*``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    failures: Annotated[int | None, Field(ge=1)] = None
    error_rate: Annotated[float | None, Field(gt=0, le=1)] = None
    min_calls: Annotated[int | None, Field(ge=1)] = None
    window_s: Annotated[int | None, Field(ge=1, le=3600)] = None
    open_s: Annotated[float | None, Field(gt=0)] = None
    probes: Annotated[int | None, Field(ge=1)] = None

    def given(self) -> dict[str, Any]:
        """The settings this provider overrides."""
        return {k: v for k, v in self.model_dump().items() if v is not None}


class ModelSpec(BaseModel):
    """A model of a provider: what it does, its name at the provider, prices per million tokens, limits."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: ModelKind = Field(default="chat", description="chat (chat and text completions) or embeddings "
                                                        "(POST /v1/embeddings; openai-compatible providers only)")
    upstream: str | None = Field(default=None, description="the provider's own name, when it differs")
    input_per_mtok: Annotated[float, Field(ge=0)] = 0.0
    output_per_mtok: Annotated[float, Field(ge=0)] = 0.0
    cached_input_per_mtok: Annotated[float | None, Field(ge=0)] = Field(
        default=None, description="price of prompt tokens the provider read from its prompt cache (OpenAI's "
                                  "cached_tokens, Anthropic's cache reads); unset: the input price")
    cache_write_input_per_mtok: Annotated[float | None, Field(ge=0)] = Field(
        default=None, description="price of prompt tokens written to the provider's prompt cache (Anthropic's "
                                  "cache_creation_input_tokens, 1.25x the input price at Anthropic for 5 minutes); "
                                  "unset: the input price")
    cache_write_1h_input_per_mtok: Annotated[float | None, Field(ge=0)] = Field(
        default=None, description="price of prompt tokens written to Anthropic's prompt cache for an hour (2x the "
                                  "input price at Anthropic); unset: cache_write_input_per_mtok")
    rpm: Annotated[int | None, Field(ge=1, le=10_000_000, description="requests a minute the site's adapters "
                                     "send this model at most (OpenAI's limits are per model), beside the "
                                     "provider's rpm")] = None
    tpm: Annotated[int | None, Field(ge=1, description="tokens a minute this model's calls use at most, beside "
                                     "the provider's tpm")] = None
    web_search_per_1k: Annotated[float, Field(ge=0)] = Field(
        default=0.0, description="US dollars per 1,000 web searches the provider runs for answers (Anthropic's web "
                                 "search, asked with web_search_options: 10)")
    context_length: Annotated[int | None, Field(ge=1)] = None
    max_tokens: Annotated[int, Field(ge=1)] = Field(
        default=4096, description="completion limit sent when a request sets none (Anthropic requires one)")
    token_limit_field: Literal["max_tokens", "max_completion_tokens"] | None = Field(
        default=None, description="OpenAI-compatible: the field a caller's completion limit is sent in, whichever "
                                  "it came in; unset: max_completion_tokens for OpenAI's reasoning models (o1, o3, "
                                  "o4-mini, gpt-5..., which refuse max_tokens), else as the caller sent it")
    reasoning: bool | None = Field(
        default=None, description="OpenAI-compatible: one of OpenAI's reasoning models (o1, o3, o4-mini, gpt-5...), "
                                  "which takes its limit as max_completion_tokens and no sampling parameters; unset: "
                                  "told by its name (an Azure deployment's name is its owner's: set it there)")
    drop_params: bool | None = Field(
        default=None, description="leave the parameters this model does not take out of its calls instead of "
                                  "refusing them (LiteLLM's drop_params); unset: the provider's")

    @model_validator(mode="after")
    def _embeddings_have_no_output(self) -> ModelSpec:
        cache_prices = (self.cached_input_per_mtok, self.cache_write_input_per_mtok, self.cache_write_1h_input_per_mtok)
        if self.kind == "embeddings" and (self.output_per_mtok or any(p is not None for p in cache_prices)):
            raise ValueError("an embeddings model reads input tokens only: give it input_per_mtok, not "
                             "output_per_mtok, cached_input_per_mtok or cache_write_input_per_mtok")
        return self

    def upstream_name(self, model: str) -> str:
        """The name the provider knows the model ``model`` of this entry by."""
        return self.upstream or model

    def is_reasoning(self, upstream: str) -> bool:
        """Whether ``upstream`` is one of OpenAI's reasoning models: ``reasoning``, else told by the name."""
        return self.reasoning if self.reasoning is not None else bool(_REASONING.search(upstream))

    def limit_field(self, upstream: str) -> str | None:
        """The field an OpenAI-compatible call of ``upstream`` carries the completion limit in (``None``: the
        caller's own): ``token_limit_field``, else ``max_completion_tokens`` for one of OpenAI's reasoning
        models."""
        if self.token_limit_field is not None:
            return self.token_limit_field
        return "max_completion_tokens" if self.is_reasoning(upstream) else None

    def drops(self, provider_drops: bool, asked: bool | None = None) -> bool:
        """Whether parameters this model does not take are left out: as the request ``asked``, else as this
        model's ``drop_params`` says, else as the provider's does."""
        if asked is not None:
            return asked
        return self.drop_params if self.drop_params is not None else provider_drops

    def cost(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0,
             written_tokens: int = 0, written_1h_tokens: int = 0, searches: int = 0) -> float:
        """US dollars for this many tokens: ``cached_tokens`` of the prompt at the cached-input price, and
        ``written_tokens`` of it (written to the provider's cache) at the cache-write price, ``written_1h_tokens``
        of those (written for an hour) at the one-hour price; each the input price when not set. And for
        ``searches`` web searches, at ``web_search_per_1k``."""
        cached = min(max(cached_tokens, 0), prompt_tokens) if self.cached_input_per_mtok is not None else 0
        written = min(max(written_tokens, 0), prompt_tokens - cached)
        hour = min(max(written_1h_tokens, 0), written)
        write = self.input_per_mtok if self.cache_write_input_per_mtok is None else self.cache_write_input_per_mtok
        write_1h = write if self.cache_write_1h_input_per_mtok is None else self.cache_write_1h_input_per_mtok
        tokens = ((prompt_tokens - cached - written) * self.input_per_mtok
                  + cached * (self.cached_input_per_mtok or 0.0) + (written - hour) * write + hour * write_1h
                  + completion_tokens * self.output_per_mtok) / 1_000_000
        return tokens + max(searches, 0) * self.web_search_per_1k / 1_000


class ProviderSpec(BaseModel):
    """One provider as configured."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: Annotated[str, Field(pattern=_PROVIDER)]
    kind: Kind
    base_url: str
    path: str | None = Field(default=None, description="appended to base_url; {model} is the upstream model "
                                                       "(Azure: /openai/deployments/{model}/chat/completions"
                                                       "?api-version=...)")
    embeddings_path: str | None = Field(default=None, description="the same for embeddings calls (default "
                                                                  "/embeddings; Azure: /openai/deployments/"
                                                                  "{model}/embeddings?api-version=...)")
    api_key_env: str | None = None
    api_key_file: Path | None = None
    api_key_header: Annotated[str | None, Field(pattern=_HEADER)] = None
    api_key_prefix: str | None = None
    headers: dict[str, str] = Field(default_factory=dict, description="extra headers sent on every call")
    anthropic_version: str = "2023-06-01"
    local: bool = Field(default=False, description="allow private, loopback and link-local destinations")
    n: bool = Field(default=True, description="OpenAI-compatible: the provider answers several choices in one "
                                              "call (false: a call a choice, for servers without n)")
    stream_usage: bool = Field(default=True, description="OpenAI-compatible: streams ask for a closing usage chunk "
                                                         "(stream_options.include_usage); false for a server that "
                                                         "refuses stream_options (usage is then estimated)")
    proxy: str | None = Field(default=None, description="an HTTP proxy every call goes through "
                                                        "(http://host:port; https targets are tunnelled with CONNECT)")
    proxy_auth_env: str | None = Field(default=None, description="environment variable holding the proxy's "
                                                                 "user:password")
    proxy_auth_file: Path | None = Field(default=None, description="file holding the proxy's user:password")
    max_concurrent: Annotated[int, Field(ge=1, le=10_000)] = 64
    drop_params: bool = Field(default=False, description="leave the parameters a model does not take out of its "
                                                         "calls instead of refusing them, as LiteLLM's drop_params "
                                                         "(each model may say otherwise)")
    rpm: Annotated[int | None, Field(ge=1, le=10_000_000, description="requests a minute the site's adapters "
                                     "send the provider at most (its account's limit); more get a 429")] = None
    tpm: Annotated[int | None, Field(ge=1, description="tokens a minute (prompt and completion) the site's adapters "
                                     "let the provider's calls use; once reached, calls are refused with a 429")] = None
    timeouts: Timeouts = Timeouts()
    breaker: BreakerOverrides = BreakerOverrides()
    models: dict[str, ModelSpec]

    @field_validator("models", mode="before")
    @classmethod
    def _models_as_mapping(cls, value: Any) -> Any:
        if isinstance(value, list):  # a plain list of names: no prices
            return {str(name): {} for name in value}
        if isinstance(value, dict):
            return {k: ({} if v is None else v) for k, v in value.items()}
        return value

    @field_validator("models")
    @classmethod
    def _model_names(cls, value: dict[str, ModelSpec]) -> dict[str, ModelSpec]:
        if not value:
            raise ValueError("a provider needs at least one model")
        for name in value:
            if not _MODEL.fullmatch(name):
                raise ValueError(f"model name {name!r} must match {_MODEL.pattern}")
        return value

    @field_validator("headers")
    @classmethod
    def _plain_headers(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if not re.fullmatch(_HEADER, name):
                raise ValueError(f"header name {name!r} is not valid")
            if name.lower() in ("authorization", "x-api-key", "api-key", "host", "content-length"):
                raise ValueError(f"header {name!r} cannot be set in headers (use api_key_env / api_key_file)")
        return value

    @model_validator(mode="after")
    def _safe_destination(self) -> ProviderSpec:
        check_base_url(self.base_url, local=self.local)
        if self.api_key_env and self.api_key_file:
            raise ValueError("give api_key_env or api_key_file, not both")
        if self.proxy is not None:
            check_proxy(self.proxy)
        if self.proxy_auth_env and self.proxy_auth_file:
            raise ValueError("give proxy_auth_env or proxy_auth_file, not both")
        if (self.proxy_auth_env or self.proxy_auth_file) and self.proxy is None:
            raise ValueError("proxy_auth_env / proxy_auth_file without a proxy")
        return self

    @model_validator(mode="after")
    def _embeddings_where_they_are_spoken(self) -> ProviderSpec:
        embedders = [name for name, spec in self.models.items() if spec.kind == "embeddings"]
        if not embedders:
            return self
        if self.kind != "openai-compatible":
            raise ValueError(f"provider {self.name!r} ({self.kind}) cannot serve embeddings model "
                             f"{embedders[0]!r}: only openai-compatible providers have an embeddings API")
        if self.path is not None and self.embeddings_path is None:
            raise ValueError(f"provider {self.name!r} sets `path` and has embeddings model {embedders[0]!r}: "
                             "give its `embeddings_path` too (/embeddings after its own path is a guess)")
        return self

    def url(self, upstream_model: str, kind: ModelKind = "chat") -> str:
        """The URL of a chat or embeddings call (the model is substituted only where the path template asks
        for it)."""
        path = (self.path or PATHS[self.kind]) if kind == "chat" else (self.embeddings_path or EMBEDDINGS_PATH)
        if "{model}" in path:
            path = path.replace("{model}", quote(upstream_model, safe=""))
        return self.base_url.rstrip("/") + path

    def key_header(self) -> tuple[str, str]:
        """The header carrying the key, and the text before the key in it."""
        default = ("x-api-key", "") if self.kind == "anthropic" else ("Authorization", "Bearer ")
        header = self.api_key_header or default[0]
        prefix = self.api_key_prefix if self.api_key_prefix is not None else (
            default[1] if header == default[0] else "")
        return header, prefix


class BudgetLimits(BaseModel):
    """Limits of one scope in US dollars; a period without a limit is not limited."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    daily_usd: Annotated[float | None, Field(ge=0)] = None
    monthly_usd: Annotated[float | None, Field(ge=0)] = None

    def limit(self, period: str) -> float | None:
        """The limit of ``period`` (daily, monthly)."""
        return self.daily_usd if period == "daily" else self.monthly_usd


class Budgets(BaseModel):
    """The global budget, the budget every tenant gets, and tenants with their own."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)
    global_: BudgetLimits = Field(default=BudgetLimits(), alias="global")
    tenant_default: BudgetLimits = BudgetLimits()
    tenants: dict[str, BudgetLimits] = Field(default_factory=dict)
    warn_ratio: Annotated[float, Field(gt=0, lt=1)] = 0.8


class ProvidersFile(BaseModel):
    """The whole file."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    providers: list[ProviderSpec] = Field(default_factory=list)
    budgets: Budgets = Budgets()

    @field_validator("providers")
    @classmethod
    def _unique(cls, value: list[ProviderSpec]) -> list[ProviderSpec]:
        names = [p.name for p in value]
        if len(set(names)) != len(names):
            raise ValueError(f"a provider name is used twice: {names}")
        return value


class Provider(BaseModel):
    """A provider ready to call: its spec and its key (or why it has none)."""

    model_config = ConfigDict(frozen=True)
    spec: ProviderSpec
    key: SecretStr | None = None
    missing_key: str | None = Field(default=None, description="why a configured key (or the proxy's credentials) "
                                                              "could not be read")
    proxy_auth: SecretStr | None = Field(default=None, description="the proxy's user:password")


def is_public(address: str) -> bool:
    """True for a globally routable IP address (IPv4-mapped IPv6 addresses are judged as IPv4)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return bool(ip.is_global) and not ip.is_multicast


def check_base_url(base_url: str, *, local: bool) -> URL:
    """Refuse URLs that are not http(s), carry credentials, or point at private places without ``local``."""
    try:
        url = URL(base_url)
    except ValueError as exc:
        raise ValueError(f"base_url {base_url!r} is not a URL") from exc
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError(f"base_url {base_url!r} must be an http(s) URL with a host")
    if url.user or url.password:
        raise ValueError("base_url must not carry credentials (use api_key_env / api_key_file)")
    if url.query_string or url.fragment:
        raise ValueError("base_url must not carry a query or fragment (put a query in `path`)")
    if local:
        return url
    if url.scheme != "https":
        raise ValueError(f"base_url {base_url!r}: only https is allowed for a provider that is not local")
    host = url.host.rstrip(".").lower()
    if host == "localhost" or host.endswith(".localhost"):
        raise ValueError(f"base_url {base_url!r} is loopback: mark the provider `local: true` to allow it")
    try:
        public = is_public(host)
    except ValueError:
        try:  # 127.1, 2130706433, 0x7f.1: IPv4 in the forms inet_aton reads (some clients connect to them)
            public = is_public(str(ipaddress.IPv4Address(socket.inet_aton(host))))
        except OSError:
            return url  # a name: its addresses are checked each time it is resolved
    if not public:
        raise ValueError(f"base_url {base_url!r} is a private, loopback or link-local address: "
                         "mark the provider `local: true` to allow it")
    return url


def check_proxy(proxy: str) -> URL:
    """An HTTP proxy's URL: http(s), a host and a port, no credentials (they go in proxy_auth_env or
    proxy_auth_file), no path, query or fragment."""
    try:
        url = URL(proxy)
    except ValueError as exc:
        raise ValueError(f"proxy {proxy!r} is not a URL") from exc
    if url.scheme not in ("http", "https") or not url.host or url.explicit_port is None:
        raise ValueError(f"proxy {proxy!r} must be an http(s) URL with a host and a port (http://proxy:3128)")
    if url.user or url.password:
        raise ValueError("proxy must not carry credentials (use proxy_auth_env / proxy_auth_file)")
    if url.path not in ("", "/") or url.query_string or url.fragment:
        raise ValueError(f"proxy {proxy!r} must not carry a path, query or fragment")
    return url


def read_secret(env: str | None, file: Path | None) -> tuple[str | None, str]:
    """A secret from the environment variable or file named (``None``: none there), and where it was looked."""
    if env:
        return os.environ.get(env, "").strip() or None, f"environment variable {env}"
    if file:
        try:
            return file.read_text().strip() or None, f"file {file}"
        except OSError:
            return None, f"file {file}"
    return None, ""


def read_key(spec: ProviderSpec) -> Provider:
    """The provider with its key (and its proxy's credentials) read from the environment variable or file the
    spec names; what is missing says why the provider cannot be called."""
    key, where = read_secret(spec.api_key_env, spec.api_key_file)
    proxy_auth, proxy_where = read_secret(spec.proxy_auth_env, spec.proxy_auth_file)
    missing = None
    if proxy_where and (proxy_auth is None or ":" not in proxy_auth):
        missing = f"no proxy credentials (user:password) in {proxy_where}"
    elif proxy_auth is not None and not (proxy_auth.isascii() and proxy_auth.isprintable()):
        missing = f"the proxy credentials in {proxy_where} are not one line of plain characters"
    if where and key is None:
        missing = f"no API key in {where}"
    elif key is not None and not (key.isascii() and key.isprintable() and not any(c.isspace() for c in key)):
        # A second line (a note under the key, two keys) cannot go in a header: said here, not a 500 per call.
        missing = f"the API key in {where} is not one word of plain characters (a second line, or a space, inside it)"
    return Provider(spec=spec, key=SecretStr(key) if key else None, missing_key=missing,
                    proxy_auth=SecretStr(proxy_auth) if proxy_auth and not missing else None)


def parse(text: str, origin: str = "providers file") -> ProvidersFile:
    """Validate the file's text (empty text is an empty file: no providers, no budgets)."""
    try:
        raw = yaml_text.load(text, origin) or {}
        return ProvidersFile.model_validate(raw)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{origin} is invalid: {exc}") from exc
    except ValidationError as exc:
        raise ConfigError(f"{origin} is invalid: {what_is_wrong(exc)}") from exc


def what_is_wrong(exc: ValidationError) -> str:
    """Each error of a validation: the field and what is wrong with it, never the value given (a key written
    into the file by mistake must not reach a log or a terminal)."""
    lines = [f"{'.'.join(str(p) for p in e['loc']) or 'the file'}: {e['msg']}"
             for e in exc.errors(include_url=False, include_input=False, include_context=False)]
    return f"{len(lines)} error(s): " + "; ".join(lines)


def load(path: Path | None, *, require_keys: bool, text: str | None = None) -> tuple[ProvidersFile, list[Provider]]:
    """Read (unless its ``text`` is given) and validate the providers file, and read each provider's key.

    An absent file means no providers (an edge site without an uplink still starts). With
    ``require_keys`` (production) a configured key that cannot be read refuses the start (or a reload);
    otherwise that provider answers 503 until the key is there and the file is read again (``app.reload_providers``).
    """
    if text is None:
        if path is None or not path.exists():
            return ProvidersFile(), []
        text = path.read_text()
    config = parse(text, f"providers file {path}")
    providers = [read_key(spec) for spec in config.providers]
    missing = [f"{p.spec.name}: {p.missing_key}" for p in providers if p.missing_key]
    if require_keys and missing:
        raise ConfigError("providers without their API key: " + "; ".join(missing))
    return config, providers
