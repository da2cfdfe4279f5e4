"""Test helpers: real nats-server processes and real service processes, each stopped by its PID.

Waiting is done by polling an observable condition (a health endpoint, a metric) with a deadline,
never by sleeping a fixed time and hoping.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import nats
import yaml

from deploy import topology
from deploy.topology import Node, free_port

ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")
FIXTURE_MODEL = ROOT / "tests" / "fixtures" / "tiny-llama"
FIXTURE_EMBEDDER = ROOT / "tests" / "fixtures" / "tiny-bert"
REAL_MODELS = Path(os.environ.get("LW_MODELS_DIR", Path.home() / ".cache" / "leafwire" / "models"))


def eventually(probe: Callable[[], T | None], timeout: float = 20.0, what: str = "condition") -> T:
    """Poll ``probe`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.02)


async def eventually_async(probe: Callable[[], Awaitable[T]], done: Callable[[T], bool], within_s: float = 20.0,
                           what: str = "condition") -> T:
    """Await ``probe`` until ``done`` says yes of its value; fail after ``within_s`` seconds."""
    deadline = time.monotonic() + within_s
    for _ in itertools.count():
        value = await probe()
        if done(value):
            return value
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out after {within_s:g} s waiting for {what}")


def tag() -> str:
    """Words no other test sends (the exact cache outlives a test)."""
    return f"qa {uuid.uuid4().hex[:8]}"


def kv_json(nats_url: str, bucket: str, key: str) -> Any:
    """The JSON value under ``key`` in the KV ``bucket`` (``null`` for an empty value), or ``None`` when it is
    absent or cannot be read (for ``eventually``)."""

    async def get() -> Any:
        nc = await nats.connect(nats_url)
        try:
            kv = await nc.jetstream().key_value(bucket)
            return json.loads((await kv.get(key)).value or b"null")
        finally:
            await nc.drain()

    try:
        return asyncio.run(get())
    except Exception:
        return None


def usage_event(nats_url: str, request_id: str, site: str = "hub", wait: float = 1.0) -> Any:
    """The usage event of a request in ``site``'s USAGE stream, or ``None`` when none came within ``wait``
    seconds of the last one (for ``eventually``)."""

    async def find() -> Any:
        nc = await nats.connect(nats_url)
        try:
            sub = await nc.jetstream().subscribe(f"lw.v1.{site}.usage.events", ordered_consumer=True)
            try:
                while True:
                    event = json.loads((await sub.next_msg(timeout=wait)).data)
                    if event["request_id"] == request_id:
                        return event
            finally:
                await sub.unsubscribe()
        finally:
            await nc.drain()

    try:
        return asyncio.run(find())
    except Exception:
        return None


def http_status(url: str) -> int:
    """Status of a GET, 0 when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return 0


def http_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return str(resp.read().decode())


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one Prometheus sample in exposition ``text`` (0 when absent)."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@dataclass
class NatsServer:
    """One nats-server started from a rendered config, stopped by PID."""

    node: Node
    proc: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return self.node.url

    def stop(self) -> None:
        stop_process(self.proc)

    def restart(self, leaf: bool = False) -> None:
        """Start the same server again (same ports, same data) and wait until it is healthy (and, with
        ``leaf``, joined to the hub)."""
        self.stop()
        self.proc = subprocess.Popen(self.node.command(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        topology.wait_healthy([self.node], procs=[self.proc], leaf=[self.node] if leaf else None)


def start_single(tmp: Path, domain: str | None = None) -> NatsServer:
    """A single JetStream server on free ports (its own domain when given)."""
    conf = tmp / "nats.conf"
    client, monitor = free_port(), free_port()
    js = f'jetstream {{ store_dir: "{tmp / "js"}"' + (f", domain: {domain}" if domain else "") + " }"
    conf.write_text(f"listen: 127.0.0.1:{client}\nhttp: 127.0.0.1:{monitor}\n{js}\nmax_payload: 8MB\n")
    node = Node("single", conf, "127.0.0.1", client, monitor)
    server = NatsServer(node, subprocess.Popen(node.command(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    with stopped_on_error([server]):
        topology.wait_healthy([node], procs=[server.proc])
    return server


def start_hub_and_edge(tmp: Path, site: str = "edge1", hub_nodes: int = 1) -> tuple[list[NatsServer], NatsServer]:
    """A hub cluster (domain ``hub``) and one edge site joined to it as a leaf node."""
    ports = [[free_port() for _ in range(hub_nodes)] for _ in range(4)]
    hub_nodes_ = topology.render_hub(tmp, "127.0.0.1", *ports)
    edge_node = topology.render_edge(tmp, site, "127.0.0.1", free_port(), free_port(),
                                     [f"nats://127.0.0.1:{n.leaf_port}" for n in hub_nodes_])
    hub = [NatsServer(n, subprocess.Popen(n.command(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
           for n in hub_nodes_]
    edge = NatsServer(edge_node, subprocess.Popen(edge_node.command(), stdout=subprocess.DEVNULL,
                                                  stderr=subprocess.DEVNULL))
    with stopped_on_error([*hub, edge]):
        topology.wait_healthy([*hub_nodes_, edge_node], procs=[s.proc for s in [*hub, edge]], leaf=[edge_node])
    return hub, edge


class LinkProxy:
    """A TCP relay in front of a port: ``cut()`` drops every connection and refuses new ones (an uplink
    going down, both servers still running) until ``restore()``."""

    def __init__(self, target_port: int, host: str = "127.0.0.1") -> None:
        self.host, self.target, self.port = host, target_port, free_port(host)
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self.restore()

    def restore(self) -> None:
        """Accept connections again."""
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host, self.port))
        listener.listen(16)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        """Drop every relayed connection and stop listening."""
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread
            self._listener.close()
            self._listener = None
        with self._lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
                upstream = socket.create_connection((self.host, self.target), timeout=2)
            except OSError:
                if self._listener is not listener:
                    return
                continue
            upstream.settimeout(None)
            with self._lock:
                self._conns += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for conn in (src, dst):
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


@dataclass
class CuttableSite:
    """A one-node hub and an edge site whose leaf connection runs through a ``LinkProxy``."""

    hub: NatsServer
    edge: NatsServer
    link: LinkProxy

    def stop(self) -> None:
        self.link.cut()
        for server in (self.edge, self.hub):
            server.stop()

    def __enter__(self) -> CuttableSite:
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()


def start_cuttable_site(tmp: Path, site: str) -> CuttableSite:
    """A hub (domain ``hub``) and edge ``site`` joined as a leaf node through a relay the test can cut."""
    hub_node = topology.render_hub(tmp, "127.0.0.1", [free_port()], [free_port()], [free_port()], [free_port()])[0]
    assert hub_node.leaf_port is not None
    link = LinkProxy(hub_node.leaf_port)
    edge_node = topology.render_edge(tmp, site, "127.0.0.1", free_port(), free_port(),
                                     [f"nats://127.0.0.1:{link.port}"])
    servers = [NatsServer(n, subprocess.Popen(n.command(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
               for n in (hub_node, edge_node)]
    with stopped_on_error(servers):
        topology.wait_healthy([hub_node, edge_node], procs=[s.proc for s in servers], leaf=[edge_node])
    return CuttableSite(servers[0], servers[1], link)


@contextlib.contextmanager
def stopped_on_error(servers: list[NatsServer]) -> Iterator[None]:
    """Stop servers just started if what follows fails (a fixture that raises never gets to clean up)."""
    try:
        yield
    except BaseException:
        for server in servers:
            server.stop()
        raise


def stop_process(proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """SIGTERM, wait, then SIGKILL the process (and its process group, for decoder children)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def write_registry(path: Path, name: str = "tiny", model: Path = FIXTURE_MODEL, *,
                   batching: dict[str, float] | None = None, embedder: str | None = None,
                   embedder_path: Path = FIXTURE_EMBEDDER, embedder_context: int = 64,
                   embedder_batching: dict[str, float] | None = None, **defaults: object) -> Path:
    """A model registry file with one chat model (greedy by default, so answers are deterministic) and,
    when ``embedder`` names it, one embeddings model."""
    chat: dict[str, object] = {"name": name, "path": str(model),
                               "defaults": {"temperature": 0, "max_tokens": 16, **defaults}}
    if batching:
        chat["batching"] = batching
    models = [chat]
    if embedder:
        embed: dict[str, object] = {"name": embedder, "kind": "embeddings", "path": str(embedder_path),
                                    "context_length": embedder_context}
        if embedder_batching:
            embed["batching"] = embedder_batching
        models.append(embed)
    path.write_text(yaml.safe_dump({"models": models}, sort_keys=False))
    return path


@contextlib.asynccontextmanager
async def connected(url: str) -> AsyncIterator[nats.NATS]:
    """A nats-py client of the server at ``url``, drained at the end."""
    nc = await nats.connect(url)
    try:
        yield nc
    finally:
        await nc.drain()


async def last_usage(url: str, site: str) -> dict[str, object]:
    """The newest usage event of ``site`` in the ``USAGE`` stream."""
    async with connected(url) as nc:
        msg = await nc.jetstream().get_last_msg("USAGE", f"lw.v1.{site}.usage.events")
    return dict(json.loads(msg.data))


async def usage_events(url: str) -> list[tuple[str, dict[str, Any]]]:
    """``(subject, event)`` of every message in the ``USAGE`` stream of the server at ``url``, in stream order."""
    async with connected(url) as nc:
        js = nc.jetstream()
        state = (await js.stream_info("USAGE")).state
        found = []
        for seq in range(state.first_seq, state.last_seq + 1) if state.messages else ():
            msg = await js.get_msg("USAGE", seq)
            found.append((msg.subject, dict(json.loads(msg.data or b"{}"))))
    return found


def leafwire(*args: str) -> subprocess.CompletedProcess[str]:
    """The ``leafwire`` command (the package's console script), as a user runs it."""
    return subprocess.run([sys.executable, "-m", "shared.cli", *args], capture_output=True, text=True, timeout=60,
                          cwd=ROOT)


def model_name(registry: Path) -> str:
    """The first model name of a registry file written by ``write_registry``."""
    return registry.read_text().split("name: ", 1)[1].split()[0]


def write_policy(path: Path, text: str) -> Path:
    """A routing policy file."""
    path.write_text(text)
    return path


def local_and_cloud_site(nats_url: str, site: str, tmp: Path, providers: Path, policy: str,
                         key_env: dict[str, str]) -> tuple[Service, Service, Service, Service]:
    """A site's local-inference (the tiny fixture model), cloud-adapter (``providers``, its keys in
    ``key_env``, short retry waits, a breaker that never opens), router (uplink up, ``policy``) and gateway,
    not started."""
    env = {"LW_NATS_URL": nats_url, "LW_SITE": site}
    worker = Service("local_inference", {**env, "LW_MODELS_FILE": str(write_registry(tmp / "models.yaml"))})
    adapter = Service("cloud_adapter", {**env, "LW_PROVIDERS_FILE": str(providers), **key_env,
                                        "LW_CLOUD_BACKOFF_BASE_S": "0.01", "LW_CLOUD_BACKOFF_CAP_S": "0.02",
                                        "LW_CLOUD_BREAKER_FAILURES": "1000"})
    router = Service("router", {**env, "LW_ROUTER_UPLINK": "up", "LW_ROUTER_CLOUD_ADMISSION_TIMEOUT_S": "1.5",
                                "LW_ROUTER_POLICY_FILE": str(write_policy(tmp / "policy.yaml", policy))})
    return worker, adapter, router, Service("gateway", env)


def cloud_router_env(tmp: Path, policy_text: str = "last_resort: none\n") -> dict[str, str]:
    """Router settings for tests of the cloud path alone: the uplink counts as up, and a refused cloud
    model is not retried on a local model (each test sees the adapter's own answer); ``policy_text`` may add
    rules."""
    policy = write_policy(tmp / "cloud-only-policy.yaml", policy_text)
    return {"LW_ROUTER_UPLINK": "up", "LW_ROUTER_POLICY_FILE": str(policy)}


@dataclass
class Service:
    """A leafwire service running as its own process (``python -m services.<module>``)."""

    module: str
    env: dict[str, str]
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Service:
        port_var = "LW_GATEWAY_PORT" if self.module == "gateway" else "LW_OPS_PORT"
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "LW_LOG_LEVEL": "info", port_var: str(self.port),
               **self.env}
        fd, log = tempfile.mkstemp(prefix=f"lw-{self.module}-", suffix=".log")
        self.log_path = Path(log)
        self.proc = subprocess.Popen([sys.executable, "-m", f"services.{self.module}"], env=env, cwd=ROOT,
                                     stdout=fd, stderr=subprocess.STDOUT, start_new_session=True)
        os.close(fd)
        return self

    def readyz(self) -> tuple[int, dict[str, Any]]:
        """The status and JSON body of ``/readyz`` (``(0, {})`` when nothing answers)."""
        try:
            with urllib.request.urlopen(f"{self.base}/readyz", timeout=5) as resp:
                return int(resp.status), dict(json.loads(resp.read()))
        except urllib.error.HTTPError as err:
            return int(err.code), dict(json.loads(err.read()))
        except (OSError, ValueError):
            return 0, {}

    def wait_ready(self, timeout: float = 60.0) -> Service:
        """Wait until this service, and not another process on its port, says it is ready."""
        name = self.module.replace("_", "-")

        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.module} exited with {self.proc.returncode}:\n{self.log()}")
            status, body = self.readyz()
            if status and body.get("service") != name:
                raise AssertionError(f"port {self.port} of {self.module} is served by {body.get('service')!r}")
            return status == 200

        eventually(ready, timeout, f"{self.module} ready")
        return self

    def metrics(self) -> str:
        return http_text(f"{self.base}/metrics")

    def log(self) -> str:
        return self.log_path.read_text()[-6000:] if self.log_path else ""

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)

    def kill(self) -> None:
        """SIGKILL the service and its decoder children at once (a crash, not a shutdown)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)


@contextlib.contextmanager
def running(*services: Service, timeout: float = 60.0) -> Iterator[tuple[Service, ...]]:
    """Start services, wait for each to be ready, stop them all (in reverse) on exit. They start together (a
    service's start-up is mostly imports, so this saves seconds a stack) and are waited for in order."""
    started: list[Service] = []
    try:
        for s in services:
            started.append(s.start())
        for s in services:
            s.wait_ready(timeout)
        yield services
    finally:
        for s in reversed(started):
            s.stop()


def route_site(route_header: str) -> str:
    """The ``served_by`` site in an ``x-leafwire-served-by`` header (``site/worker``)."""
    m = re.match(r"([a-z0-9_-]+)/", route_header)
    return m.group(1) if m else ""
