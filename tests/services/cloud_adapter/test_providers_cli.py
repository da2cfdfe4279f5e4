"""``leafwire providers validate``: what an operator reads before an adapter takes a providers file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from shared import cli

LAN = {"name": "lan", "kind": "openai-compatible", "base_url": "http://10.0.0.20:8080/v1", "local": True,
       "models": ["small"]}
FILE: dict[str, Any] = {"providers": [
    {"name": "openai", "kind": "openai-compatible", "base_url": "https://api.openai.com/v1",
     "api_key_env": "LW_TEST_CLI_KEY", "proxy": "http://proxy.corp:3128", "proxy_auth_env": "LW_TEST_CLI_PROXY",
     "rpm": 500, "tpm": 200000,
     "models": {"gpt-4o-mini": {"rpm": 30}, "text-embedding-3-small": {"kind": "embeddings"}}},
    LAN,
], "budgets": {"global": {"daily_usd": 50}, "tenants": {"acme": {"monthly_usd": 300}}}}


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = cli.main(["providers", "validate", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_a_valid_file_lists_providers_models_and_where_secrets_are(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Each provider with its models, its minute limits, where its key and proxy credentials come from and
    whether they are readable here, never their values; the budgets in words."""
    monkeypatch.setenv("LW_TEST_CLI_KEY", "sk-cli-0123456789")
    monkeypatch.setenv("LW_TEST_CLI_PROXY", "edge:cli-proxy-pass")
    (tmp_path / "p.yaml").write_text(json.dumps(FILE))
    code, out, err = run(capsys, str(tmp_path / "p.yaml"), "--production")
    assert (code, err) == (0, "")
    assert out.splitlines()[0] == ("valid: 2 provider(s), 3 model(s); budgets: global $50 a day, each tenant "
                                   "unlimited, 1 tenant(s) of their own")
    assert ("openai (openai-compatible, https://api.openai.com/v1, rpm 500, tpm 200000): gpt-4o-mini [rpm 30], "
            "text-embedding-3-small [embeddings]; key: environment variable LW_TEST_CLI_KEY (read); proxy: "
            "http://proxy.corp:3128, credentials: environment variable LW_TEST_CLI_PROXY (read)") in out
    assert "lan (openai-compatible, http://10.0.0.20:8080/v1, local): small; no key" in out
    assert "sk-cli" not in out
    assert "cli-proxy-pass" not in out


def test_a_missing_key_is_said_and_fails_only_for_production(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """A key not readable here: development answers 503 for that provider (exit 0, said); a production
    adapter would refuse the file (exit 1, said)."""
    monkeypatch.delenv("LW_TEST_CLI_KEY", raising=False)
    monkeypatch.setenv("LW_TEST_CLI_PROXY", "edge:cli-proxy-pass")
    (tmp_path / "p.yaml").write_text(json.dumps(FILE))
    code, out, _ = run(capsys, str(tmp_path / "p.yaml"))
    assert code == 0
    assert "LW_TEST_CLI_KEY (NOT readable here)" in out
    assert "503 provider_key_missing" in out
    code, _, err = run(capsys, str(tmp_path / "p.yaml"), "--production")
    assert code == 1
    assert "a production adapter would refuse this file here: openai: no API key in environment variable " \
           "LW_TEST_CLI_KEY" in err


@pytest.mark.parametrize(("text", "says"), [
    ("providers: [{name: x, kind: nope}]", "invalid: providers file"),
    (json.dumps({"providers": [{**LAN, "local": False}]}), "only https"),
    ("providers: [", "invalid: providers file"),
])
def test_an_invalid_file_says_why_and_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str,
                                            says: str) -> None:
    """A file the adapter would refuse: exit 1 with its reason, nothing listed."""
    (tmp_path / "p.yaml").write_text(text)
    code, out, err = run(capsys, str(tmp_path / "p.yaml"))
    assert (code, out) == (1, "")
    assert says in err


def test_a_file_that_is_not_there(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A path with no file: exit 1 saying it cannot be read."""
    code, _, err = run(capsys, str(tmp_path / "nope.yaml"))
    assert code == 1
    assert err.startswith(f"cannot read {tmp_path / 'nope.yaml'}")
