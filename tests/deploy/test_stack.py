"""The local stack launcher (`just up` / `just down`) and the NATS configs it renders."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest

from deploy import stack, topology
from shared.natsbin import nats_server
from tests.support import ROOT, eventually, leafwire, write_registry

pytestmark = pytest.mark.e2e


def test_rendered_configs_are_valid(tmp_path: Path) -> None:
    """The hub and edge templates render to configs nats-server accepts."""
    hub = topology.render_hub(tmp_path, "127.0.0.1", [4223, 4224, 4225], [6222, 6223, 6224],
                              [7422, 7423, 7424], [8223, 8224, 8225])
    edge = topology.render_edge(tmp_path, "plant-9", "127.0.0.1", 4222, 8222,
                                [f"nats://127.0.0.1:{n.leaf_port}" for n in hub])
    for node in [*hub, edge]:
        check = subprocess.run([str(nats_server()), "-t", "-c", str(node.conf)], capture_output=True, text=True)
        assert check.returncode == 0, check.stderr
    assert "no_advertise: true" in hub[0].conf.read_text()
    assert "domain: plant-9" in edge.conf.read_text()


GATEWAY_OFFSET, OPS_OFFSET = 4500, 4600  # one block for every port: blocks picked apart could overlap


def stack_env(tmp_path: Path) -> dict[str, str]:
    base = topology.free_block((*stack.NATS_OFFSETS, GATEWAY_OFFSET,
                                *(OPS_OFFSET + 1 + i for i in range(len(stack.SERVICES)))))
    return {**os.environ, "LW_RUN_DIR": str(tmp_path / "run"), "LW_NATS_PORT": str(base),
            "LW_GATEWAY_PORT": str(base + GATEWAY_OFFSET), "LW_OPS_PORT_BASE": str(base + OPS_OFFSET),
            "LW_SITE": "testsite",
            "LW_MODELS_FILE": str(write_registry(tmp_path / "models.yaml")), "LW_CHAT_MODEL": "tiny",
            "PYTHONUNBUFFERED": "1"}


def start_up(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen([sys.executable, "-m", "deploy.stack", "up"], env=env, cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT)


def leafwire_pids(run_dir: Path) -> list[int]:
    """Processes whose command line mentions the run folder or comes from supervisord's children."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                env = (proc / "environ").read_bytes()
                cmd = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            if str(run_dir).encode() in cmd or f"LW_RUN_DIR={run_dir}".encode() in env:
                found.append(int(proc.name))
    return found


def stop_leftovers(up: subprocess.Popen[bytes], env: dict[str, str]) -> None:
    """Whatever a test did, passed or failed: stop what its `up` started (`down`), then kill by PID anything of
    its run folder still there (killing `up` alone would leave supervisord and its children running)."""
    run_dir = Path(env["LW_RUN_DIR"])
    if up.poll() is None or leafwire_pids(run_dir):
        subprocess.run([sys.executable, "-m", "deploy.stack", "down"], env=env, cwd=ROOT, capture_output=True,
                       timeout=120)
    if up.poll() is None:
        up.send_signal(signal.SIGKILL)
    up.wait(30)
    for pid in leafwire_pids(run_dir):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


BANNER_WAIT_S = 90  # up serves in ~12 s here; under the pytest timeout (120 s) so a stuck start shows its logs


def wait_banner(up: subprocess.Popen[bytes], log: Path, run_dir: Path, what: str = "the banner") -> str:
    """The gateway URL `up` prints once healthy; when `up` exits first or time runs out, fail with what `up`
    and each program logged."""
    deadline = time.monotonic() + BANNER_WAIT_S
    while time.monotonic() < deadline and up.poll() is None:
        if found := re.search(r"OpenAI-compatible API\s+(\S+)", log.read_text()):
            return found.group(1)
        time.sleep(0.05)
    tails = [f"--- {f.name} (last 30 lines)\n" + "\n".join(f.read_text(errors="replace").splitlines()[-30:])
             for f in sorted((run_dir / "logs").glob("*.log"))]
    raise AssertionError(f"no {what} (up's exit code: {up.poll()}; waited up to {BANNER_WAIT_S} s)\n"
                         f"--- up\n{log.read_text()}\n" + "\n".join(tails))


def stale_pid_files(run_dir: Path) -> None:
    """What a killed launcher leaves behind: pid files naming processes that are gone."""
    run_dir.mkdir(parents=True)
    dead = subprocess.Popen(["true"])
    dead.wait()
    (run_dir / "supervisord.pid").write_text(str(dead.pid))
    (run_dir / "launcher.pid").write_text(str(dead.pid))


