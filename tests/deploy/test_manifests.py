"""The deployment files under deploy/ held to the code they deploy: the image, the compose files, the Kubernetes
manifests and the systemd units name real service packages and real settings (with values the settings
accept), probe the endpoints the services serve, give a stop the time it takes, and keep the NATS topology of
DESIGN.md; the Prometheus rules and the Grafana dashboard name only metrics and labels that shared/metrics.py
exports. Offline and quick: files are read, nothing is started.
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from services.batcher.settings import BatcherSettings
from services.cloud_adapter import config as providers_config
from services.cloud_adapter.settings import CloudSettings
from services.gateway.settings import GatewaySettings
from services.local_inference.settings import InferenceSettings
from services.router.settings import RouterSettings
from shared import metrics
from shared.settings import ServiceSettings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose"
K8S = DEPLOY / "k8s"
SYSTEMD = DEPLOY / "systemd"
RULES = DEPLOY / "prometheus" / "rules.yaml"
DASHBOARD = DEPLOY / "grafana" / "leafwire.json"

# The settings class each service runs with (its __main__.py hands it to shared.service.run).
SETTINGS: dict[str, type[ServiceSettings]] = {
    "gateway": GatewaySettings, "router": RouterSettings, "batcher": BatcherSettings,
    "local_inference": InferenceSettings, "cloud_adapter": CloudSettings, "retrieval": ServiceSettings,
}
# Services that serve /healthz /readyz /metrics on their API port instead of LW_OPS_PORT.
API_PORT = {"gateway": "LW_GATEWAY_PORT"}
API_HOST = {"gateway": "LW_GATEWAY_HOST"}


# -- the code's side: service packages, settings, metrics ---------------------------------------------------

def service_packages() -> set[str]:
    """Packages under services/ that run as ``python -m services.<name>``."""
    return {p.parent.name for p in (ROOT / "services").glob("*/__main__.py")}


def env_names(cls: type[ServiceSettings]) -> dict[str, str]:
    """Environment variable -> field name, as pydantic-settings reads them: a field's alias when it has one,
    else the prefix and the field's name (upper case: the names are case-insensitive)."""
    prefix = str(cls.model_config.get("env_prefix", ""))
    names = {}
    for name, info in cls.model_fields.items():
        alias = info.validation_alias or info.alias
        names[(alias if isinstance(alias, str) else prefix + name).upper()] = name
    return names


def registry_variables() -> set[str]:
    """``${VAR}`` names in the model registry, which local-inference expands from its environment."""
    return set(re.findall(r"\$\{([A-Za-z_]\w*)", (DEPLOY / "models.yaml").read_text()))


def known_variables(service: str) -> set[str]:
    """Every LW_* variable ``service`` reads."""
    extra = {v for v in registry_variables() if v.startswith("LW_")} if service == "local_inference" else set()
    return set(env_names(SETTINGS[service])) | extra


def stop_budget_s(service: str) -> float:
    """How long a service may take to stop: what it admitted and the NATS drain within LW_NATS_DRAIN_TIMEOUT_S
    + 5 s (shared/service.py), and for the gateway also its shutdown grace for the answers in flight."""
    budget = float(ServiceSettings.model_fields["nats_drain_timeout_s"].default) + 5
    if service == "gateway":
        budget += float(GatewaySettings.model_fields["shutdown_grace_s"].default)
    return budget


def validate_settings(service: str, env: Mapping[str, str]) -> ServiceSettings:
    """The service's settings built from ``env`` as it would start with it (raises when refused)."""
    names = env_names(SETTINGS[service])
    values: dict[str, Any] = {names[k.upper()]: v for k, v in env.items() if k.upper() in names}
    return SETTINGS[service](**values)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No LW_* variable of the test run leaks into settings built from a deploy file."""
    import os

    for name in [n for n in os.environ if n.upper().startswith("LW_")]:
        monkeypatch.delenv(name)


@dataclass(frozen=True)
class Series:
    """What a name in a query may be: its labels (Prometheus adds job and instance to every series)."""

    labels: frozenset[str]


TARGET_LABELS = frozenset({"job", "instance"})


def exported_series() -> dict[str, Series]:
    """Every series name shared/metrics.py's collectors expose, with its labels (counters get ``_total``,
    histograms ``_bucket`` (with ``le``), ``_sum`` and ``_count``), plus Prometheus's own ``up``."""
    series = {"up": Series(TARGET_LABELS)}
    for metric in vars(metrics).values():
        if not isinstance(metric, MetricWrapperBase):
            continue
        # _name (without a counter's _total), _type and _labelnames are how prometheus_client keeps them.
        name, kind, labels = metric._name, str(metric._type), frozenset(metric._labelnames) | TARGET_LABELS
        suffixes = {"counter": ["_total", "_created"], "gauge": [""],
                    "histogram": ["_sum", "_count", "_created"], "summary": ["_sum", "_count", "_created"]}
        for suffix in suffixes[kind]:
            series[name + suffix] = Series(labels)
        if kind == "histogram":
            series[name + "_bucket"] = Series(labels | {"le"})
    return series


SERIES = exported_series()


# -- reading PromQL ------------------------------------------------------------------------------------------

_PROMQL = re.compile(r"""
    (?P<str>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
  | (?P<range>\[[^\]]*\])
  | (?P<matchers>\{[^}]*\})
  | (?P<num>\d[\w.]*)
  | (?P<ident>\$?[A-Za-z_:][\w:]*)
  | (?P<open>\()
  | (?P<close>\))
  | (?P<other>\S)""", re.X)
GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}
AGGREGATIONS = {"sum", "min", "max", "avg", "count", "stddev", "stdvar", "topk", "bottomk", "quantile",
                "count_values", "group", "limitk", "limit_ratio"}
