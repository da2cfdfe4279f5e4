"""The local stack: a 3-node hub cluster, one edge site as a leaf node, and every service, on one machine.

    python -m deploy.stack up       # what `just up` runs: start, wait until healthy, print where to go
    python -m deploy.stack down     # stop everything `up` started (from another terminal)
    python -m deploy.stack status

Processes are run by supervisor in four groups (started by priority, NATS first; restarted on crash; a log
file per process under ``.run/logs``). This launcher renders the configuration, waits for health, prints
the banner, and stops the stack group by group, each group at once (``deploy/shutdown.py``): on Ctrl-C here,
or from ``down`` in another terminal. Everything it writes lives in the run folder (``$LW_RUN_DIR``,
default ``.run``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import signal
import string
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import xmlrpc.client
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from deploy import shutdown, topology
from deploy.topology import Node
from shared import paths
from shared.columns import aligned

ROOT = Path(__file__).resolve().parent.parent
SUPERVISOR_STATES = {"STOPPED", "STARTING", "RUNNING", "BACKOFF", "STOPPING", "EXITED", "FATAL", "UNKNOWN"}
SERVICES = ["router", "local_inference", "batcher", "cloud_adapter", "retrieval"]
# NATS ports, as offsets from LW_NATS_PORT (the edge's client port, 4222): the hub's client ports follow the
# edge's (4223-4225); cluster 6222+, leaf 7422+, monitoring 8222+ (the edge's first).
HUB_CLIENT, HUB_CLUSTER, HUB_LEAF, HUB_MONITOR = (1, 2, 3), (2000, 2001, 2002), (3200, 3201, 3202), (4001, 4002, 4003)
EDGE_MONITOR = 4000
NATS_OFFSETS = (0, *HUB_CLIENT, *HUB_CLUSTER, *HUB_LEAF, EDGE_MONITOR, *HUB_MONITOR)
EXIT_WAIT_S = 10.0  # for supervisord to exit once its programs have stopped
SIGTERM_WAIT_S = 4 * (shutdown.STOP_WAIT_S + 10)  # supervisord stopping its groups itself, one after another


def say(msg: str) -> None:
    print(msg, flush=True)


@dataclass
class Stack:
    """Where everything listens and lives, from the environment (defaults in parentheses)."""

    host: str = field(default_factory=lambda: os.environ.get("LW_HOST", "127.0.0.1"))
    site: str = field(default_factory=lambda: os.environ.get("LW_SITE", "edge1"))
    nats_port: int = field(default_factory=lambda: int(os.environ.get("LW_NATS_PORT", "4222")))
    gateway_port: int = field(default_factory=lambda: int(os.environ.get("LW_GATEWAY_PORT", "8080")))
    ops_base: int = field(default_factory=lambda: int(os.environ.get("LW_OPS_PORT_BASE", "9310")))
    run_dir: Path = field(default_factory=lambda: Path(os.environ.get("LW_RUN_DIR", ROOT / ".run")).resolve())
    models_file: Path = field(default_factory=lambda: Path(os.environ.get(
        "LW_MODELS_FILE", ROOT / "deploy" / "models.yaml")).resolve())
    providers_file: Path = field(default_factory=lambda: Path(os.environ.get(
        "LW_PROVIDERS_FILE", ROOT / "deploy" / "providers.yaml")).resolve())
    chat_model: str = field(default_factory=lambda: os.environ.get("LW_CHAT_MODEL", "smollm2-135m-instruct"))
    models_dir: Path = field(default_factory=paths.models_dir)

    def hub(self) -> list[Node]:
        p = self.nats_port
        return topology.render_hub(self.run_dir, self.host, client=[p + d for d in HUB_CLIENT],
                                   cluster=[p + d for d in HUB_CLUSTER], leaf=[p + d for d in HUB_LEAF],
                                   monitor=[p + d for d in HUB_MONITOR])

    def edge(self, hub: list[Node]) -> Node:
        return topology.render_edge(self.run_dir, self.site, self.host, self.nats_port, self.nats_port + EDGE_MONITOR,
                                    [f"nats://{self.host}:{n.leaf_port}" for n in hub])

    def ops_port(self, service: str) -> int:
        return self.ops_base + 1 + SERVICES.index(service)

    @property
    def pidfile(self) -> Path:
        return self.run_dir / "supervisord.pid"

    @property
    def launcher_pidfile(self) -> Path:
        return self.run_dir / "launcher.pid"

    @property
    def gateway(self) -> str:
        return f"http://{self.host}:{self.gateway_port}"


def _alive(pidfile: Path, expect: str) -> int | None:
    """The pid in ``pidfile`` if that process runs and its command line mentions ``expect``."""
    try:
        pid = int(pidfile.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except (OSError, ValueError):
        return None
    return pid if expect in cmdline else None


def _clear_stale(stack: Stack) -> None:
    for pidfile, expect in ((stack.pidfile, "supervisord"), (stack.launcher_pidfile, "deploy.stack")):
        if pidfile.exists() and _alive(pidfile, expect) is None:
            pidfile.unlink()
    sock = stack.run_dir / "supervisor.sock"
    if sock.exists() and not stack.pidfile.exists():
        sock.unlink()


def _program(name: str, command: str, priority: int, env: dict[str, str], log_dir: Path,
             autostart: bool = True) -> str:
    environment = ",".join(f'{k}="{v}"' for k, v in env.items())
    # SIGTERM to the program only: local-inference stops its decoder process itself once the answers in flight
    # are done (a SIGTERM to the whole group killed it mid-answer). SIGKILL goes to the group: nothing is left.
    # stopwaitsecs is supervisord's own SIGKILL, a backstop behind deploy/shutdown.py's (which says so).
    return (f"[program:{name}]\ncommand={command}\ndirectory={ROOT}\npriority={priority}\n"
            f"environment={environment}\nautostart={str(autostart).lower()}\n"
            # restarted whenever it exits, except with EX_CONFIG: its configuration is wrong, and starting it
            # again would only fill its log with the same refusal (`up` says so and stops)
            f"autorestart=unexpected\nexitcodes={shutdown.EX_CONFIG}\nstartsecs=1\nstartretries=5\n"
            f"stopsignal=TERM\nstopwaitsecs={shutdown.STOP_WAIT_S + 10:g}\nstopasgroup=false\nkillasgroup=true\n"
            f"redirect_stderr=true\nstdout_logfile={log_dir / name}.log\nstdout_logfile_maxbytes=20MB\n"
            f"stdout_logfile_backups=2\n\n")


def group(name: str, priority: int, programs: dict[str, tuple[str, dict[str, str]]], log_dir: Path,
          autostart: bool = True) -> str:
    """A supervisord group of programs (``{name: (command, environment)}``), which start and stop together."""
    text = "".join(_program(n, command, priority, env, log_dir, autostart) for n, (command, env) in programs.items())
    return text + f"[group:{name}]\nprograms={','.join(programs)}\npriority={priority}\n\n"


def supervisord_conf(run_dir: Path) -> str:
    """supervisord's own sections, with a fresh password on its control socket; the groups follow."""
    return string.Template((ROOT / "deploy" / "supervisord.conf.tmpl").read_text()).substitute(
        run_dir=run_dir, password=secrets.token_urlsafe(16), user_line="user=root" if os.geteuid() == 0 else "")


