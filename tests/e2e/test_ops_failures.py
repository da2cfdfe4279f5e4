"""What an operator meets when something around the services is wrong: bad arguments to the CLI, NATS
credentials, a configuration a service cannot start with, NATS going away (real nats-server and service
processes on free ports). Found by QA on `just up`'s stack; reproduced with the helpers of ``tests/support.py``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from shared.service import EX_CONFIG
from tests.support import (
    ROOT,
    NatsServer,
    Service,
    eventually,
    http_status,
    leafwire,
    start_single,
)

pytestmark = pytest.mark.e2e

# A well-formed user credentials file (the seed is a valid NKEY user seed; the JWT is only a placeholder: a
# server without authentication ignores it, as nats-py with nkeys installed shows).
CREDS = """-----BEGIN NATS USER JWT-----
eyJ0eXAiOiJKV1QiLCJhbGciOiJlZDI1NTE5LW5rZXkifQ.eyJzdWIiOiJVQUIyQ0I1NzZQSEJCUFE1T0RPUlJaMkxZQ01XUFpHV0dDTjJLREs3RFhPSU1aQVNLVVkzUkxLSyJ9.c2lnbmF0dXJl
------END NATS USER JWT------

-----BEGIN USER NKEY SEED-----
SUAAAAICAMCAKBQHBAEQUCYMBUHA6EARCIJRIFIWC4MBSGQ3DQOR4H776Y
------END USER NKEY SEED------
"""


@pytest.fixture
def server(tmp_path: Path) -> Iterator[NatsServer]:
    srv = start_single(tmp_path, domain="edge1")
    try:
        yield srv
    finally:
        srv.stop()


def _exited(svc: Service, within: float = 30.0) -> int:
    assert svc.proc is not None
    eventually(lambda: svc.proc is not None and svc.proc.poll() is not None, within, f"{svc.module} to exit")
    return int(svc.proc.returncode)


def _full_log(svc: Service) -> str:
    assert svc.log_path is not None
    return svc.log_path.read_text()


def _non_json_lines(text: str) -> list[str]:
    bad = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            json.loads(line)
        except ValueError:
            bad.append(line)
    return bad


# --- CLI -------------------------------------------------------------------------------------------------

def test_usage_bad_domain_is_a_clean_error(server: NatsServer) -> None:
    out = leafwire("usage", "--nats", server.url, "--domain", "bad domain")
    assert "Traceback" not in out.stderr, out.stderr[-2000:]
    assert out.returncode == 2


def test_policy_push_bad_site_is_a_clean_error(server: NatsServer) -> None:
    out = leafwire("policy", "push", str(ROOT / "deploy" / "policy.yaml"), "--nats", server.url,
                   "--site", "bad site", "--wait", "2")
    assert "Traceback" not in out.stderr, out.stderr[-2000:]
    assert out.returncode == 2


def test_cli_with_a_credentials_file(server: NatsServer, tmp_path: Path) -> None:
    creds = tmp_path / "user.creds"
    creds.write_text(CREDS)
    out = leafwire("budgets", "--nats", server.url, "--creds", str(creds))
    assert out.returncode == 0, out.stderr  # connected with the credentials (nats-py needs nkeys for them)
    assert out.stdout.startswith("no cloud spending recorded in the current day or month")


def test_service_with_a_credentials_file(server: NatsServer, tmp_path: Path) -> None:
    creds = tmp_path / "user.creds"
    creds.write_text(CREDS)
    svc = Service("retrieval", {"LW_NATS_URL": server.url, "LW_SITE": "edge1", "LW_NATS_CREDS": str(creds),
                                "LW_NATS_CONNECT_TIMEOUT_S": "5"}).start()
    try:
        svc.wait_ready(30)
    finally:
        svc.stop()


# --- bad configuration --------------------------------------------------------------------------------------

def _broken_copy(src: Path, dst: Path, after: str, insert: str) -> Path:
    text = src.read_text()
    assert after in text
    dst.write_text(text.replace(after, after + "\n" + insert, 1))
    return dst


def refusal(server: NatsServer, module: str, env: dict[str, str]) -> str:
    """Start ``module`` with ``env``; it must exit with EX_CONFIG (not restarted by a supervisor: starting again
    mends nothing), its log all JSON, no traceback. The ``error`` of its error line."""
    svc = Service(module, {"LW_NATS_URL": server.url, "LW_SITE": "edge1", **env}).start()
    try:
        assert _exited(svc) == EX_CONFIG
        log = _full_log(svc)
    finally:
        svc.stop()
    assert "Traceback" not in log, log[-3000:]
    assert not _non_json_lines(log), log[-3000:]
    (error,) = [e for e in map(json.loads, filter(str.strip, log.splitlines())) if e.get("level") == "error"]
    assert error["event"] == "cannot start: bad configuration (starting again will not help)"
    return str(error["error"])


def test_malformed_providers_file_is_one_structured_error(server: NatsServer, tmp_path: Path) -> None:
    bad = _broken_copy(ROOT / "deploy" / "providers.yaml", tmp_path / "providers.yaml",
                       "    kind: openai-compatible", "   bad_indent: [1, 2")
    said = refusal(server, "cloud_adapter", {"LW_PROVIDERS_FILE": str(bad)})
    wrong = bad.read_text().splitlines().index("   bad_indent: [1, 2") + 1  # the line number of the bad line
    assert f'in "providers file {bad}", line {wrong}, column' in said, said


def test_malformed_policy_file_is_one_structured_error(server: NatsServer, tmp_path: Path) -> None:
    bad = _broken_copy(ROOT / "deploy" / "policy.yaml", tmp_path / "policy.yaml",
                       "last_resort: local", "  oops: [unclosed")
    said = refusal(server, "router", {"LW_ROUTER_POLICY_FILE": str(bad)})
    assert f'in "policy file {bad}", line 7' in said, said


def test_missing_policy_file_is_one_structured_error(server: NatsServer, tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    said = refusal(server, "router", {"LW_ROUTER_POLICY_FILE": str(missing)})
    assert said == f"policy file {missing} cannot be read: No such file or directory"


def test_invalid_setting_is_one_structured_error(server: NatsServer) -> None:
    said = refusal(server, "retrieval", {"LW_SITE": "Bad Site", "LW_KEEPALIVE_S": "abc"})
    assert said.startswith("LW_SITE: Value error, site id 'Bad Site' must match"), said
    assert "LW_KEEPALIVE_S: Input should be a valid number" in said


def test_a_refused_setting_is_not_echoed(server: NatsServer) -> None:
    """A setting may be a secret, and none is registered for scrubbing yet: the error names the variable and
    what is wrong with it, never the value (an API key written without its tenant)."""
    said = refusal(server, "gateway", {"LW_GATEWAY_API_KEYS": "sk-live-0123456789abcdef"})
    assert "API keys must be written key:tenant" in said
    assert "0123456789abcdef" not in said


# --- NATS outage ------------------------------------------------------------------------------------------

def test_logs_stay_json_when_nats_goes_away(server: NatsServer) -> None:
    svc = Service("retrieval", {"LW_NATS_URL": server.url, "LW_SITE": "edge1"})
    svc.start().wait_ready(60)
    try:
        server.stop()
        eventually(lambda: "nats disconnected" in _full_log(svc), 15, "the disconnection logged")
        time.sleep(1.0)
        log = _full_log(svc)
    finally:
        svc.stop()
    assert not _non_json_lines(log), "\n".join(_non_json_lines(log))[:2000]


def test_gateway_without_nats_fails_fast(server: NatsServer) -> None:
    gw = Service("gateway", {"LW_NATS_URL": server.url, "LW_SITE": "edge1"}).start()
    try:
        eventually(lambda: http_status(f"{gw.base}/healthz") == 200, 60, "gateway healthz")
        server.stop()
        eventually(lambda: gw.readyz()[1].get("problems", {}).get("nats"), 15, "gateway to see NATS gone")
        t0 = time.monotonic()
        try:
            resp = httpx.post(f"{gw.base}/v1/chat/completions", timeout=8,
                              json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}]})
        except httpx.TimeoutException:
            pytest.fail(f"no answer within 8 s (after {time.monotonic() - t0:.1f} s)")
        assert resp.status_code == 503, resp.text
        assert resp.json()["error"]["code"] == "unavailable"
        assert "not connected to NATS" in resp.json()["error"]["message"]
        assert resp.headers["retry-after"] == "5"
        assert time.monotonic() - t0 < 5  # a moment's grace for a reconnection, not the 20 s idle timeout
    finally:
        gw.stop()