KEYWORDS = {"and", "or", "unless", "bool", "offset", "atan2", "inf", "nan"}


@dataclass
class Query:
    """The series selectors of a PromQL expression (name, labels matched) and its grouping labels."""

    selectors: list[tuple[str, set[str]]] = field(default_factory=list)
    grouping: list[set[str]] = field(default_factory=list)

    @property
    def names(self) -> set[str]:
        return {name for name, _ in self.selectors}


def parse_promql(expr: str) -> Query:
    """Selectors and grouping clauses of ``expr``; strings, ranges and Grafana's ``$variables`` are skipped."""
    tokens = [(m.lastgroup, m.group()) for m in _PROMQL.finditer(expr)]
    query, i = Query(), 0
    while i < len(tokens):
        kind, text = tokens[i]
        after = tokens[i + 1] if i + 1 < len(tokens) else ("", "")
        if kind == "ident" and text in GROUPING:
            if after[0] == "open":
                end = next(j for j in range(i + 2, len(tokens)) if tokens[j][0] == "close")
                query.grouping.append({t for k, t in tokens[i + 2:end] if k == "ident"})
                i = end
        elif kind == "ident" and not text.startswith("$") and after[0] != "open" \
                and text.lower() not in KEYWORDS | AGGREGATIONS:
            matched = matcher_labels(after[1]) if after[0] == "matchers" else set()
            query.selectors.append((text, matched))
        elif kind == "matchers" and (i == 0 or tokens[i - 1][0] != "ident"):
            query.selectors.append(("", matcher_labels(text)))  # a selector without a metric name
        i += 1
    return query


