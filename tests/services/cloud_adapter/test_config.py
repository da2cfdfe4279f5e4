"""The providers file, its safety checks, and refusing private destinations at connect time."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
from aiohttp.abc import AbstractResolver, ResolveResult

from services.cloud_adapter.config import ConfigError, ModelSpec, ProviderSpec, load, parse
from services.cloud_adapter.guard import DestinationRefused, PublicOnlyResolver

OPENAI = """
providers:
  - name: openai
    kind: openai-compatible
    base_url: https://api.openai.com/v1
    api_key_env: LW_TEST_OPENAI_KEY
    models:
      gpt-4o-mini: {input_per_mtok: 0.15, output_per_mtok: 0.6}
"""


def provider(**kw: Any) -> dict[str, Any]:
    return {"providers": [{"name": "p", "kind": "openai-compatible", "base_url": "https://api.example.com/v1",
                           "models": ["m"], **kw}]}


class TestProvidersFile:
    def test_absent_or_empty_file_means_no_providers(self, tmp_path: Path) -> None:
        """An edge site without an uplink starts with no providers file, or an empty one."""
        assert load(tmp_path / "missing.yaml", require_keys=True)[1] == []
        (tmp_path / "empty.yaml").write_text("")
        assert load(tmp_path / "empty.yaml", require_keys=True)[1] == []

    def test_key_from_environment(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """The key is read from the named environment variable and kept out of reprs."""
        monkeypatch.setenv("LW_TEST_OPENAI_KEY", "sk-live-123456789")
        (tmp_path / "p.yaml").write_text(OPENAI)
        _, providers = load(tmp_path / "p.yaml", require_keys=True)
        assert providers[0].key is not None
        assert providers[0].key.get_secret_value() == "sk-live-123456789"
        assert "sk-live" not in repr(providers[0])

    def test_key_from_file(self, tmp_path: Path) -> None:
        """A key can come from a file (a mounted secret), whitespace trimmed."""
        (tmp_path / "key").write_text("sk-from-file-0001\n")
        f = tmp_path / "p.yaml"
        f.write_text(OPENAI.replace("api_key_env: LW_TEST_OPENAI_KEY", f"api_key_file: {tmp_path / 'key'}"))
        assert load(f, require_keys=True)[1][0].key.get_secret_value() == "sk-from-file-0001"  # type: ignore[union-attr]

    def test_proxy_credentials(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """A proxy's user:password comes from its variable or file, kept out of reprs; without it, or without
        the colon, the provider is disabled saying why (and refuses the start in production)."""
        f = tmp_path / "p.yaml"
        f.write_text(OPENAI.replace("    models:", "    proxy: http://proxy.corp:3128\n    proxy_auth_env: LW_TEST_PX\n"
                                                  "    models:"))
        monkeypatch.setenv("LW_TEST_OPENAI_KEY", "sk-live-123456789")
        monkeypatch.setenv("LW_TEST_PX", "edge:s3cret-pass")
        (p,) = load(f, require_keys=True)[1]
        assert p.proxy_auth is not None
        assert p.proxy_auth.get_secret_value() == "edge:s3cret-pass"
        assert p.spec.proxy == "http://proxy.corp:3128"
        assert "s3cret" not in repr(p)
        for value in ("", "no-colon"):
            monkeypatch.setenv("LW_TEST_PX", value)
            assert load(f, require_keys=False)[1][0].missing_key == (
                "no proxy credentials (user:password) in environment variable LW_TEST_PX")
            with pytest.raises(ConfigError, match="LW_TEST_PX"):
                load(f, require_keys=True)

    def test_missing_key(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """Without its key a provider refuses the start in production, and is disabled in development."""
        monkeypatch.delenv("LW_TEST_OPENAI_KEY", raising=False)
        (tmp_path / "p.yaml").write_text(OPENAI)
        with pytest.raises(ConfigError, match="LW_TEST_OPENAI_KEY"):
            load(tmp_path / "p.yaml", require_keys=True)
        assert "LW_TEST_OPENAI_KEY" in str(load(tmp_path / "p.yaml", require_keys=False)[1][0].missing_key)

    @pytest.mark.parametrize(("kw", "says"), [
        ({"kind": "gemini"}, "kind"),
        ({"models": []}, "at least one model"),
        ({"name": "Bad Name"}, "name"),
        ({"base_url": "ftp://x.example.com"}, "http"),
        ({"base_url": "http://api.example.com/v1"}, "only https"),
        ({"base_url": "https://user:pw@api.example.com"}, "credentials"),
        ({"base_url": "https://127.0.0.1/v1"}, "private, loopback"),
        ({"base_url": "https://10.1.2.3/v1"}, "private, loopback"),
        ({"base_url": "https://169.254.169.254/latest"}, "private, loopback"),
        ({"base_url": "https://[::1]:8000"}, "private, loopback"),
        ({"base_url": "https://localhost:8000"}, "loopback"),
        ({"base_url": "https://2130706433/v1"}, "private, loopback"),  # 127.0.0.1 as one number
        ({"base_url": "https://127.1/v1"}, "private, loopback"),
        ({"base_url": "https://0xa9fea9fe/latest"}, "private, loopback"),  # 169.254.169.254 in hex
        ({"api_key_env": "A", "api_key_file": "/k"}, "not both"),
        ({"headers": {"Authorization": "Bearer x"}}, "cannot be set"),
        ({"timeouts": {"first_byte_s": 60, "total_s": 30}}, "total_s"),
        ({"surprise": 1}, "surprise"),
        ({"proxy": "http://user:pw@proxy.corp:3128"}, "proxy must not carry credentials"),
        ({"proxy": "http://proxy.corp"}, "a host and a port"),
        ({"proxy": "socks5://proxy.corp:1080"}, "a host and a port"),
        ({"proxy": "http://proxy.corp:3128/path"}, "path, query or fragment"),
        ({"proxy_auth_env": "P"}, "without a proxy"),
        ({"proxy": "http://proxy.corp:3128", "proxy_auth_env": "P", "proxy_auth_file": "/p"}, "not both"),
    ])
    def test_invalid_files_are_refused_with_the_reason(self, kw: dict[str, Any], says: str) -> None:
        """Each mistake or unsafe setting refuses the file, and the message says which."""
        import yaml
        with pytest.raises(ConfigError, match=says):
            parse(yaml.safe_dump(provider(**kw)))

    def test_a_key_written_into_the_file_is_never_in_the_reason(self) -> None:
        """LiteLLM's configs write ``api_key:`` inline: refused (keys come from env or files), and neither it nor
        a key put in ``headers`` is repeated in the reason, which goes to logs and terminals."""
        import yaml
        with pytest.raises(ConfigError) as exc:
            parse(yaml.safe_dump(provider(api_key="sk-live-0123456789abcdef",
                                          headers={"Authorization": "Bearer sk-live-fedcba9876543210"})))
        assert "providers.0.api_key" in exc.value.message
        assert "Authorization" in exc.value.message
        assert "sk-live" not in exc.value.message

    def test_two_providers_with_one_name(self) -> None:
        """Provider names must be unique."""
        import yaml
        twice = {"providers": provider()["providers"] * 2}
        with pytest.raises(ConfigError, match="used twice"):
            parse(yaml.safe_dump(twice))

    def test_local_providers_may_be_private(self) -> None:
        """`local: true` allows loopback, private addresses and plain http (a vLLM or leafwire next door)."""
        import yaml
        spec = parse(yaml.safe_dump(provider(base_url="http://127.0.0.1:8080/v1", local=True))).providers[0]
        assert spec.local

    def test_urls_come_from_the_file_only(self) -> None:
        """The model name is only ever substituted into a path template, URL-quoted."""
        spec = ProviderSpec.model_validate({
            "name": "azure", "kind": "openai-compatible", "base_url": "https://r.openai.azure.com",
            "path": "/openai/deployments/{model}/chat/completions?api-version=2024-10-21",
            "api_key_header": "api-key", "models": ["gpt-4o"]})
        assert spec.url("gpt-4o") == "https://r.openai.azure.com/openai/deployments/gpt-4o/chat/completions" \
                                     "?api-version=2024-10-21"
        assert spec.url("../../x") == "https://r.openai.azure.com/openai/deployments/..%2F..%2Fx/chat/completions" \
                                      "?api-version=2024-10-21"
        assert spec.key_header() == ("api-key", "")

    def test_prices(self) -> None:
        """Cost is input and output tokens at the per-million prices of the file."""
        file = parse(OPENAI)
        assert file.providers[0].models["gpt-4o-mini"].cost(1_000_000, 500_000) == pytest.approx(0.45)

    def test_cached_prompt_tokens_at_their_own_price(self) -> None:
        """Prompt tokens read from the provider's cache cost the cached-input price when one is set (never
        more of them than the prompt had); without one they cost the input price."""
        cheap = ModelSpec(input_per_mtok=0.15, cached_input_per_mtok=0.075, output_per_mtok=0.6)
        assert cheap.cost(1_000_000, 0, cached_tokens=400_000) == pytest.approx(0.6 * 0.15 + 0.4 * 0.075)
        assert cheap.cost(1_000_000, 0, cached_tokens=5_000_000) == pytest.approx(0.075)
        assert cheap.cost(1_000_000, 0, cached_tokens=-3) == pytest.approx(0.15)
        assert ModelSpec(input_per_mtok=0.15).cost(1_000_000, 0, cached_tokens=400_000) == pytest.approx(0.15)
        assert ModelSpec(input_per_mtok=1, cached_input_per_mtok=0).cost(10, 0, cached_tokens=10) == 0

    def test_the_shipped_file_is_valid(self) -> None:
        """deploy/providers.yaml parses (keys may be absent in development)."""
        root = Path(__file__).resolve().parents[3]
        file, providers = load(root / "deploy" / "providers.yaml", require_keys=False)
        assert {p.spec.name for p in providers} >= {"openai", "anthropic"}
        assert file.budgets.warn_ratio == 0.8


EMBEDDER = {"e": {"kind": "embeddings", "input_per_mtok": 0.02}}


class TestEmbeddingsModels:
    def test_a_model_is_chat_unless_it_says_embeddings(self) -> None:
        """`kind: embeddings` declares an embeddings model; a model without a kind is a chat model."""
        import yaml
        spec = parse(yaml.safe_dump(provider(models={"m": {}, **EMBEDDER}))).providers[0]
        assert (spec.models["m"].kind, spec.models["e"].kind) == ("chat", "embeddings")

    def test_embeddings_cost_their_input_tokens(self) -> None:
        """An embeddings call costs its input tokens at the input price; it has no output."""
        assert ModelSpec(kind="embeddings", input_per_mtok=0.02).cost(1_000_000, 0) == pytest.approx(0.02)

    def test_embeddings_calls_go_to_the_embeddings_path(self) -> None:
        """An embeddings call goes to <base_url>/embeddings, or to the provider's embeddings_path (Azure: the
        deployment in the path, URL-quoted as chat's)."""
        plain = ProviderSpec.model_validate(provider(models=EMBEDDER)["providers"][0])
        assert plain.url("e", "embeddings") == "https://api.example.com/v1/embeddings"
        assert plain.url("e") == "https://api.example.com/v1/chat/completions"
        azure = ProviderSpec.model_validate(provider(
            base_url="https://r.openai.azure.com", path="/openai/deployments/{model}/chat/completions?api-version=1",
            embeddings_path="/openai/deployments/{model}/embeddings?api-version=1", models=EMBEDDER)["providers"][0])
        assert azure.url("a/b", "embeddings") == "https://r.openai.azure.com/openai/deployments/a%2Fb/embeddings" \
                                                 "?api-version=1"

    @pytest.mark.parametrize(("kw", "says"), [
        # Anthropic has no embeddings API: the file names the provider and the model
        ({"kind": "anthropic", "models": EMBEDDER}, "provider 'p' .anthropic. cannot serve embeddings model 'e'"),
        # embeddings have no output tokens to price
        ({"models": {"e": {"kind": "embeddings", "output_per_mtok": 1}}}, "input tokens only"),
        ({"models": {"e": {"kind": "embeddings", "cached_input_per_mtok": 0.01}}}, "input tokens only"),
        # a provider with its own chat path gives its embeddings path too: /embeddings would be a guess
        ({"path": "/deployments/{model}/chat", "models": EMBEDDER}, "give its `embeddings_path`"),
        ({"models": {"e": {"kind": "images"}}}, "kind"),
    ])
    def test_what_an_embeddings_model_cannot_be(self, kw: dict[str, Any], says: str) -> None:
        """Each mistake about an embeddings model refuses the file, saying which provider and model."""
        import yaml
        with pytest.raises(ConfigError, match=says):
            parse(yaml.safe_dump(provider(**kw)))


class StubResolver(AbstractResolver):
    def __init__(self, *addresses: str) -> None:
        self.addresses = addresses

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        return [ResolveResult(hostname=host, host=a, port=port, family=family, proto=0, flags=0)
                for a in self.addresses]

    async def close(self) -> None:
        pass


class TestConnectTimeGuard:
    async def test_name_resolving_to_private_addresses_is_refused(self) -> None:
        """A provider name that resolves to loopback, private or link-local addresses is refused."""
        for address in ("127.0.0.1", "10.0.0.8", "169.254.169.254", "::1", "::ffff:192.168.1.1", "100.64.0.1"):
            with pytest.raises(DestinationRefused):
                await PublicOnlyResolver(StubResolver(address)).resolve("api.example.com", 443)

    async def test_only_public_addresses_are_kept(self) -> None:
        """Mixed answers (a rebinding attempt) keep only the public addresses."""
        found = await PublicOnlyResolver(StubResolver("10.0.0.1", "93.184.216.34")).resolve("api.example.com", 443)
        assert [r["host"] for r in found] == ["93.184.216.34"]
