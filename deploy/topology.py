"""Render the NATS topology (a hub cluster and edge sites as leaf nodes) from the templates in deploy/nats.

Used by ``deploy/stack.py`` (``just up``) and by the tests, so both run the same configuration.
Ports and data folders come from the caller; nothing here is fixed per machine.
"""

from __future__ import annotations

import json
import os
import random
import socket
import string
import subprocess
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from shared.natsbin import nats_server

TEMPLATES = Path(__file__).resolve().parent / "nats"


@dataclass(frozen=True)
class Node:
    """One nats-server: its config file and where it listens."""

    name: str
    conf: Path
    host: str
    client_port: int
    monitor_port: int
    leaf_port: int | None = None
    cluster_port: int | None = None

    @property
    def url(self) -> str:
        """Client URL."""
        return f"nats://{self.host}:{self.client_port}"

    @property
    def monitor(self) -> str:
        """Monitoring endpoint base URL."""
        return f"http://{self.host}:{self.monitor_port}"

    def command(self) -> list[str]:
        """The command line that runs this node."""
        return [str(nats_server()), "-c", str(self.conf)]


_HANDED_OUT: set[int] = set()
LOW, HIGH = 20000, 32767  # below Linux's ephemeral range (32768-60999): no outgoing connection takes these
PORT_SLICE = "LW_PORT_SLICE"  # "i/n": pick ports in the i-th of n equal slices of LOW..HIGH only


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free right now on ``host``, never the same twice in one process.

    Picked below the ephemeral range, where no outgoing connection can take it before its server binds it.
    Two ports asked for one after the other (a service's and the next one's) must differ even though
    neither is bound yet: a service that then could not bind would leave its port to the other, whose
    ``/readyz`` would answer for both.
    """
    port = _pick((0,), host)
    if port is not None:
        return port
    with socket.socket() as s:  # a crowded range: any port the kernel gives
        s.bind((host, 0))
        port = int(s.getsockname()[1])
    _HANDED_OUT.add(port)
    return port


def free_block(offsets: Sequence[int], host: str = "127.0.0.1") -> int:
    """A base port such that ``base + offset`` is free right now on ``host`` for every offset, none of them
    handed out before in this process (``free_port``'s rules, for a whole stack's ports at once)."""
    base = _pick(offsets, host)
    if base is None:
        raise OSError(f"no block of {len(offsets)} free ports in {port_range()} on {host}")
    return base


def port_range() -> tuple[int, int]:
    """LOW..HIGH, or the slice of it ``LW_PORT_SLICE`` names: processes picking ports side by side (the test
    suite's workers) each take their own, so that none picks a port another has picked and not bound yet."""
    spec = os.environ.get(PORT_SLICE, "")
    index, _, count = spec.partition("/")
    if not (index.isdigit() and count.isdigit() and int(index) < int(count)):
        return LOW, HIGH
    size = (HIGH - LOW + 1) // int(count)
    return LOW + int(index) * size, LOW + (int(index) + 1) * size - 1


def _pick(offsets: Sequence[int], host: str) -> int | None:
    low, high = port_range()
    for _ in range(1000):
        base = random.randint(low, high - max(offsets))
        ports = [base + d for d in offsets]
        if not any(p in _HANDED_OUT or port_in_use(host, p) for p in ports):
            _HANDED_OUT.update(ports)
            return base
    return None


def port_in_use(host: str, port: int) -> bool:
    """True when ``host:port`` cannot be bound now (a listener, or an outgoing connection's local port).

    SO_REUSEADDR as the servers set it: sockets of a just-stopped stack in TIME_WAIT do not count.
    """
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def ports_of(nodes: list[Node]) -> list[int]:
    """Every port the nodes will bind: client, monitoring, and the hub's cluster and leaf ports."""
    ports = []
    for n in nodes:
        ports += [n.client_port, n.monitor_port, *([n.leaf_port] if n.leaf_port else []),
                  *([n.cluster_port] if n.cluster_port else [])]
    return ports


def _render(template: str, dest: Path, **values: object) -> Path:
    text = string.Template((TEMPLATES / template).read_text()).substitute(
        {k: str(v) for k, v in values.items()})
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(text)
    return dest


def render_hub(run_dir: Path, host: str, client: list[int], cluster: list[int], leaf: list[int],
               monitor: list[int]) -> list[Node]:
    """Configs of a hub cluster with one node per entry of the port lists."""
    nodes = []
    routes = ", ".join(f'"nats://{host}:{p}"' for p in cluster)
    for i, (c, r, lf, m) in enumerate(zip(client, cluster, leaf, monitor, strict=True), start=1):
        name = f"hub{i}"
        # A one-node hub must not be a cluster: clustered JetStream would wait for peers forever.
        block = (f"cluster {{\n  name: hub\n  listen: {host}:{r}\n  routes: [{routes}]\n}}\n"
                 if len(client) > 1 else "")
        conf = _render("hub.conf.tmpl", run_dir / "nats" / f"{name}.conf", name=name, host=host,
                       client_port=c, monitor_port=m, leaf_port=lf, cluster=block,
                       store_dir=run_dir / "data" / name)
        nodes.append(Node(name, conf, host, c, m, lf, r if len(client) > 1 else None))
    return nodes


def render_edge(run_dir: Path, site: str, host: str, client_port: int, monitor_port: int,
                hub_leaf_urls: list[str]) -> Node:
    """Config of an edge site's server, a leaf node of the hub."""
    name = f"edge-{site}"
    conf = _render("edge.conf.tmpl", run_dir / "nats" / f"{name}.conf", name=name, site=site, host=host,
                   client_port=client_port, monitor_port=monitor_port,
                   hub_leaf_urls=", ".join(f'"{u}"' for u in hub_leaf_urls), store_dir=run_dir / "data" / name)
    return Node(name, conf, host, client_port, monitor_port)


def healthz(node: Node) -> dict[str, object] | None:
    """The node's /healthz answer (JetStream included), or None when it does not answer yet."""
    try:
        with urllib.request.urlopen(f"{node.monitor}/healthz", timeout=1) as resp:
            return dict(json.loads(resp.read()))
    except (OSError, ValueError):
        return None


def leafnode_connected(node: Node) -> bool:
    """True once an edge node has its leaf connection to the hub up."""
    try:
        with urllib.request.urlopen(f"{node.monitor}/leafz", timeout=1) as resp:
            return bool(json.loads(resp.read()).get("leafnodes"))
    except (OSError, ValueError):
        return False


def wait_healthy(nodes: list[Node], timeout: float = 30.0, procs: list[subprocess.Popen[bytes]] | None = None,
                 leaf: list[Node] | None = None) -> None:
    """Block until every node reports healthy (and every ``leaf`` node is connected to the hub)."""
    deadline = time.monotonic() + timeout
    pending = list(nodes)
    while pending or leaf:
        for proc in procs or []:
            if proc.poll() is not None:
                raise RuntimeError(f"nats-server exited with code {proc.returncode}: {proc.args!r}")
        pending = [n for n in pending if (healthz(n) or {}).get("status") != "ok"]
        leaf = [n for n in (leaf or []) if not leafnode_connected(n)]
        if not pending and not leaf:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"NATS not healthy after {timeout:g} s: {[n.name for n in pending + leaf]}")
        time.sleep(0.05)