def matcher_labels(block: str) -> set[str]:
    """Label names of a ``{label="value", ...}`` block."""
    return set(re.findall(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)", block))


def check_query(expr: str, recorded: Mapping[str, Series]) -> list[str]:
    """What is wrong in ``expr``: names no collector exports, labels their series do not have."""
    query, known, problems = parse_promql(expr), {**SERIES, **recorded}, []
    if not query.selectors:
        problems.append(f"no series in {expr!r}")
    for name, matched in query.selectors:
        if name not in known:
            problems.append(f"{name or '{...}'!r} is not a metric of shared/metrics.py nor a recorded series")
        elif not matched <= known[name].labels:
            problems.append(f"{name} has no label {sorted(matched - known[name].labels)}")
    usable = set().union(*(known[n].labels for n in query.names if n in known)) | TARGET_LABELS | {"le"}
    for labels in query.grouping:
        if not labels <= usable:
            problems.append(f"grouping by {sorted(labels - usable)}, a label of none of {sorted(query.names)}")
    return problems


# -- reading NATS configuration -------------------------------------------------------------------------------

_NATS_TOKEN = re.compile(r'\s+|#[^\n]*|//[^\n]*|"(?:[^"\\]|\\.)*"|[{}\[\],]|[^\s{}\[\],#"]+')


def parse_nats(text: str) -> dict[str, Any]:
    """nats-server's configuration format, as far as leafwire's files use it: ``key: value``, blocks
    ``{...}``, arrays ``[...]``, comments, quoted strings; ``$VAR`` references are kept as text."""
    tokens = [t for t in _NATS_TOKEN.findall(text) if t.strip() and not t.startswith(("#", "//")) and t != ","]
    conf, _ = _nats_object(tokens, 0)
    return conf


def _nats_object(tokens: list[str], i: int) -> tuple[dict[str, Any], int]:
    out: dict[str, Any] = {}
    while i < len(tokens) and tokens[i] != "}":
        key = tokens[i].rstrip(":=")
        i += 2 if i + 1 < len(tokens) and tokens[i + 1] in (":", "=") else 1
        out[key], i = _nats_value(tokens, i)
    return out, i + 1


def _nats_value(tokens: list[str], i: int) -> tuple[Any, int]:
    if tokens[i] == "{":
        return _nats_object(tokens, i + 1)
    if tokens[i] == "[":
        items, i = [], i + 1
        while tokens[i] != "]":
            item, i = _nats_value(tokens, i)
            items.append(item)
        return items, i + 1
    text = tokens[i]
    return (text[1:-1] if text.startswith('"') else text), i + 1


def nats_variables(conf: Any) -> set[str]:
    """``$VAR`` references of a parsed configuration (nats-server reads them from its environment)."""
    if isinstance(conf, dict):
        return set().union(*(nats_variables(v) for v in conf.values())) if conf else set()
    if isinstance(conf, list):
        return set().union(*(nats_variables(v) for v in conf)) if conf else set()
    return {conf[1:]} if isinstance(conf, str) and conf.startswith("$") else set()


class _Placeholders(dict[str, str]):
    def __missing__(self, key: str) -> str:
        return {"cluster": "", "hub_leaf_urls": '"nats://hub:7422"'}.get(key, "x")


def template(name: str) -> dict[str, Any]:
    """A template of deploy/nats, rendered with placeholders, as the reference for what was derived."""
    return parse_nats(string.Template((DEPLOY / "nats" / name).read_text()).substitute(_Placeholders()))


def assert_hub(conf: dict[str, Any], where: str) -> None:
    """A hub node as DESIGN.md has it: domain `hub`, a 3-node cluster, a leaf listener with no_advertise."""
    assert conf["jetstream"]["domain"] == "hub", where
    assert conf["cluster"]["name"] == "hub", where
    assert len(conf["cluster"]["routes"]) == 3, where
    assert conf["leafnodes"]["no_advertise"] == "true", f"{where}: the leaf listener must not advertise"
    assert "listen" in conf["leafnodes"], where
    assert conf["max_payload"] == template("hub.conf.tmpl")["max_payload"], where


def assert_edge(conf: dict[str, Any], where: str) -> None:
    """An edge server: a leaf of the hub (no listener of its own), its JetStream domain the site id."""
    assert conf["jetstream"]["domain"] == "$LW_SITE", f"{where}: the edge's domain must be its site id"
    assert conf["leafnodes"]["remotes"][0]["urls"], where
    assert "listen" not in conf["leafnodes"], where
    assert conf["max_payload"] == template("edge.conf.tmpl")["max_payload"], where


# -- small readers ----------------------------------------------------------------------------------------------

def yaml_files(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.yaml"))


def docs(path: Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def env_file(path: Path) -> dict[str, str]:
    """``NAME=value`` lines of an environment file (comments and blank lines skipped)."""
    pairs = (ln.split("=", 1) for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#"))
    return {k.strip(): v.strip() for k, v in pairs}


def python_module(command: list[str]) -> str | None:
    """The X of ``python -m services.X`` in a command line, or None for another program."""
    if "-m" in command and command.index("-m") + 1 < len(command):
        module = command[command.index("-m") + 1]
        return module.removeprefix("services.") if module.startswith("services.") else module
    return None


def seconds(value: str | int) -> float:
    """``30s``, ``1m30s``, ``45`` -> seconds."""
    if isinstance(value, int):
        return float(value)
    units = {"h": 3600, "m": 60, "s": 1, "": 1}
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*(h|m|s|)", value)
    assert parts, value
    return sum(float(n) * units[u] for n, u in parts)


class TestSettingsMap:
    def test_each_service_runs_with_the_settings_checked_here(self) -> None:
        """The settings class this file checks a service's variables against is the one its __main__ runs."""
        assert set(SETTINGS) == service_packages()
        for service, cls in SETTINGS.items():
            main = (ROOT / "services" / service / "__main__.py").read_text()
            assert re.search(rf"\brun\(SERVICE, {cls.__name__}\b", main), service


# == Docker =====================================================================================================

DOCKERFILE = DEPLOY / "docker" / "Dockerfile"


def dockerfile_lines() -> list[str]:
    """Instructions of the Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


class TestDockerfile:
    def test_base_image_is_python_311_slim(self) -> None:
        """Every stage builds on python:3.11-slim (the ARG it names by default)."""
        lines = dockerfile_lines()
        default = next(ln.split("=", 1)[1] for ln in lines if ln.startswith("ARG PYTHON_IMAGE="))
        assert default.startswith("python:3.11-slim")
        froms = [ln.split()[1] for ln in lines if ln.startswith("FROM ")]
        assert froms
        assert all(f in ("${PYTHON_IMAGE}", default) for f in froms)

    def test_installs_from_the_lock_with_uv(self) -> None:
        """The environment comes from uv.lock, refusing a lock that does not match pyproject.toml."""
        lines = dockerfile_lines()
        assert any(ln.startswith("COPY") and "uv.lock" in ln for ln in lines)
        syncs = [ln for ln in lines if "uv sync" in ln]
        assert syncs
        assert all("--locked" in ln and "--no-dev" in ln for ln in syncs)

    def test_runs_as_a_non_root_user(self) -> None:
        """The final stage's user is not root."""
        users = [ln.split()[1] for ln in dockerfile_lines() if ln.startswith("USER ")]
        assert users
        assert users[-1].split(":")[0] not in ("root", "0")

    def test_default_command_is_a_service(self) -> None:
        """Without a command the image runs a real service."""
        cmd = json.loads(next(ln for ln in dockerfile_lines() if ln.startswith("CMD "))[4:])
        assert python_module(cmd) in service_packages()

    def test_copied_files_exist(self) -> None:
        """Every file the build copies from the repository is there (and not kept out by the .dockerignore)."""
        ignore = (DEPLOY / "docker" / "Dockerfile.dockerignore").read_text().splitlines()
        for line in dockerfile_lines():
            if line.startswith("COPY") and "--from=" not in line:
                for source in line.split()[1:-1]:
                    assert (ROOT / source).exists(), source
                    kept = f"!{source}" in ignore or f"!{source}/**" in ignore
                    assert kept, f"{source} is excluded by Dockerfile.dockerignore"

    def test_environment_names_real_settings(self) -> None:
        """Every LW_* variable the image sets is read by some service."""
        env = dict(re.findall(r"(LW_\w+)=(\S+)", " ".join(ln for ln in dockerfile_lines() if ln.startswith("ENV"))))
        known = set().union(*(known_variables(s) for s in SETTINGS))
        assert env
        assert set(env) <= known


# == compose ====================================================================================================

COMPOSE_FILES = sorted(COMPOSE.glob("*/compose.yaml"))
_INTERPOLATION = re.compile(r"\$\{(\w+)(?:(:?[-?])([^}]*))?\}")


def interpolate(value: Any, variables: Mapping[str, str], where: str) -> Any:
    """Compose's ``${VAR}``, ``${VAR:-default}`` and ``${VAR:?error}`` with ``variables`` (the env.example)."""
    if isinstance(value, dict):
        return {k: interpolate(v, variables, where) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, variables, where) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match[str]) -> str:
        name, op, rest = m.groups()
        if name in variables:
            return variables[name]
        if op is None or "?" in op:
            raise AssertionError(f"{where}: ${{{name}}} is required but not in env.example")
        return rest

    return _INTERPOLATION.sub(sub, value)


def compose_services(path: Path) -> dict[str, dict[str, Any]]:
    """The services of a compose file, interpolated with its env.example (anchors and merges resolved)."""
    variables = env_file(path.parent / "env.example")
    return dict(interpolate(yaml.safe_load(path.read_text())["services"], variables, str(path)))


def compose_env(service: Mapping[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def leafwire_services(path: Path) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(compose name, service package, definition) of every leafwire service in a compose file."""
    for name, service in compose_services(path).items():
        module = python_module(service.get("command") or [])
        if module is not None:
            yield name, module, service


def nats_services(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    for name, service in compose_services(path).items():
        if (service.get("command") or [""])[0] == "nats-server":
            yield name, service


def mounted_config(path: Path, service: Mapping[str, Any]) -> Path:
    """The host file mounted where the service's ``-c`` option points."""
    command = service["command"]
    target = command[command.index("-c") + 1]
    for volume in service["volumes"]:
        source, _, rest = str(volume).partition(":")
        if rest.split(":")[0] == target:
            return (path.parent / source).resolve()
    raise AssertionError(f"nothing is mounted at {target}")


def volume_targets(service: Mapping[str, Any]) -> set[str]:
    return {v.split(":")[1] for v in service.get("volumes", [])}


class TestCompose:
    def test_files_parse(self) -> None:
        """Both compose files (edge and hub) exist and parse, each with its env.example."""
        assert {p.parent.name for p in COMPOSE_FILES} == {"edge", "hub"}
        for path in COMPOSE_FILES:
            assert compose_services(path)

    def test_edge_runs_every_service(self) -> None:
        """The edge site's file runs every service package beside its NATS server."""
        packages = {module for _, module, _ in leafwire_services(COMPOSE / "edge" / "compose.yaml")}
        assert packages == service_packages()
        assert len(list(nats_services(COMPOSE / "edge" / "compose.yaml"))) == 1

    def test_hub_runs_a_three_node_cluster_and_the_hub_services(self) -> None:
        """The hub's file runs three NATS nodes, and router, batcher, cloud-adapter and gateway on site `hub`."""
        path = COMPOSE / "hub" / "compose.yaml"
        assert len(list(nats_services(path))) == 3
        packages = {module for _, module, _ in leafwire_services(path)}
        assert {"router", "batcher", "cloud_adapter", "gateway"} <= packages
        assert {compose_env(s)["LW_SITE"] for _, _, s in leafwire_services(path)} == {"hub"}

    @pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.parent.name)
    def test_commands_name_service_packages(self, path: Path) -> None:
        """Every ``python -m services.X`` names a package under services/."""
        for name, module, _ in leafwire_services(path):
            assert module in service_packages(), f"{name}: services.{module} does not exist"

    @pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.parent.name)
    @pytest.mark.usefixtures("clean_env")
    def test_settings_are_real_and_accepted(self, path: Path) -> None:
        """Each LW_* variable given to a service is one of its settings, and the service accepts the values."""
        for name, module, service in leafwire_services(path):
            env = compose_env(service)
            unknown = {k for k in env if k.startswith("LW_")} - known_variables(module)
            assert not unknown, f"{name} ({module}) has no setting {sorted(unknown)}"
            settings = validate_settings(module, env)
            assert settings.env == "production"
            assert settings.nats_creds is None
            assert "@" in settings.nats_url

    @pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.parent.name)
    def test_health_checks_ask_readyz_where_the_service_listens(self, path: Path) -> None:
        """A service's health check asks /readyz on the port it serves it on, bound to every interface."""
        for name, module, service in leafwire_services(path):
            env = compose_env(service)
            port, host = env[API_PORT.get(module, "LW_OPS_PORT")], env[API_HOST.get(module, "LW_OPS_HOST")]
            assert host == "0.0.0.0", f"{name}: 127.0.0.1 is unreachable from outside its container"
            assert f"127.0.0.1:{port}/readyz" in " ".join(service["healthcheck"]["test"]), name

    @pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.parent.name)
    def test_stop_grace_covers_the_shutdown(self, path: Path) -> None:
        """Compose waits longer than a service's own shutdown (the gateway's grace, the NATS drain) before a kill."""
        for name, module, service in leafwire_services(path):
            assert seconds(service.get("stop_grace_period", "10s")) > stop_budget_s(module), name

    @pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.parent.name)
    def test_services_wait_for_a_healthy_nats(self, path: Path) -> None:
        """Every service starts once the NATS servers of its file report healthy (directly, or through the
        healthy services it waits for)."""
        services = compose_services(path)
        servers = {name for name, _ in nats_services(path)}

        def healthy_before(name: str) -> set[str]:
            waits = services[name].get("depends_on", {})
            assert all(w["condition"] == "service_healthy" for w in waits.values()), name
            return set(waits).union(*(healthy_before(w) for w in waits))

        for name, _, _ in leafwire_services(path):
            assert servers <= healthy_before(name), name

    @pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.parent.name)
    def test_gateway_publishes_its_api_port(self, path: Path) -> None:
        """The gateway's published port reaches LW_GATEWAY_PORT inside the container."""
        gateway = next(s for _, module, s in leafwire_services(path) if module == "gateway")
        assert any(p.rsplit(":", 1)[-1] == compose_env(gateway)["LW_GATEWAY_PORT"] for p in gateway["ports"])

    @pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.parent.name)
    def test_local_inference_mounts_the_models(self, path: Path) -> None:
        """local-inference finds the model volume where LW_MODELS_DIR says, and the registry's folders there."""
        for _, module, service in leafwire_services(path):
            if module == "local_inference":
                assert compose_env(service)["LW_MODELS_DIR"] in volume_targets(service)

    @pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.parent.name)
    def test_cloud_adapter_gets_every_provider_key(self, path: Path) -> None:
        """The cloud-adapter is given every key its mounted providers file names (production refuses a
        provider without one)."""
        for _, module, service in leafwire_services(path):
            if module == "cloud_adapter":
                target = compose_env(service)["LW_PROVIDERS_FILE"]
                source = next(v.split(":")[0] for v in service["volumes"] if v.split(":")[1] == target)
                parsed = providers_config.parse((path.parent / source).read_text())
                keys = {p.api_key_env for p in parsed.providers if p.api_key_env}
                assert keys
                assert keys <= set(compose_env(service))

    @pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: p.parent.name)
    def test_nats_config_is_mounted_and_complete(self, path: Path) -> None:
        """Each NATS container mounts its config, which gets every variable it references, and keeps JetStream
        on a volume."""
        for name, service in nats_services(path):
            conf = parse_nats(mounted_config(path, service).read_text())
            assert nats_variables(conf) == set(compose_env(service)), name
            assert conf["jetstream"]["store_dir"] in volume_targets(service), name

    def test_edge_domain_is_the_services_site(self) -> None:
        """The edge server's JetStream domain ($LW_SITE) is the site every service of the file runs as."""
        path = COMPOSE / "edge" / "compose.yaml"
        (_, nats), = nats_services(path)
        assert_edge(parse_nats(mounted_config(path, nats).read_text()), str(path))
        sites = {compose_env(s)["LW_SITE"] for _, _, s in leafwire_services(path)}
        assert sites == {compose_env(nats)["LW_SITE"]}

    def test_hub_nodes_form_the_hub(self) -> None:
        """The hub's nodes run the hub config (domain hub, no_advertise), with routes to each other's names."""
        path = COMPOSE / "hub" / "compose.yaml"
        names = {name for name, _ in nats_services(path)}
        for name, service in nats_services(path):
            conf = parse_nats(mounted_config(path, service).read_text())
            assert_hub(conf, name)
            assert {re.sub(r"nats://([^:]+):\d+", r"\1", r) for r in conf["cluster"]["routes"]} == names


