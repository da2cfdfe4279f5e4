"""QA docs walk-through of docs/cloud.md (and README's cloud parts): does the page say what the software does?

Read as an operator setting up cloud providers would, each checkable statement is compared with the code:

- the YAML examples (the docs' providers file, deploy/providers.yaml with and without its commented-out local
  provider, config.py's docstring) pass ``leafwire providers validate``, and the command behaves as the page
  says (development vs ``--production``, keys never printed, a key pasted twice refused with both lines, a key
  written into the file refused naming the field only, the refusals the field table promises);
- the providers-file field table against ``services/cloud_adapter/config.py`` (every field documented, every
  documented field existing, the defaults);
- the Settings table and every ``LW_*`` name on the page against the services' settings classes (names and
  defaults);
- the Retries table against ``dialect.classify`` (status, code, retried, counts against the breaker);
- the "Errors a caller gets" table against ``shared/errors.py`` and the code raising each code, and the
  ``x-should-retry: false`` list against the gateway's;
- the Metrics table against ``shared/metrics.py`` (names, types, label names, nothing cloud-related missing);
- cheap behaviour claims: default paths and key headers, refused destinations, retry waits, thinking budgets,
  finish-reason mapping, the USAGE stream's limits, the rpm refusal;
- one small stack (test_cloud.py's ``cloud_stack``): a provider without its key answers as documented.

QA found two places where the page was wrong, fixed since: the code a provider without its key answers
(``provider_key_missing``, not ``provider_unavailable``), and the Settings table missing the near cache's two
settings.
"""

from __future__ import annotations

import importlib
import json
import os
import random
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase
from pydantic_settings import BaseSettings

from schemas.chat import ChatCompletionRequest
from services.cloud_adapter import anthropic, cache, config, dialect, providers_cli
from services.cloud_adapter.adapter import BREAKER_CODES
from services.cloud_adapter.rate import MinuteLimits
from services.cloud_adapter.retry import MAX_HINT_S, RetryPolicy, retry_hint
from services.cloud_adapter.settings import CloudSettings
from services.gateway.errors import NOT_WORTH_RETRYING
from shared import budgets_cli, errors, metrics, subjects, usage, usage_report
from shared.logging import register_secret, scrub
from shared.settings import ServiceSettings
from tests.e2e.test_cloud import CloudStack, cloud_stack
from tests.support import ROOT, NatsServer, eventually

pytestmark = pytest.mark.e2e
DOC = (ROOT / "docs" / "cloud.md").read_text()
README = (ROOT / "README.md").read_text()
MIB = 1024 * 1024


# -- reading the page


def section(title: str, text: str = DOC) -> str:
    """The text of ``## title`` (or ``### title``) up to the next heading of that level or above."""
    match = re.search(rf"^(#+) {re.escape(title)}\n(.*?)(?=^#{{1,{2}}} |\Z)", text, re.M | re.S)
    assert match, f"no section {title!r}"
    return match.group(2)


def table(text: str) -> list[list[str]]:
    """The rows (cells stripped) of the first Markdown table in ``text``, header and separator left out."""
    rows: list[list[str]] = []
    started = False
    for line in text.splitlines():
        if line.startswith("|"):
            started = True
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not all(set(c) <= set("-: ") for c in cells):
                rows.append(cells)
        elif started:
            break
    return rows[1:]


def ticks(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


def leafwire_validate(path: Path, *args: str, env: dict[str, str] | None = None
                      ) -> subprocess.CompletedProcess[str]:
    """``leafwire providers validate`` as a user runs it (a process), with ``env`` over an environment without
    the example's keys."""
    base = {k: v for k, v in os.environ.items() if k not in EXAMPLE_KEYS}
    return subprocess.run([sys.executable, "-m", "shared.cli", "providers", "validate", str(path), *args],
                          capture_output=True, text=True, timeout=60, cwd=ROOT, env={**base, **(env or {})})


EXAMPLE_KEYS = ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "AZURE_OPENAI_KEY")


@dataclass
class Done:
    returncode: int
    stdout: str
    stderr: str


Validate = Callable[..., Done]