def push_policy(tmp: Path, edge_url: str, *more: str) -> subprocess.CompletedProcess[str]:
    """``leafwire policy push`` against the edge's NATS (``more``: its options)."""
    policy = tmp / "policy.yaml"
    policy.write_text("local_model: tiny\nrules: [{name: pushed, route: [requested]}]\n")
    return leafwire("policy", "push", str(policy), "--nats", edge_url, "--site", "testsite", *more)


def status(env: dict[str, str]) -> tuple[subprocess.CompletedProcess[str], dict[str, list[str]]]:
    """``just status``: its output, and its rows by process name."""
    shown = subprocess.run([sys.executable, "-m", "deploy.stack", "status"], env=env, cwd=ROOT, capture_output=True,
                           text=True, timeout=60)
    rows = {line.split()[0]: line.split()[1:] for line in shown.stdout.splitlines()[2:] if line.strip()}
    return shown, rows


def hub_usage(edge_url: str) -> dict[str, object]:
    """``leafwire usage --domain hub --json``: every site's usage as the hub has it."""
    done = leafwire("usage", "--nats", edge_url, "--domain", "hub", "--by", "site", "--json")
    return dict(json.loads(done.stdout)) if done.returncode == 0 else {"error": done.stderr}


def test_up_serves_then_down_leaves_nothing_behind(tmp_path: Path) -> None:
    """`up` starts over stale pid files, prints the gateway URL once healthy; `down` stops everything."""
    env = stack_env(tmp_path)
    run_dir = Path(env["LW_RUN_DIR"])
    stale_pid_files(run_dir)
    log = tmp_path / "up.log"
    up = start_up(env, log)
    try:
        url = wait_banner(up, log, run_dir)
        assert "ok  edge site 'testsite' joined as a leaf node" in log.read_text()
        reply = openai.OpenAI(base_url=url, api_key="x", max_retries=0).chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
        assert reply.usage is not None
        assert reply.usage.completion_tokens == 3
        edge_url = f"nats://127.0.0.1:{env['LW_NATS_PORT']}"
        pushed = push_policy(tmp_path, edge_url, "--wait", "30")  # a busy machine: more than 5 s
        assert pushed.returncode == 0, pushed.stderr  # written at the hub, applied by the edge's router
        assert '"outcome": "applied"' in pushed.stdout
        at_hub = eventually(lambda: (u := hub_usage(edge_url)).get("groups") and u, 30, "the answer's usage at the hub")
        assert at_hub["groups"] == [{"site": "testsite", "requests": 1, "errors": 0, "cached_requests": 0,
                                     "prompt_tokens": reply.usage.prompt_tokens, "completion_tokens": 3,
                                     "cost_usd": 0.0}]
        assert len(leafwire_pids(run_dir)) >= 10  # launcher, supervisord, 4 nats-servers, 6 services
        shown, rows = status(env)
        assert shown.returncode == 0, shown.stdout
        assert set(rows) == {"hub1", "hub2", "hub3", "edge-testsite", "router", "local-inference", "batcher",
                             "cloud-adapter", "retrieval", "gateway"}
        assert all(row[0] == "RUNNING" and row[-1] == "ok" for row in rows.values()), shown.stdout
        subprocess.run([sys.executable, "-m", "supervisor.supervisorctl", "-c", str(run_dir / "supervisord.conf"),
                        "stop", "services:retrieval"], capture_output=True, timeout=60, check=True)
        shown, rows = status(env)
        assert shown.returncode == 3
        assert rows["retrieval"][0] == "STOPPED", shown.stdout
        assert rows["router"][0] == "RUNNING"
        down = subprocess.run([sys.executable, "-m", "deploy.stack", "down"], env=env, cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
        assert "leafwire stopped" in down.stdout
        assert re.findall(r"stopped (\S+) \(", down.stdout) == ["gateway", "services", "nats-edge", "nats-hub"]
        assert up.wait(30) == 0
        assert leafwire_pids(run_dir) == []
        assert not (run_dir / "supervisord.pid").exists()
        assert not (run_dir / "launcher.pid").exists()
    finally:
        stop_leftovers(up, env)


def test_ctrl_c_stops_in_order_and_up_starts_again_at_once(tmp_path: Path) -> None:
    """Ctrl-C on `up` stops the groups in order, and an `up` right after it serves again on the same ports."""
    env = stack_env(tmp_path)
    run_dir = Path(env["LW_RUN_DIR"])
    for attempt in ("first", "again"):
        log = tmp_path / f"up-{attempt}.log"
        up = start_up(env, log)
        try:
            wait_banner(up, log, run_dir, f"{attempt} banner")
            up.send_signal(signal.SIGINT)
            assert up.wait(60) == 0
            assert leafwire_pids(run_dir) == []
        finally:
            stop_leftovers(up, env)
        assert re.findall(r"stopped (\S+) \(", log.read_text()) == ["gateway", "services", "nats-edge", "nats-hub"]
        assert "leafwire stopped" in log.read_text()


def test_policy_reaches_the_edge_after_a_restart(tmp_path: Path) -> None:
    """After `down` and a second `up` on the same run folder (the hub recovering its JetStream), a policy
    pushed at once still reaches the edge's router: the edge starts after the hub, so its config mirror
    does not back off."""
    env = stack_env(tmp_path)
    log = tmp_path / "up.log"
    for attempt in (1, 2):
        log.write_text("")
        up = start_up(env, log)
        try:
            wait_banner(up, log, Path(env["LW_RUN_DIR"]))
            if attempt == 2:
                # the hub's JetStream, recovering its store, may take more than the default 5 s on a busy machine
                pushed = push_policy(tmp_path, f"nats://127.0.0.1:{env['LW_NATS_PORT']}", "--wait", "30")
                assert pushed.returncode == 0, pushed.stderr
                assert '"outcome": "applied"' in pushed.stdout
        finally:
            subprocess.run([sys.executable, "-m", "deploy.stack", "down"], env=env, cwd=ROOT, capture_output=True,
                           timeout=120)
            stop_leftovers(up, env)


def test_a_service_refusing_its_configuration_stops_up_at_once(tmp_path: Path) -> None:
    """A malformed providers file: the cloud-adapter says what and where in one error line and exits 78, which
    supervisord does not restart (no crash loop filling its log); `up` stops waiting, quotes that line, and
    stops the stack, leaving nothing behind."""
    env = stack_env(tmp_path)
    bad = tmp_path / "providers.yaml"
    bad.write_text("providers:\n  - name: openai\n    kind: openai-compatible\n   bad_indent: [1, 2\n")
    env["LW_PROVIDERS_FILE"] = str(bad)
    run_dir = Path(env["LW_RUN_DIR"])
    log = tmp_path / "up.log"
    up = start_up(env, log)
    try:
        assert up.wait(BANNER_WAIT_S) == 1, log.read_text()
        said = log.read_text()
        assert f"cloud-adapter stopped for good: cannot start: bad configuration (starting again will not help): " \
               f"providers file {bad} is invalid" in said, said
        assert "line 4" in said
        assert "leafwire stopped" in said
        assert leafwire_pids(run_dir) == []
        adapter_log = (run_dir / "logs" / "cloud-adapter.log").read_text()
        assert adapter_log.count("cannot start: bad configuration") == 1, adapter_log  # started once, not again
        assert "Traceback" not in adapter_log
    finally:
        stop_leftovers(up, env)


def test_down_with_stale_pid_files(tmp_path: Path) -> None:
    """`down` over pid files of dead processes clears them and says leafwire is not running."""
    env = stack_env(tmp_path)
    run_dir = Path(env["LW_RUN_DIR"])
    stale_pid_files(run_dir)
    down = subprocess.run([sys.executable, "-m", "deploy.stack", "down"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert "not running" in down.stdout
    assert not (run_dir / "supervisord.pid").exists()


def test_up_refuses_ports_asked_for_twice(tmp_path: Path) -> None:
    """A gateway port inside NATS's block is refused before anything starts, naming the port: nothing would bind
    it twice, and the launcher would wait for a service that cannot come up."""
    env = stack_env(tmp_path)
    env["LW_GATEWAY_PORT"] = str(int(env["LW_NATS_PORT"]) + 2000)  # the first hub node's cluster port
    up = subprocess.run([sys.executable, "-m", "deploy.stack", "up"], env=env, cwd=ROOT, capture_output=True,
                        text=True, timeout=60)
    assert up.returncode == 1
    assert f"ports asked for twice: [{int(env['LW_NATS_PORT']) + 2000}]" in up.stdout
    assert leafwire_pids(Path(env["LW_RUN_DIR"])) == []


HALF = (topology.HIGH - topology.LOW + 1) // 2


@pytest.mark.parametrize(("slice_", "expected"), [
    ("", (topology.LOW, topology.HIGH)),
    ("0/2", (topology.LOW, topology.LOW + HALF - 1)),
    ("1/2", (topology.LOW + HALF, topology.LOW + 2 * HALF - 1)),
    ("2/2", (topology.LOW, topology.HIGH)),  # not a slice: the whole range
    ("x", (topology.LOW, topology.HIGH)),
])
def test_parallel_pickers_take_their_own_slice_of_ports(slice_: str, expected: tuple[int, int],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The suite's workers each pick ports in a slice of their own (LW_PORT_SLICE, set by tests/conftest.py):
    one's service starting could otherwise meet a port another picked a moment before (seen in CI as a
    service's 'address already in use')."""
    monkeypatch.setenv(topology.PORT_SLICE, slice_)
    assert topology.port_range() == expected
    low, high = expected
    assert all(low <= topology.free_port() <= high for _ in range(20))