# == Kubernetes =================================================================================================

def k8s_objects() -> list[dict[str, Any]]:
    return [d for p in yaml_files(K8S) if p.name != "kustomization.yaml" for d in docs(p)]


def k8s(kind: str) -> list[dict[str, Any]]:
    return [o for o in k8s_objects() if o["kind"] == kind]


def configmaps() -> dict[str, dict[str, str]]:
    return {o["metadata"]["name"]: o.get("data", {}) for o in k8s("ConfigMap")}


def container_env(container: Mapping[str, Any]) -> dict[str, str]:
    """A container's environment: ConfigMaps it takes whole, then its own entries (a value from a Secret or
    the downward API, or with a ``$(VAR)`` reference, gets a placeholder)."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(configmaps()[source["configMapRef"]["name"]])
    for entry in container.get("env", []):
        env[entry["name"]] = re.sub(r"\$\((\w+)\)", "placeholder", entry["value"]) if "value" in entry else "x"
    return env


def deployments() -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(service package, pod spec, container) of every leafwire Deployment."""
    for deployment in k8s("Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        for container in pod["containers"]:
            module = python_module(container.get("command", []) + container.get("args", []))
            assert module is not None, deployment["metadata"]["name"]
            yield module, pod, container


def port_number(container: Mapping[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    return next(int(p["containerPort"]) for p in container["ports"] if p["name"] == port)


class TestKubernetes:
    def test_files_parse_and_kustomization_lists_them(self) -> None:
        """Every manifest parses and kustomization.yaml lists each of them, and nothing else."""
        listed = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
        files = {p.name for p in yaml_files(K8S)} - {"kustomization.yaml"}
        assert sorted(listed) == sorted(files)
        assert all(o["apiVersion"] and o["metadata"]["name"] for o in k8s_objects())

    def test_hub_services_run(self) -> None:
        """Router, batcher, cloud-adapter and gateway each run as a Deployment of a real service package."""
        assert {module for module, _, _ in deployments()} == {"router", "batcher", "cloud_adapter", "gateway"}
        assert {module for module, _, _ in deployments()} <= service_packages()

    def test_selectors_match_their_pods(self) -> None:
        """Each Deployment's and the StatefulSet's selector matches its pod template's labels."""
        for workload in k8s("Deployment") + k8s("StatefulSet"):
            selector = workload["spec"]["selector"]["matchLabels"]
            assert selector.items() <= workload["spec"]["template"]["metadata"]["labels"].items()

    @pytest.mark.usefixtures("clean_env")
    def test_settings_are_real_and_accepted(self) -> None:
        """Each LW_* variable a container gets is one of its service's settings, for site `hub`, and accepted."""
        for module, _, container in deployments():
            env = container_env(container)
            unknown = {k for k in env if k.startswith("LW_")} - known_variables(module)
            assert not unknown, f"{module} has no setting {sorted(unknown)}"
            settings = validate_settings(module, env)
            assert settings.site == "hub"
            assert settings.env == "production"

    def test_probes_hit_healthz_and_readyz_where_the_service_listens(self) -> None:
        """Liveness asks /healthz, readiness /readyz, on the port the service serves them on, bound to every
        interface (the kubelet probes the pod's address)."""
        for module, _, container in deployments():
            env = container_env(container)
            port = int(env[API_PORT.get(module, "LW_OPS_PORT")])
            assert env[API_HOST.get(module, "LW_OPS_HOST")] == "0.0.0.0", module
            for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
                get = container[probe]["httpGet"]
                assert (get["path"], port_number(container, get["port"])) == (path, port), f"{module} {probe}"

    def test_resources_are_requested(self) -> None:
        """Every container asks for CPU and memory, and caps its memory."""
        containers = [c for w in k8s("Deployment") + k8s("StatefulSet") for c in w["spec"]["template"]["spec"]
                      ["containers"]]
        for container in containers:
            assert {"cpu", "memory"} <= set(container["resources"]["requests"]), container["name"]
            assert "memory" in container["resources"]["limits"], container["name"]

    def test_termination_grace_covers_the_shutdown(self) -> None:
        """A pod gets longer than its preStop wait plus the service's own shutdown before it is killed."""
        for module, pod, container in deployments():
            hook = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
            wait = float(hook[1]) if hook[:1] == ["sleep"] else 0.0
            assert pod["terminationGracePeriodSeconds"] > wait + stop_budget_s(module), module

    def test_secrets_carry_provider_and_api_keys(self) -> None:
        """Provider keys reach the cloud-adapter from a Secret; the gateway's API keys file is a mounted Secret."""
        pods = {module: (pod, container) for module, pod, container in deployments()}
        _, adapter = pods["cloud_adapter"]
        assert any("secretRef" in source for source in adapter["envFrom"])
        pod, gateway = pods["gateway"]
        secrets = {v["name"] for v in pod["volumes"] if "secret" in v}
        mounts = [m["mountPath"] for m in gateway["volumeMounts"] if m["name"] in secrets]
        assert any(container_env(gateway)["LW_GATEWAY_API_KEYS_FILE"].startswith(m + "/") for m in mounts)

    def test_providers_configmap_is_a_valid_providers_file(self) -> None:
        """The providers file the cloud-adapter mounts is one the adapter accepts."""
        parsed = providers_config.parse(configmaps()["leafwire-providers"]["providers.yaml"])
        assert parsed.providers

    def test_providers_configmap_ships_the_shipped_providers_file(self) -> None:
        """The ConfigMap starts as deploy/providers.yaml, word for word (a change to one is made to both)."""
        assert configmaps()["leafwire-providers"]["providers.yaml"] == (ROOT / "deploy" / "providers.yaml").read_text()

    def test_nats_is_a_three_node_statefulset_behind_a_headless_service(self) -> None:
        """NATS runs as 3 replicas whose headless service selects them and publishes them before they are ready."""
        (nats,) = k8s("StatefulSet")
        assert nats["spec"]["replicas"] == 3
        service = next(s for s in k8s("Service") if s["metadata"]["name"] == nats["spec"]["serviceName"])
        assert service["spec"]["clusterIP"] == "None"
        assert service["spec"]["publishNotReadyAddresses"] is True
        assert service["spec"]["selector"].items() <= nats["spec"]["template"]["metadata"]["labels"].items()

    def test_nats_config_is_the_hub(self) -> None:
        """The mounted NATS config keeps domain `hub`, no_advertise, routes to the 3 pods, JetStream on the
        volume claim, and gets every variable it references."""
        (nats,) = k8s("StatefulSet")
        pod = nats["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        config = next(v["configMap"]["name"] for v in pod["volumes"] if "configMap" in v)
        conf = parse_nats(configmaps()[config]["nats.conf"])
        assert_hub(conf, "nats-configmap.yaml")
        pods = {f"nats-{i}.{nats['spec']['serviceName']}" for i in range(3)}
        assert {re.sub(r"nats://([^:]+):\d+", r"\1", r) for r in conf["cluster"]["routes"]} == pods
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert mounts["data"] == conf["jetstream"]["store_dir"]
        assert nats["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
        assert nats_variables(conf) <= {e["name"] for e in container["env"]}

    def test_nats_disruption_budget_keeps_quorum(self) -> None:
        """At most one NATS pod is evicted at a time: two of three keep JetStream's quorum."""
        (nats,) = k8s("StatefulSet")
        budgets = [b for b in k8s("PodDisruptionBudget")
                   if b["spec"]["selector"]["matchLabels"].items() <= nats["spec"]["template"]["metadata"]["labels"]
                   .items()]
        assert len(budgets) == 1
        spec = budgets[0]["spec"]
        assert spec.get("maxUnavailable") == 1 or spec.get("minAvailable") == 2


# == systemd ====================================================================================================

def read_unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """A unit file's sections as lists of (key, value): systemd allows a key more than once."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = ""
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = line.strip("[]")
            sections.setdefault(current, [])
        else:
            key, _, value = line.partition("=")
            sections[current].append((key.strip(), value.strip()))
    return sections


def unit_values(unit: Mapping[str, list[tuple[str, str]]], section: str, key: str) -> list[str]:
    return [v for k, v in unit.get(section, []) if k == key]


def example_of(installed: str, instance: str) -> Path:
    """The example in deploy/systemd of an environment file a unit reads from /etc/leafwire."""
    name = Path(installed.lstrip("-").replace("%i", instance)).name
    for candidate in (SYSTEMD / f"{name}.example", SYSTEMD / "env" / f"{name}.example"):
        if candidate.exists():
            return candidate
    raise AssertionError(f"no example of {installed} for {instance}")


def unit_env(unit: Mapping[str, list[tuple[str, str]]], instance: str = "") -> dict[str, str]:
    """What a unit's process gets from its environment files (their examples) and Environment= lines."""
    env: dict[str, str] = {}
    for path in unit_values(unit, "Service", "EnvironmentFile"):
        env.update(env_file(example_of(path, instance)))
    for line in unit_values(unit, "Service", "Environment"):
        env.update(dict(pair.split("=", 1) for pair in line.split()))
    return env


SERVICE_UNIT = SYSTEMD / "leafwire@.service"
NATS_UNIT = SYSTEMD / "leafwire-nats.service"
HARDENING = {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "PrivateTmp": "yes"}


class TestSystemd:
    def test_template_runs_the_instance_as_a_service(self) -> None:
        """leafwire@X.service runs ``python -m services.X`` from the checkout's environment."""
        (start,) = unit_values(read_unit(SERVICE_UNIT), "Service", "ExecStart")
        assert start.split()[0].endswith("/.venv/bin/python")
        assert python_module(start.split()) == "%i"

    def test_each_service_has_an_env_example(self) -> None:
        """Every service package has a /etc/leafwire/<service>.env example, and every example is a service."""
        assert {p.name.removesuffix(".env.example") for p in (SYSTEMD / "env").glob("*.env.example")} == \
            service_packages()

    def test_common_env_holds_only_shared_settings(self) -> None:
        """leafwire.env, which every service reads, sets only settings every service has."""
        common = env_file(SYSTEMD / "leafwire.env.example")
        assert common
        assert set(common) <= set(env_names(ServiceSettings))

    @pytest.mark.parametrize("service", sorted(SETTINGS))
    @pytest.mark.usefixtures("clean_env")
    def test_settings_are_real_and_accepted(self, service: str) -> None:
        """Each LW_* variable a service's unit gets is one of its settings, and the service accepts the values."""
        env = unit_env(read_unit(SERVICE_UNIT), service)
        unknown = {k for k in env if k.startswith("LW_")} - known_variables(service)
        assert not unknown, f"{service} has no setting {sorted(unknown)}"
        assert validate_settings(service, env).env == "production"

    @pytest.mark.parametrize("path", [SERVICE_UNIT, NATS_UNIT], ids=lambda p: p.name)
    def test_restarts_on_failure_and_is_hardened(self, path: Path) -> None:
        """A unit restarts what failed and runs without new privileges, a read-only system and a private /tmp,
        writing only where ReadWritePaths says."""
        unit = read_unit(path)
        assert unit_values(unit, "Service", "Restart") == ["on-failure"]
        for key, value in HARDENING.items():
            assert unit_values(unit, "Service", key) == [value], key
        assert unit_values(unit, "Service", "ReadWritePaths")
        assert unit_values(unit, "Service", "User") == ["leafwire"]

    def test_stop_timeout_covers_the_gateways_grace_and_drain(self) -> None:
        """systemd waits longer than the gateway's shutdown grace plus the NATS drain before it kills."""
        (timeout,) = unit_values(read_unit(SERVICE_UNIT), "Service", "TimeoutStopSec")
        assert seconds(timeout) > max(stop_budget_s(s) for s in SETTINGS)

    def test_gateway_stops_before_the_services(self) -> None:
        """The gateway's drop-in orders it after the other services (so it stops first), naming real ones."""
        unit = read_unit(SYSTEMD / "leafwire@gateway.service.d" / "order.conf")
        after = {name for line in unit_values(unit, "Unit", "After") for name in line.split()}
        assert {re.sub(r"^leafwire@(\w+)\.service$", r"\1", name) for name in after} == service_packages() - {"gateway"}

    def test_reloading_the_cloud_adapter_sends_it_sighup(self) -> None:
        """`systemctl reload leafwire@cloud_adapter` is SIGHUP to the service's main process: what makes the
        adapter read its providers file again (services/cloud_adapter/app.py keep_configured)."""
        unit = read_unit(SYSTEMD / "leafwire@cloud_adapter.service.d" / "reload.conf")
        assert unit_values(unit, "Service", "ExecReload") == ["/bin/kill -HUP $MAINPID"]
        assert "signal.SIGHUP" in (ROOT / "services" / "cloud_adapter" / "app.py").read_text()

    def test_nats_unit_runs_the_edge_config(self) -> None:
        """leafwire-nats runs nats-edge.conf: a leaf of the hub, domain $LW_SITE, JetStream in a writable path,
        every variable it references in the unit's environment files."""
        unit = read_unit(NATS_UNIT)
        (start,) = unit_values(unit, "Service", "ExecStart")
        installed = start.split()[start.split().index("-c") + 1]
        conf = parse_nats((SYSTEMD / Path(installed).name).read_text())
        assert_edge(conf, str(NATS_UNIT))
        assert nats_variables(conf) <= set(unit_env(unit))
        writable = unit_values(unit, "Service", "ReadWritePaths")
        assert any(conf["jetstream"]["store_dir"].startswith(p) for p in writable)

    def test_edge_domain_is_the_services_site(self) -> None:
        """The NATS server and the services read LW_SITE from the same file, so the domain is the site."""
        shared = "/etc/leafwire/leafwire.env"
        assert shared in unit_values(read_unit(NATS_UNIT), "Service", "EnvironmentFile")
        assert shared in unit_values(read_unit(SERVICE_UNIT), "Service", "EnvironmentFile")
        assert "LW_SITE" in env_file(SYSTEMD / "leafwire.env.example")

    def test_cloud_adapter_example_gives_every_provider_key(self) -> None:
        """The cloud-adapter's env example holds a key for each provider of deploy/providers.yaml."""
        parsed = providers_config.parse((DEPLOY / "providers.yaml").read_text())
        keys = {p.api_key_env for p in parsed.providers if p.api_key_env}
        assert keys <= set(env_file(SYSTEMD / "env" / "cloud_adapter.env.example"))


# == Prometheus =================================================================================================

def rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def recorded_series() -> dict[str, Series]:
    """Series the recording rules make, with the labels they keep (they aggregate ``by``; ``le`` is spent by
    histogram_quantile)."""
    recorded = {}
    for rule in rules():
        if "record" in rule:
            kept = set().union(*parse_promql(rule["expr"]).grouping) - {"le"}
            recorded[rule["record"]] = Series(frozenset(kept))
    return recorded


def result_labels(expr: str, recorded: Mapping[str, Series]) -> set[str]:
    """Labels an alert's series carry: its outer ``by`` clause, or else those of the series it selects."""
    query = parse_promql(expr)
    if query.grouping:
        return query.grouping[0]
    known = {**SERIES, **recorded}
    return set().union(*(known[n].labels for n in query.names if n in known))


class TestPrometheusRules:
    def test_registry_is_read(self) -> None:
        """The metrics module exposes the series the rules lean on (so the checks below are not vacuous)."""
        assert {"leafwire_up", "leafwire_http_requests_total", "leafwire_http_request_duration_seconds_bucket",
                "leafwire_cloud_breaker_state"} <= set(SERIES)
        assert SERIES["leafwire_http_requests_total"].labels == {"endpoint", "status"} | TARGET_LABELS

    def test_promql_reader_finds_names_and_labels(self) -> None:
        """The reader sees through functions, aggregations, ranges and strings to the selectors and groupings."""
        query = parse_promql('sum by (job, le) (rate(a_total{x="1", y=~"$v"}[$__rate_interval])) / on (job) b')
        assert query.selectors == [("a_total", {"x", "y"}), ("b", set())]
        assert query.grouping == [{"job", "le"}, {"job"}]
        assert check_query('leafwire_up{model="x"}', {}) == ["leafwire_up has no label ['model']"]

    def test_every_rule_names_existing_metrics_and_labels(self) -> None:
        """Each expression selects series shared/metrics.py exports (or a recording rule makes), by labels they
        have, and groups by labels they have."""
        recorded = recorded_series()
        problems = {rule.get("alert") or rule["record"]: check_query(rule["expr"], recorded) for rule in rules()}
        assert {k: v for k, v in problems.items() if v} == {}

    def test_alerts_have_severity_and_summary(self) -> None:
        """Each alert says how bad it is and what happened."""
        alerts = [r for r in rules() if "alert" in r]
        assert len(alerts) >= 10
        for alert in alerts:
            assert alert["labels"]["severity"] in {"critical", "warning", "info"}, alert["alert"]
            assert alert["annotations"]["summary"], alert["alert"]

    def test_annotations_use_labels_the_alert_has(self) -> None:
        """``$labels.X`` in an alert's text is a label its series keep (not one aggregated away)."""
        recorded = recorded_series()
        for alert in (r for r in rules() if "alert" in r):
            used = set(re.findall(r"\$labels\.(\w+)", json.dumps(alert["annotations"])))
            assert used <= result_labels(alert["expr"], recorded), alert["alert"]

    def test_covers_what_an_operator_is_woken_for(self) -> None:
        """There are alerts on a service down, errors, latency, breakers, budgets, queues, lost rows, callers
        gone, dead letters and NATS."""
        named = set().union(*(parse_promql(r["expr"]).names for r in rules()))
        assert {"up", "leafwire_up", "leafwire_http_requests_total", "leafwire_cloud_breaker_state",
                "leafwire_budget_used_ratio", "leafwire_queue_depth_requests", "leafwire_rows_lost_total",
                "leafwire_callers_gone_total", "leafwire_dead_letters_total", "leafwire_nats_connected"} <= named

    def test_rule_tests_load_these_rules(self) -> None:
        """rules_test.yaml (for promtool) tests this file and only alerts that exist."""
        tests = yaml.safe_load((RULES.parent / "rules_test.yaml").read_text())
        assert tests["rule_files"] == [RULES.name]
        alerts = {r["alert"] for r in rules() if "alert" in r}
        tested = {case["alertname"] for t in tests["tests"] for case in t["alert_rule_test"]}
        assert tested
        assert tested <= alerts


# == Grafana ====================================================================================================

def dashboard() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text()))


def panels() -> list[dict[str, Any]]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


class TestGrafanaDashboard:
    def test_every_panel_queries_existing_metrics_and_labels(self) -> None:
        """Each panel's queries select series shared/metrics.py exports, by labels they have."""
        problems = {f"{p['title']} {t['refId']}": check_query(t["expr"], {}) for p in panels() for t in p["targets"]}
        assert {k: v for k, v in problems.items() if v} == {}

    def test_variables_read_existing_labels(self) -> None:
        """The job and instance variables list values of labels that exist."""
        for variable in dashboard()["templating"]["list"]:
            if variable["type"] == "query":
                match = re.fullmatch(r"label_values\((\w+)(?:\{.*\})?,\s*(\w+)\)", variable["definition"])
                assert match, variable["name"]
                assert match.group(2) in SERIES[match.group(1)].labels

    def test_panels_use_the_datasource_variable(self) -> None:
        """Panels query the Prometheus the viewer picks, through the `datasource` variable."""
        names = {v["name"] for v in dashboard()["templating"]["list"] if v["type"] == "datasource"}
        assert names == {"datasource"}
        assert all(p["datasource"]["uid"] == "${datasource}" for p in panels())

    def test_panel_ids_are_unique_and_panels_do_not_overlap(self) -> None:
        """Grafana needs distinct panel ids; panels laid out on the same cells would hide each other."""
        every = dashboard()["panels"]
        assert len({p["id"] for p in every}) == len(every)
        cells = [(x, y) for p in every for x in range(p["gridPos"]["x"], p["gridPos"]["x"] + p["gridPos"]["w"])
                 for y in range(p["gridPos"]["y"], p["gridPos"]["y"] + p["gridPos"]["h"])]
        assert len(cells) == len(set(cells))
        assert all(p["gridPos"]["x"] + p["gridPos"]["w"] <= 24 for p in every)

    def test_shows_what_was_asked(self) -> None:
        """Requests by status, latency, tokens, queue depth, cloud cost, budgets, breakers and cache hits."""
        named = set().union(*(parse_promql(t["expr"]).names for p in panels() for t in p["targets"]))
        assert {"leafwire_http_requests_total", "leafwire_http_request_duration_seconds_bucket",
                "leafwire_completion_tokens_total", "leafwire_queue_depth_requests", "leafwire_cloud_cost_usd_total",
                "leafwire_budget_used_ratio", "leafwire_cloud_breaker_state",
                "leafwire_cloud_cache_lookups_total"} <= named