def render(stack: Stack, hub: list[Node], edge: Node) -> Path:
    """Write supervisord.conf: groups nats-hub (priority 10), nats-edge (20), services (100), gateway (200).

    Started lowest priority first, stopped highest first: the gateway before the services, so that the answers
    it has in flight finish; NATS after every client of it. The edge's server is started by the launcher once
    the hub is healthy (``start_edge``), not by supervisord: its config bucket mirrors the hub's, and a mirror
    that meets a hub still recovering its JetStream backs off for tens of seconds before it syncs.
    """
    logs = stack.run_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    base_env = {
        "LW_SITE": stack.site, "LW_NATS_URL": edge.url, "LW_MODELS_DIR": str(stack.models_dir),
        "LW_MODELS_FILE": str(stack.models_file),
        "LW_PROVIDERS_FILE": str(stack.providers_file),
        "LW_NATS_CONNECT_TIMEOUT_S": "60", "PYTHONUNBUFFERED": "1",
    }
    python = sys.executable
    services = {s.replace("_", "-"): (f"{python} -m services.{s}", {**base_env, "LW_OPS_PORT": str(stack.ops_port(s))})
                for s in SERVICES}
    gw_env = {**base_env, "LW_GATEWAY_HOST": stack.host, "LW_GATEWAY_PORT": str(stack.gateway_port)}
    text = (supervisord_conf(stack.run_dir)
            + group("nats-hub", 10, {n.name: (" ".join(n.command()), {}) for n in hub}, logs)
            + group("nats-edge", 20, {edge.name: (" ".join(edge.command()), {})}, logs, autostart=False)
            + group("services", 100, services, logs)
            + group("gateway", 200, {"gateway": (f"{python} -m services.gateway", gw_env)}, logs))
    conf = stack.run_dir / "supervisord.conf"
    conf.write_text(text)
    return conf