@pytest.fixture
def validate(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Validate:
    """The same command in this process (a process each is seconds on a busy machine)."""
    for key in EXAMPLE_KEYS:
        monkeypatch.delenv(key, raising=False)

    def run(path: Path, *args: str, env: dict[str, str] | None = None) -> Done:
        for key, value in (env or {}).items():
            monkeypatch.setenv(key, value)
        capsys.readouterr()
        try:
            code = providers_cli.main(["validate", str(path), *args])
        finally:
            for key in env or {}:
                monkeypatch.delenv(key)
        out = capsys.readouterr()
        return Done(code, out.out, out.err)

    return run


def docs_example() -> str:
    blocks = re.findall(r"```yaml\n(.*?)```", section("The providers file"), re.S)
    assert len(blocks) == 1
    return str(blocks[0])


# -- the YAML examples and `leafwire providers validate`


def test_the_docs_example_validates(tmp_path: Path) -> None:
    path = tmp_path / "providers.yaml"
    path.write_text(docs_example())
    done = leafwire_validate(path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("valid: 4 provider(s), 7 model(s)")
    assert "peer (openai-compatible, http://10.0.0.20:8080/v1, local): smollm2-135m-instruct; no key" in done.stdout
    # in development a key not readable here is said, not refused; with --production it is exit 1
    assert "environment variable OPENAI_API_KEY (NOT readable here)" in done.stdout
    assert "503 provider_key_missing" in done.stdout
    production = leafwire_validate(path, "--production")
    assert production.returncode == 1
    assert "a production adapter would refuse this file here" in production.stderr


def test_with_every_key_set_production_passes_and_no_key_is_printed(validate: Validate, tmp_path: Path) -> None:
    path = tmp_path / "providers.yaml"
    path.write_text(docs_example())
    keys = {"OPENAI_API_KEY": "sk-doc-secret-1111", "ANTHROPIC_API_KEY": "sk-ant-doc-secret-2222",
            "AZURE_OPENAI_KEY": "az-doc-secret-3333"}
    done = validate(path, "--production", env=keys)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("(read)") == 3
    for value in keys.values():
        assert value not in done.stdout + done.stderr


def test_deploy_providers_file_validates(validate: Validate) -> None:
    done = validate(ROOT / "deploy" / "providers.yaml")
    assert done.returncode == 0, done.stderr
    assert "openai" in done.stdout
    assert "anthropic" in done.stdout
    assert "text-embedding-3-small [embeddings]" in done.stdout


def test_deploy_providers_commented_local_provider_validates(validate: Validate, tmp_path: Path) -> None:
    text = (ROOT / "deploy" / "providers.yaml").read_text()
    block = re.search(r"^  # - name: plant-vllm\n(?:  #   .*\n)+", text, re.M)
    assert block, "the commented-out local provider is gone from deploy/providers.yaml"
    uncommented = "\n".join(line.replace("  # ", "  ", 1) for line in block.group(0).splitlines()) + "\n"
    path = tmp_path / "providers.yaml"
    path.write_text(text.replace(block.group(0), uncommented))
    done = validate(path)
    assert done.returncode == 0, done.stderr
    assert "plant-vllm (openai-compatible, http://10.0.0.20:8000/v1, local): qwen2.5-7b-instruct" in done.stdout


def test_config_docstring_example_validates(validate: Validate, tmp_path: Path) -> None:
    doc = config.__doc__ or ""
    example = doc.split("\n\n")[1]
    path = tmp_path / "providers.yaml"
    path.write_text("\n".join(line[4:] for line in example.splitlines()) + "\n")
    done = validate(path)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("text", ["", "providers: []\n"])
def test_an_empty_file_is_valid(validate: Validate, tmp_path: Path, text: str) -> None:
    path = tmp_path / "providers.yaml"
    path.write_text(text)
    done = validate(path, "--production")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("valid: 0 provider(s), 0 model(s)")


BASE = "providers:\n  - name: p\n    kind: openai-compatible\n    base_url: https://api.example.com/v1\n"


def test_a_model_pasted_twice_is_refused_with_both_lines(validate: Validate, tmp_path: Path) -> None:
    path = tmp_path / "providers.yaml"
    path.write_text(BASE + "    models:\n      m: {input_per_mtok: 1}\n      m: {input_per_mtok: 2}\n")
    done = validate(path)
    assert done.returncode == 1
    assert "'m' is given twice" in done.stderr
    assert "line 6" in done.stderr
    assert "line 7" in done.stderr


@pytest.mark.parametrize(("extra", "names"), [
    ("    api_key: sk-pasted-secret-9999\n", "api_key"),
    ("    headers: {Authorization: Bearer sk-pasted-secret-9999}\n", "Authorization"),
])
def test_a_key_written_into_the_file_is_refused_naming_the_field_only(validate: Validate, tmp_path: Path, extra: str,
                                                                      names: str) -> None:
    path = tmp_path / "providers.yaml"
    path.write_text(BASE + extra + "    models: [m]\n")
    done = validate(path)
    assert done.returncode == 1
    assert names in done.stderr
    assert "sk-pasted-secret-9999" not in done.stdout + done.stderr


@pytest.mark.parametrize(("text", "says"), [
    (BASE.replace("openai-compatible", "anthropic") + "    models: {e: {kind: embeddings}}\n", "'e'"),
    (BASE + "    path: /x/{model}\n    models: {e: {kind: embeddings}}\n", "embeddings_path"),
    (BASE + "    models: {e: {kind: embeddings, output_per_mtok: 1}}\n", "output_per_mtok"),
    (BASE + "    models: {e: {kind: embeddings, cached_input_per_mtok: 1}}\n", "cached_input_per_mtok"),
    (BASE.replace("https://api.example.com/v1", "http://api.example.com/v1") + "    models: [m]\n", "https"),
    (BASE.replace("https://api.example.com/v1", "https://u:p@api.example.com/v1") + "    models: [m]\n",
     "credentials"),
    (BASE.replace("https://api.example.com/v1", "https://api.example.com/v1?x=1") + "    models: [m]\n", "query"),
    (BASE + "    proxy: http://u:p@proxy:3128\n    models: [m]\n", "credentials"),
    (BASE + "    api_key_env: A\n    api_key_file: /b\n    models: [m]\n", "not both"),
])
def test_what_the_field_table_says_is_refused(validate: Validate, tmp_path: Path, text: str, says: str) -> None:
    path = tmp_path / "providers.yaml"
    path.write_text(text)
    done = validate(path)
    assert done.returncode == 1, done.stdout
    assert says in done.stderr


# -- the providers-file field table


def documented_fields() -> dict[str, str]:
    """Each field the table names (``timeouts.connect_s``, ``models.<name>.kind``...) -> its default cell."""
    fields: dict[str, str] = {}
    for cells in table(section("The providers file")):
        names = ticks(cells[0])
        prefix = names[0].rsplit(".", 1)[0] + "." if "." in names[0] else ""
        defaults = [d.strip() for d in cells[1].split(" / ")]
        for i, name in enumerate(names):
            full = name if "." in name or not prefix else prefix + name
            fields[full] = defaults[i] if len(defaults) == len(names) else cells[1]
    return fields


def code_fields() -> set[str]:
    have = {n for n in config.ProviderSpec.model_fields if n not in ("timeouts", "breaker", "models")}
    have |= {f"timeouts.{n}" for n in config.Timeouts.model_fields}
    have |= {f"models.<name>.{n}" for n in config.ModelSpec.model_fields}
    return have | {"breaker.*"}


def test_every_providers_field_is_documented_and_exists() -> None:
    assert set(documented_fields()) == code_fields()


def test_breaker_overrides_are_the_breaker_settings() -> None:
    breaker = {n.upper() for n in config.BreakerOverrides.model_fields}
    assert {f"LW_CLOUD_BREAKER_{n}" for n in breaker} <= set(aliases())


def test_budgets_fields_are_in_the_docs_example() -> None:
    budgets = yaml.safe_load(docs_example())["budgets"]
    assert set(budgets) == {f.alias or n for n, f in config.Budgets.model_fields.items()}
    assert set(budgets["global"]) == set(config.BudgetLimits.model_fields)


def plain(cell: str) -> Any:
    cell = cell.strip("`")
    for kind in (int, float):
        try:
            return kind(cell)
        except ValueError:
            pass
    return {"false": False, "true": True, "—": None}.get(cell, cell)


@pytest.mark.parametrize("name", ["anthropic_version", "local", "n", "max_concurrent", "timeouts.connect_s",
                                  "timeouts.first_byte_s", "timeouts.total_s", "models.<name>.kind",
                                  "models.<name>.input_per_mtok", "models.<name>.output_per_mtok",
                                  "models.<name>.max_tokens", "models.<name>.context_length", "proxy", "headers",
                                  "rpm", "tpm", "api_key_env", "api_key_file"])
def test_documented_field_defaults(name: str) -> None:
    documented = plain(documented_fields()[name])
    if name.startswith("timeouts."):
        actual = config.Timeouts.model_fields[name.split(".")[1]].default
    elif name.startswith("models."):
        actual = config.ModelSpec.model_fields[name.rsplit(".", 1)[1]].default
    else:
        field = config.ProviderSpec.model_fields[name]
        actual = field.default_factory() if field.default_factory else field.default  # type: ignore[call-arg]
        actual = actual or None if isinstance(actual, dict) else actual
    assert documented == actual


def test_default_paths_and_key_headers() -> None:
    def spec(kind: str, **kw: Any) -> config.ProviderSpec:
        return config.ProviderSpec(name="p", kind=kind, base_url="https://api.example.com/v1", models=["m"], **kw)

    assert spec("openai-compatible").url("m") == "https://api.example.com/v1/chat/completions"
    assert spec("openai-compatible").url("m", "embeddings") == "https://api.example.com/v1/embeddings"
    assert spec("anthropic").url("m") == "https://api.example.com/v1/v1/messages"
    assert spec("openai-compatible", path="/d/{model}/c").url("a/b c") == "https://api.example.com/v1/d/a%2Fb%20c/c"
    assert spec("openai-compatible").key_header() == ("Authorization", "Bearer ")
    assert spec("anthropic").key_header() == ("x-api-key", "")
    assert spec("openai-compatible", api_key_header="api-key").key_header() == ("api-key", "")
    assert spec("anthropic").anthropic_version == "2023-06-01"


def test_a_key_of_two_lines_or_with_a_space_is_a_missing_key(tmp_path: Path) -> None:
    for text, ok in (("  sk-abc\n", True), ("sk-abc\nnote\n", False), ("sk abc", False)):
        key = tmp_path / "key"
        key.write_text(text)
        provider = config.read_key(config.ProviderSpec(name="p", kind="openai-compatible", models=["m"],
                                                       base_url="https://api.example.com", api_key_file=key))
        assert (provider.missing_key is None) is ok, text
        if ok:
            assert provider.key is not None
            assert provider.key.get_secret_value() == "sk-abc"


@pytest.mark.parametrize("host", ["2130706433", "127.1", "0x7f.1", "localhost", "10.0.0.1", "100.64.0.1",
                                  "169.254.169.254", "[::1]"])
def test_private_destinations_are_refused_unless_local(host: str) -> None:
    with pytest.raises(ValueError, match=r"loopback|private"):
        config.check_base_url(f"https://{host}/v1", local=False)
    config.check_base_url(f"http://{host}/v1", local=True)


# -- settings


def settings_classes() -> list[type[BaseSettings]]:
    found: list[type[BaseSettings]] = [ServiceSettings]
    for service in ("cloud_adapter", "gateway", "router", "batcher", "local_inference"):
        module = importlib.import_module(f"services.{service}.settings")
        found += [c for c in vars(module).values()
                  if isinstance(c, type) and issubclass(c, ServiceSettings) and c is not ServiceSettings]
    return found


def aliases() -> dict[str, Any]:
    """Every ``LW_*`` variable a service reads -> its default."""
    found: dict[str, Any] = {}
    for cls in settings_classes():
        for name, field in cls.model_fields.items():
            env = field.alias or f"LW_{name.upper()}"
            found[env] = field.default
    return found


def documented_settings() -> dict[str, str]:
    """The Settings table: each variable (``_ERROR_RATE`` shorthands expanded) -> its default cell."""
    known = aliases()
    out: dict[str, str] = {}
    for cells in table(section("Settings")):
        names = ticks(cells[0])
        defaults = [d.strip() for d in cells[1].split(" / ")]
        first = names[0]
        for i, name in enumerate(names):
            if name.startswith("_"):
                parts = first.split("_")
                full = next((p + name for p in ("_".join(parts[:k]) for k in range(len(parts), 1, -1))
                             if p + name in known), first.rsplit("_", 1)[0] + name)
            else:
                full = name
            out[full] = defaults[i] if len(defaults) == len(names) else cells[1]
    return out


def test_every_setting_the_page_names_exists() -> None:
    named = {n for n in re.findall(r"LW_[A-Z0-9_]+\*?", DOC) if not n.endswith("*")} | set(documented_settings())
    assert sorted(named - set(aliases())) == []


def test_settings_table_defaults() -> None:
    known = aliases()

    def value(cell: str) -> Any:
        cell = cell.strip("`")
        if cell.endswith(" MiB"):
            return float(cell[:-4]) * MIB
        if cell.endswith(" KiB"):
            return float(cell[:-4]) * 1024
        return plain(cell)

    wrong = {}
    for name, cell in documented_settings().items():
        default = known[name]
        if name == "LW_CLOUD_SERVE_ALL_SITES":
            ok = cell == "on for `hub`" and default is None and CloudSettings(site="hub").serves_all_sites
        elif isinstance(default, Path):
            ok = Path(value(cell)) == default
        else:
            ok = value(cell) == default
        if not ok:
            wrong[name] = (cell, default)
    assert wrong == {}


def test_inline_defaults_of_other_services() -> None:
    known = aliases()
    assert known["LW_ROUTER_CLOUD_ADMISSION_TIMEOUT_S"] == 75  # "(75 s, ...)"
    assert known["LW_NATS_DRAIN_TIMEOUT_S"] == 10  # "past its LW_NATS_DRAIN_TIMEOUT_S (10 s)"
    assert known["LW_USAGE_HUB_CHECK_S"] == 30  # "(30 s; 0 turns this off ...)"
    assert known["LW_GATEWAY_EMBEDDINGS_SPLIT"] == 256
    assert known["LW_GATEWAY_EMBEDDINGS_SPLIT_FLOAT"] == 64
    assert known["LW_CLOUD_NEAR_CACHE_BYTES"] == 32 * MIB
    assert known["LW_CLOUD_NEAR_CACHE_TTL_S"] == 30
    assert known["LW_KEEPALIVE_S"] == 5  # "a progress event every 5 s"


def test_every_cloud_adapter_setting_is_in_the_settings_table() -> None:
    documented = set(documented_settings())
    own = {f.alias for f in CloudSettings.model_fields.values() if f.alias}
    assert sorted(own - documented) == []


# -- retries


def retry_rows() -> Iterator[tuple[int, dialect.ErrorInfo, str]]:
    for cells in table(section("Retries")):
        first = cells[0]
        if first.startswith("402"):
            yield 402, dialect.ErrorInfo(message="x"), " | ".join(cells)
            yield 429, dialect.ErrorInfo(message="x", code="insufficient_quota"), " | ".join(cells)
            continue
        statuses: list[int] = []
        for part in first.split(","):
            part = part.strip()
            if part == "5xx":
                statuses += [500, 502, 503]
            elif part == "3xx":
                statuses += [301, 302, 307]
            elif part == "other 4xx":
                statuses += [405, 418, 451]
            elif part.isdigit():
                statuses.append(int(part))
        for status in statuses:
            info = dialect.ErrorInfo(message="x", code="context_length_exceeded", param="messages") \
                if status in (400, 413, 422) else dialect.ErrorInfo(message="x")
            yield status, info, " | ".join(cells)


@pytest.mark.parametrize(("status", "info", "row"), list(retry_rows()))
def test_retries_table_matches_classify(status: int, info: dialect.ErrorInfo, row: str) -> None:
    cells = row.split(" | ")
    err = dialect.classify("p", "m", status, info, None)
    gets = cells[1]
    assert err.status == int(gets.split()[0])
    if err.status == 400:  # "with the provider's message, `param` and `code`"
        assert (err.code, err.param) == (info.code, info.param)
        assert "x" in err.message
    else:
        assert err.code == ticks(gets.split("(")[0])[0]
    assert dialect.retryable(err) is (cells[2] == "yes")
    assert dialect.provider_fault(err) is (cells[3] == "yes")


def test_retry_waits() -> None:
    policy = CloudSettings().retry_policy()
    assert policy == RetryPolicy(max_attempts=3, base_s=0.5, cap_s=8.0, max_wait_s=20.0)
    rng = random.Random(1)
    for attempt in range(6):
        assert all(0 <= policy.backoff(attempt, rng) <= min(8, 0.5 * 2 ** attempt) for _ in range(200))
    assert policy.delay(0, 21.0) is None  # a wait over 20 s is not taken
    assert all(5.0 <= (policy.delay(0, 5.0, rng) or 0) <= 5.5 for _ in range(200))  # honoured, plus up to 10%
    assert policy.delay(2, None) is None  # three tries
    assert MAX_HINT_S == 86_400


def test_retry_hints() -> None:
    now = 1_800_000_000.0
    assert retry_hint({"retry-after-ms": "1500"}, now) == 1.5
    assert retry_hint({"Retry-After": "7"}, now) == 7
    assert retry_hint({"Retry-After": "Wed, 15 Jan 2027 08:00:10 GMT"}, now) is not None
    assert retry_hint({"x-ratelimit-reset-requests": "6m0s", "x-ratelimit-remaining-requests": "0"}, now) == 360
    assert retry_hint({"x-ratelimit-reset-requests": "6m0s", "x-ratelimit-remaining-requests": "3"}, now) is None
    assert retry_hint({"x-ratelimit-reset-tokens": "2s"}, now) == 2  # a reset without its remaining counts
    assert retry_hint({"anthropic-ratelimit-requests-reset": "2027-01-15T08:00:00Z",
                       "anthropic-ratelimit-requests-remaining": "0"}, now) is not None
    assert retry_hint({"Retry-After": "inf"}, now) is None
    assert retry_hint({"Retry-After": "nan"}, now) is None
    assert retry_hint({"Retry-After": "Thu, 01 Jan 2099 00:00:00 GMT"}, now) == 86_400


def test_keys_are_scrubbed_as_documented() -> None:
    register_secret("sk-qa16-long-secret-value")
    register_secret("qa16k")  # 4 to 7 characters: as a whole token only
    register_secret("q16")  # under 4: no secret
    assert scrub("echo sk-qa16-long-secret-value!") == "echo [redacted]!"
    assert scrub("key qa16k here") == "key [redacted] here"
    assert scrub("inside xqa16ky stays") == "inside xqa16ky stays"
    assert scrub("q16 stays") == "q16 stays"


# -- errors a caller gets


def errors_rows() -> list[list[str]]:
    return table(section("Errors a caller gets"))


def test_every_documented_code_is_raised_somewhere() -> None:
    sources = "".join(p.read_text() for folder in ("services", "shared") for p in (ROOT / folder).rglob("*.py"))
    codes = {c for cells in errors_rows() for c in ticks(cells[2]) if re.fullmatch(r"[a-z_]+", c)}
    codes -= {"insufficient_quota"}  # a type
    literal = {c for c in codes if f'"{c}"' in sources}
    assert sorted(codes - literal) == []


def test_documented_statuses_match_the_exceptions() -> None:
    status = {
        "model_not_found": errors.ModelNotFound("x").status,
        "answer_too_large": errors.AnswerTooLarge(1, 1, 1, False).status,
        "budget_exceeded": errors.BudgetExceeded("x").status,
        "overloaded": errors.Overloaded("x").status,
        "upstream_rate_limited": errors.UpstreamRateLimited("x").status,
        "provider_unavailable": errors.ProviderUnavailable("x", provider="p").status,
        "provider_key_missing": errors.ProviderUnavailable("x", provider="p", code="provider_key_missing").status,
        "unavailable": errors.Unavailable("x").status,
        "shutting_down": errors.Unavailable("x", code="shutting_down").status,
        "upstream_timeout": errors.UpstreamTimeout("x").status,
    }
    for cells in errors_rows():
        documented = re.match(r"(\d{3})", cells[1])
        for code in ticks(cells[2]):
            if documented and code.startswith("upstream_") and code != "upstream_timeout" and code not in status:
                assert int(documented.group(1)) == errors.UpstreamError("x", code=code).status, code
            elif documented and code in status:
                assert int(documented.group(1)) == status[code], code
    assert errors.BudgetExceeded("x").type == "insufficient_quota"


def test_the_rpm_refusal_is_a_429_with_retry_after() -> None:
    now = [0.0]
    limits = MinuteLimits("p", rpm=1, tpm=None, clock=lambda: now[0])
    limits.take()
    now[0] = 20.0
    with pytest.raises(errors.Overloaded) as caught:
        limits.take()
    assert (caught.value.status, caught.value.code) == (429, "provider_rate_limit")
    assert caught.value.retry_after == pytest.approx(40.0)


def test_should_not_retry_list_matches_the_gateway() -> None:
    text = section("Errors a caller gets")
    paragraph = text.split("also carry")[0].rsplit("\n\n", 1)[1]
    assert set(ticks(paragraph)) == set(NOT_WORTH_RETRYING)


def test_keys_paragraph_names_the_code_a_keyless_provider_answers() -> None:
    keys = DOC.split("**Keys.**", 1)[1].split("\n\n", 1)[0]
    said = re.search(r"its models answer 503 `([a-z_]+)`", keys)
    assert said
    assert said.group(1) == "provider_key_missing"


# -- metrics


def documented_metrics() -> dict[str, tuple[str, set[str]]]:
    out: dict[str, tuple[str, set[str]]] = {}
    for cells in table(section("Metrics")):
        labels = cells[2]
        while re.search(r"\([^()]*\)", labels):
            labels = re.sub(r"\([^()]*\)", "", labels)
        labels = labels.split(";")[0]
        names = {p.strip() for p in labels.split(",") if re.fullmatch(r"[a-z_]+", p.strip())}
        for name in ticks(cells[0]):
            out[name] = (cells[1], names)
    return out


def exported() -> dict[str, MetricWrapperBase]:
    return {m._name + ("_total" if m._type == "counter" else ""): m for m in vars(metrics).values()
            if isinstance(m, MetricWrapperBase)}


def test_metrics_table_matches_the_code() -> None:
    have = exported()
    wrong = {}
    for name, (kind, labels) in documented_metrics().items():
        metric = have.get(name)
        if metric is None or metric._type != kind or set(metric._labelnames) != labels:
            wrong[name] = (kind, labels, metric and (metric._type, metric._labelnames))
    assert wrong == {}


def test_every_cloud_metric_is_in_the_table() -> None:
    cloud = {n for n in exported() if n.startswith(("leafwire_cloud_", "leafwire_budget_", "leafwire_usage_"))}
    assert sorted(cloud - set(documented_metrics())) == []


def test_metrics_named_in_the_text_exist() -> None:
    have = exported()
    assert {"service", "reason"} == set(have["leafwire_rejected_requests_total"]._labelnames)
    assert "outcome" in have["leafwire_route_decisions_total"]._labelnames
    router = (ROOT / "services" / "router" / "handover.py").read_text()
    assert '"handed_off"' in router
    assert '"no_responders"' in router
    assert "no cloud adapter is running right now" in router
    assert BREAKER_CODES  # the gauge's "0 closed, 1 half open, 2 open"
    assert BREAKER_CODES == {"closed": 0, "half_open": 1, "open": 2}


# -- other cheap claims


def test_translation_claims() -> None:
    assert anthropic.EFFORT_BUDGETS == {"minimal": 1024, "low": 1024, "medium": 2048, "high": 4096}
    for reason, finish in {"model_length": "length", "max_tokens": "length", "eos": "stop", "end_turn": "stop",
                           "stop_sequence": "stop", "safety": "content_filter",
                           "recitation": "content_filter"}.items():
        assert dialect.FINISH_ALIASES[reason] == finish
    for reason, finish in {"max_tokens": "length", "model_context_window_exceeded": "length",
                           "refusal": "content_filter"}.items():
        assert anthropic.STOP_REASONS[reason] == finish
    assert dialect.CHARS_PER_TOKEN == 4


def test_usage_and_budget_claims() -> None:
    stream = usage.usage_stream("s")
    assert stream.max_bytes == 1024 ** 3
    assert 89 * 86_400 <= (stream.max_age or 0) <= 93 * 86_400
    assert stream.allow_atomic
    assert usage.BATCH_INTERVAL_S == 0.05
    assert subjects.budget_key("tenant-acme", "daily", "plant1") == "tenant-acme.daily.plant1"
    assert subjects.tenant_scope("acme") == "tenant-acme"
    assert subjects.tenant_scope("a.b c").startswith("tenant-sha-")
    assert config.Budgets().warn_ratio == 0.8


def test_cache_claims() -> None:
    def request(**kw: Any) -> ChatCompletionRequest:
        body = {"model": "p/m", "messages": [{"role": "user", "content": "hi there"}], **kw}
        return ChatCompletionRequest.model_validate(body)

    assert cache.eligible(request(temperature=0))
    assert cache.eligible(request(temperature=1, cache=True))
    assert not cache.eligible(request(temperature=0, cache=False))
    assert not cache.eligible(request(temperature=1))
    assert not cache.eligible(request(temperature=0, logprobs=True))  # "A request asking for logprobs skips"
    base = cache.key("acme", "p/m", request(temperature=0))
    same = [request(temperature=0, stream=True, stream_options={"include_usage": True}, user="u", cache=True),
            request(temperature=0, messages=[{"role": "user", "content": [{"type": "text", "text": "hi "},
                                                                         {"type": "text", "text": "there"}]}])]
    assert {cache.key("acme", "p/m", r) for r in same} == {base}
    assert cache.key("acme", "p/m", request(temperature=0, seed=1)) != base
    assert cache.key("globex", "p/m", request(temperature=0)) != base
    assert base.startswith(cache.tenant_prefix("acme"))
    assert set(cache.STORED_REASONS) == {"stop", "length", "tool_calls", "function_call"}


def test_readme_points_at_sections_that_exist() -> None:
    anchors = {re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-") for h in re.findall(r"^#+ (.+)$", DOC, re.M)}
    anchors |= set(re.findall(r'<a id="([^"]+)"', DOC))
    linked = set(re.findall(r"docs/cloud\.md#([a-z0-9-]+)", README))
    linked |= set(re.findall(r"\]\(#([a-z0-9-]+)\)", DOC))
    assert sorted(linked - anchors) == []


# -- a provider without its key, on a running stack


def keyless_providers(path: Path, openai_fake: Any, claude_fake: Any) -> Path:
    entry = {"name": "qa16nokey", "kind": "openai-compatible", "base_url": openai_fake.url, "local": True,
             "api_key_env": "LW_QA16_UNSET_KEY", "models": {"echo": {}, "embed": {"kind": "embeddings"}}}
    path.write_text(json.dumps({"providers": [entry]}))
    return path


@pytest.fixture(scope="module")
def keyless(nats_server: NatsServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CloudStack]:
    with cloud_stack(nats_server, tmp_path_factory.mktemp("qa16"), write=keyless_providers) as stack:
        yield stack


@pytest.mark.parametrize(("endpoint", "body"), [
    ("chat/completions", {"model": "qa16nokey/echo", "messages": [{"role": "user", "content": "hi"}]}),
    ("embeddings", {"model": "qa16nokey/embed", "input": ["hi"]}),
])
def test_a_provider_without_its_key_answers_as_documented(keyless: CloudStack, endpoint: str,
                                                           body: dict[str, Any]) -> None:
    answer = httpx.post(f"{keyless.gateway.base}/v1/{endpoint}", json=body, timeout=30,
                        headers={"Authorization": "Bearer key-acme"})
    assert answer.status_code == 503
    error = answer.json()["error"]
    assert error["code"] == "provider_key_missing"
    assert "LW_QA16_UNSET_KEY" in error["message"]  # saying which variable to set
    assert "retry-after" not in answer.headers  # only an operator can mend it
    assert answer.headers.get("x-should-retry") == "false"
    assert keyless.openai_fake.calls == []  # no call reached the provider


def test_a_keyless_providers_models_are_not_listed(keyless: CloudStack) -> None:
    """README: a cloud model is in ``GET /v1/models`` "once its provider has a key"."""
    listed = httpx.get(f"{keyless.gateway.base}/v1/models", headers={"Authorization": "Bearer key-acme"}, timeout=10)
    assert listed.status_code == 200
    assert not [m["id"] for m in listed.json()["data"] if m["id"].startswith("qa16nokey/")]
    one = httpx.get(f"{keyless.gateway.base}/v1/models/qa16nokey/echo", headers={"Authorization": "Bearer key-acme"},
                    timeout=10)
    assert one.status_code == 404


def test_usage_report_counts_the_refusals(keyless: CloudStack, capsys: pytest.CaptureFixture[str]) -> None:
    """``leafwire usage --json``: a refused call is a request and an error of its target, costing nothing (the
    keyless provider's calls above: every request the adapter took on, failed ones too)."""

    def groups() -> dict[str, Any] | None:
        capsys.readouterr()
        assert usage_report.main(["--nats", keyless.nats.url, "--since", "all", "--by", "target,outcome",
                                  "--json"]) == 0
        found = {g["target"]: g for g in json.loads(capsys.readouterr().out)["groups"]
                 if g["target"].startswith("qa16nokey/")}
        return found if len(found) == 2 else None

    found = eventually(groups, timeout=10, what="the keyless provider's usage events")
    for group in found.values():
        assert group["outcome"] == "error"
        assert group["errors"] == group["requests"] >= 1
        assert group["cost_usd"] == 0
    assert set(found["qa16nokey/echo"]) >= {"requests", "errors", "cached_requests", "prompt_tokens",
                                            "completion_tokens", "cost_usd", "target", "outcome"}


def test_budgets_command_answers(keyless: CloudStack, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert budgets_cli.main(["--nats", keyless.nats.url, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []  # nothing paid for on this server
    assert budgets_cli.main(["--nats", keyless.nats.url]) == 0
    assert "no cloud spending recorded" in capsys.readouterr().out  # README: "until a cloud model has been paid"


def test_operator_commands_without_a_server_exit_2_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    for command in (usage_report.main, budgets_cli.main):
        capsys.readouterr()
        assert command(["--nats", "nats://bob:qa16-hunter2@127.0.0.1:1", "--wait", "0.5"]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1
        assert "qa16-hunter2" not in err  # "hides a password in the URL when it prints it"


def test_usage_by_fields_are_the_documented_ones(capsys: pytest.CaptureFixture[str]) -> None:
    options = section("What it cost: `leafwire usage`", DOC)
    documented = ticks(options.split("`--by` any of", 1)[1].split("(default", 1)[0])
    assert documented == list(usage_report.FIELDS)
    assert usage_report.main(["--by", "foo"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