def _get_json(url: str) -> tuple[int, dict[str, object]]:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:  # 503 from /readyz says why in its body
        try:
            return exc.code, dict(json.loads(exc.read()))
        except (OSError, ValueError, TypeError):
            return exc.code, {}
    except (OSError, ValueError):
        return 0, {}


class CannotStart(Exception):
    """A program of the stack stopped for good while the stack was starting (a wrong configuration)."""


def wait_until(what: str, check: Callable[[], bool], supervisor: subprocess.Popen[bytes], timeout: float,
               started: float, broken: Callable[[], str | None] = lambda: None) -> None:
    """Poll ``check`` until it holds; fail when supervisord exits, ``broken`` says why the stack cannot start,
    or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while not check():
        if supervisor.poll() is not None:
            raise SystemExit(f"supervisord exited while waiting for {what}")
        if (why := broken()) is not None:
            raise CannotStart(why)
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.25)  # nats-server logs a warning for every failed /healthz: do not flood it
    say(f"  ok  {what:<44} {time.monotonic() - started:5.1f} s")


def wait_healthy(stack: Stack, hub: list[Node], edge: Node, supervisor: subprocess.Popen[bytes]) -> None:
    """Wait for NATS, then each service, then a model behind the gateway; stop waiting as soon as a program
    has stopped for good."""
    t0 = time.monotonic()
    broken = _given_up(stack)
    wait_until("hub cluster (3 nodes, JetStream domain hub)",
               lambda: all((topology.healthz(n) or {}).get("status") == "ok" for n in hub), supervisor, 60, t0,
               broken)
    start_edge(stack, edge)
    wait_until(f"edge site '{stack.site}' joined as a leaf node",
               lambda: (topology.healthz(edge) or {}).get("status") == "ok" and topology.leafnode_connected(edge),
               supervisor, 60, t0, broken)
    for service in SERVICES:
        wait_until(f"{service.replace('_', '-')} ready",
                   _ready(f"http://{stack.host}:{stack.ops_port(service)}/readyz"), supervisor, 180, t0, broken)
    wait_until("gateway ready", _ready(f"{stack.gateway}/readyz"), supervisor, 60, t0, broken)
    wait_until(f"model {stack.chat_model} served", lambda: stack.chat_model in _model_ids(stack), supervisor, 60, t0,
               broken)


def _given_up(stack: Stack) -> Callable[[], str | None]:
    """What says why the stack cannot start: the first program supervisord has given up on, with the last
    error its log holds (``None`` while none has)."""
    control = shutdown.RpcControl(stack.run_dir / "supervisord.conf")

    def broken() -> str | None:
        try:
            names = control.given_up()
        except (OSError, xmlrpc.client.Error):  # supervisord not answering yet: nothing known to be broken
            return None
        if not names:
            return None
        log = stack.run_dir / "logs" / f"{names[0]}.log"
        return f"{names[0]} stopped for good: {last_error(log)} (its log: {log})"

    return broken


def last_error(log: Path) -> str:
    """The last error a service logged (its ``event`` and ``error``), else the log's last line."""
    try:
        with log.open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 65_536))
            lines = [line for line in f.read().decode(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "no log"
    for line in reversed(lines):
        with contextlib.suppress(ValueError, AttributeError):
            entry = json.loads(line)
            if entry.get("level") == "error":
                return f"{entry.get('event')}: {entry.get('error', '')}".rstrip(": ")
    return lines[-1] if lines else "nothing logged"


def start_edge(stack: Stack, edge: Node) -> None:
    """Have supervisord start the edge's server (it does not on its own: see ``render``)."""
    ctl = subprocess.run(_supervisorctl(stack, "start", f"nats-edge:{edge.name}"), capture_output=True, text=True,
                         timeout=30)
    if ctl.returncode != 0:
        raise SystemExit(f"could not start {edge.name}: {ctl.stdout.strip()} {ctl.stderr.strip()}")


def _ready(url: str) -> Callable[[], bool]:
    return lambda: _get_json(url)[0] == 200


def _model_ids(stack: Stack) -> list[str]:
    data = _get_json(f"{stack.gateway}/v1/models")[1].get("data")
    return [str(m.get("id")) for m in data if isinstance(m, dict)] if isinstance(data, list) else []


def banner(stack: Stack, edge: Node) -> str:
    """What to do now that the stack is up."""
    body = json.dumps({"model": stack.chat_model,
                       "messages": [{"role": "user", "content": "What is the capital of France?"}]})
    return f"""
leafwire is up: hub cluster (3 nodes) + edge site '{stack.site}', all services, model {stack.chat_model}

  OpenAI-compatible API  {stack.gateway}/v1      (no API key needed in development)
  NATS at the edge       {edge.url}   requests on lw.v1.{stack.site}.chat  (examples/nats_chat.py)
  Routing policy         written at the hub, mirrored to the edge: uv run leafwire policy push deploy/policy.yaml
                         --nats {edge.url} --site {stack.site}   (docs/routing.md)
  Usage and cost         uv run leafwire usage --nats {edge.url}   (--domain hub: every site's; docs/cloud.md)
                         uv run leafwire budgets --nats {edge.url}   (spending against each budget, all sites)
  Logs                   {stack.run_dir / 'logs'}/      Metrics: {stack.gateway}/metrics
  Stop                   Ctrl-C here, or `uv run just down` from another terminal

Try it:
  curl {stack.gateway}/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{body}'
"""


def up(stack: Stack) -> int:
    """Start the stack in the foreground; Ctrl-C (or `down`) stops it in order."""
    # Imported here, not at the top: pydantic and the registry take ~0.6 s to import, which `down` does not need.
    from services.local_inference import registry

    stack.run_dir.mkdir(parents=True, exist_ok=True)
    _clear_stale(stack)
    if (pid := _alive(stack.pidfile, "supervisord")) is not None:
        say(f"leafwire is already running (supervisord pid {pid}); stop it with `uv run just down`.")
        return 1
    os.environ.setdefault("LW_MODELS_DIR", str(stack.models_dir))
    try:
        registry.load(stack.models_file)
    except registry.RegistryError as exc:
        say(str(exc))
        return 1
    hub = stack.hub()
    edge = stack.edge(hub)
    ports = [*topology.ports_of([*hub, edge]), stack.gateway_port, *(stack.ops_port(s) for s in SERVICES)]
    twice = sorted({p for p in ports if ports.count(p) > 1})
    if twice:
        say(f"ports asked for twice: {twice}. LW_NATS_PORT (now {stack.nats_port}) takes that port plus "
            f"{', '.join(f'+{d}' for d in NATS_OFFSETS[1:])}; LW_OPS_PORT_BASE (now {stack.ops_base}) takes +1 "
            f"to +{len(SERVICES)}; LW_GATEWAY_PORT (now {stack.gateway_port}) one more: move one of them.")
        return 1
    busy = [p for p in ports if topology.port_in_use(stack.host, p)]
    if busy:
        say(f"ports already in use: {busy}. Move leafwire with LW_NATS_PORT (now {stack.nats_port}), "
            f"LW_GATEWAY_PORT (now {stack.gateway_port}) or LW_OPS_PORT_BASE (now {stack.ops_base}).")
        return 1
    conf = render(stack, hub, edge)
    stack.launcher_pidfile.write_text(str(os.getpid()))
    say(f"starting leafwire (run folder {stack.run_dir})")
    supervisor = subprocess.Popen([sys.executable, "-m", "supervisor.supervisord", "-n", "-c", str(conf)],
                                  start_new_session=True, cwd=ROOT)
    stopper: threading.Thread | None = None

    def stop(*_: object) -> None:
        # In a thread, not in this handler: a stop takes as long as the groups take to drain, while the main
        # thread goes on waiting for supervisord to exit.
        nonlocal stopper
        if stopper is None:
            say("\nstopping leafwire (gateway, then services, then NATS)...")
            stopper = threading.Thread(target=stop_stack, args=(stack, supervisor.pid), name="stop", daemon=True)
            stopper.start()

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    failed = False
    try:
        wait_healthy(stack, hub, edge, supervisor)
        say(banner(stack, edge))
    except TimeoutError as exc:
        say(f"  !!  timed out waiting for {exc}; the logs in {stack.run_dir / 'logs'} say why. Stopping.")
        failed = True
        stop()
    except CannotStart as exc:
        say(f"  !!  {exc}. Stopping.")
        failed = True
        stop()
    except SystemExit as exc:
        say(f"  !!  {exc}")
    code = supervisor.wait()
    if stopper is not None:
        stopper.join(EXIT_WAIT_S)
    stack.launcher_pidfile.unlink(missing_ok=True)
    if code != 0:  # supervisord exits 0 only when asked to: from here, or by `down`
        say(f"supervisord exited with code {code}.")
        return 1
    say("leafwire stopped.")
    return 1 if failed else 0


def stop_stack(stack: Stack, supervisor: int) -> bool:
    """Stop every group in order, then supervisord. False when that failed and supervisord got a SIGTERM instead."""
    try:
        shutdown.stop_in_order(shutdown.RpcControl(stack.run_dir / "supervisord.conf"), say)
        return True
    except (OSError, KeyError, xmlrpc.client.Error, shutdown.StopTimeout) as exc:
        say(f"  !!  could not stop the groups over supervisord's socket ({type(exc).__name__}: {exc}); "
            f"SIGTERM to supervisord, which stops them itself (slower: up to a second a group)")
    with contextlib.suppress(ProcessLookupError):
        os.kill(supervisor, signal.SIGTERM)
    return False


def down(stack: Stack) -> int:
    """Stop a stack started by `up` in order, waiting (bounded) until every process is gone."""
    launcher = _alive(stack.launcher_pidfile, "deploy.stack")
    supervisor = _alive(stack.pidfile, "supervisord")
    if launcher is None and supervisor is None:
        _clear_stale(stack)
        say("leafwire is not running.")
        return 0
    say("stopping leafwire (gateway, then services, then NATS)...")
    wait_s = SIGTERM_WAIT_S
    if supervisor is not None:
        wait_s = EXIT_WAIT_S if stop_stack(stack, supervisor) else SIGTERM_WAIT_S
    elif launcher is not None:  # the launcher is starting supervisord: it stops what it started
        os.kill(launcher, signal.SIGTERM)
    if not _gone(stack, wait_s):
        _kill_left(stack, wait_s)
    _clear_stale(stack)
    say("leafwire stopped.")
    return 0


def _gone(stack: Stack, timeout: float) -> bool:
    """Wait until neither supervisord nor the launcher runs; False after ``timeout``."""
    deadline = time.monotonic() + timeout
    while _alive(stack.pidfile, "supervisord") or _alive(stack.launcher_pidfile, "deploy.stack"):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _kill_left(stack: Stack, waited: float) -> None:
    """SIGKILL, by PID, supervisord, whatever it still runs, and the launcher."""
    if (pid := _alive(stack.pidfile, "supervisord")) is not None:
        children = _children(pid)
        say(f"  !!  supervisord (pid {pid}) did not exit in {waited:g} s: killing it and its programs "
            f"(pids {children or 'none'})")
        for child in children:
            shutdown.kill_group(child)
        shutdown.kill_group(pid)
    if (pid := _alive(stack.launcher_pidfile, "deploy.stack")) is not None:
        say(f"  !!  the launcher (pid {pid}) did not exit: killing it")
        os.kill(pid, signal.SIGKILL)


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid``."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def status(stack: Stack) -> int:
    """Each process: supervisord's state, pid and uptime, and whether it is ready (its ``/readyz``, or a NATS
    node's ``/healthz``). Exit 0 when every process runs and is ready, 1 when not running, 3 otherwise."""
    if _alive(stack.pidfile, "supervisord") is None:
        say("leafwire is not running.")
        return 1
    ctl = subprocess.run(_supervisorctl(stack, "status"), capture_output=True, text=True, timeout=30)
    rows = [("process", "state", "pid", "uptime", "ready")]
    all_ok = True
    start_order = ["nats-hub", "nats-edge", "services", "gateway"]
    lines = [line.split(None, 2) for line in ctl.stdout.splitlines()]
    lines = sorted((p for p in lines if len(p) >= 2 and p[1] in SUPERVISOR_STATES),
                   key=lambda p: (start_order.index(g) if (g := p[0].partition(":")[0]) in start_order else 9, p[0]))
    for parts in lines:
        program, state = parts[0].rpartition(":")[2], parts[1]  # "group:program", or a lone group's program
        detail = parts[2] if len(parts) > 2 else ""
        pid = detail.split("pid ", 1)[1].split(",", 1)[0] if "pid " in detail else "-"
        uptime = detail.split("uptime ", 1)[1].strip() if "uptime " in detail else "-"
        ready = _readiness(stack, program) if state == "RUNNING" else "-"
        all_ok = all_ok and state == "RUNNING" and ready == "ok"
        rows.append((program, state, pid, uptime, ready))
    say(f"leafwire at {stack.gateway}/v1 (run folder {stack.run_dir})")
    for line in aligned(rows, indent="  "):
        say(line)
    return 0 if all_ok else 3


def _readiness(stack: Stack, program: str) -> str:
    """``ok``, or why a running program is not ready (what its ``/readyz`` lists; for NATS, ``/healthz``)."""
    monitors = {f"hub{i}": stack.nats_port + d for i, d in enumerate(HUB_MONITOR, start=1)}
    monitors[f"edge-{stack.site}"] = stack.nats_port + EDGE_MONITOR
    if program in monitors:
        code, body = _get_json(f"http://{stack.host}:{monitors[program]}/healthz")
        return "ok" if code == 200 and body.get("status") == "ok" else str(body.get("error") or "not healthy")
    service = program.replace("-", "_")
    url = (f"{stack.gateway}/readyz" if program == "gateway" else
           f"http://{stack.host}:{stack.ops_port(service)}/readyz" if service in SERVICES else None)
    if url is None:
        return "?"
    code, body = _get_json(url)
    if code == 200:
        return "ok"
    problems = body.get("problems")
    if isinstance(problems, dict) and problems:
        return "; ".join(f"{name}: {why}" for name, why in problems.items())
    return "not ready" if code else "not answering"


def _supervisorctl(stack: Stack, *args: str) -> list[str]:
    return [sys.executable, "-m", "supervisor.supervisorctl", "-c", str(stack.run_dir / "supervisord.conf"), *args]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["up", "down", "status"])
    args = parser.parse_args()
    stack = Stack()
    return {"up": up, "down": down, "status": status}[args.command](stack)


if __name__ == "__main__":
    sys.exit(main())
