"""Stopping the local stack in order and fast: gateway, then the services, then the edge, then the hub.

supervisord stops its groups in priority order by itself, but it learns that a stopped process has exited
only when its loop wakes up, and with nothing else to do that loop sleeps a second at a time: a program
whose exit it just missed cost a whole second, one program after another (measured: `just down` took
4.1-8.5 s while each service exits within 100 ms of its SIGTERM). So the stop is driven from here, over
supervisord's control socket: every program of a group is stopped at once, asking for their state every
20 ms wakes supervisord to reap them, and the next group starts as soon as the last one has gone. A
program still running ``STOP_WAIT_S`` after its SIGTERM is killed by its PID, and said so.
"""

from __future__ import annotations

import configparser
import http.client
import os
import signal
import socket
import time
import xmlrpc.client
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

# Longer than a service's own bound on its drain (drain timeout 10 s + 5 s), shorter than supervisord's.
STOP_WAIT_S = 20.0
REAP_WAIT_S = 5.0  # after a SIGKILL: only supervisord's bookkeeping is left to wait for
POLL_S = 0.02
RPC_TIMEOUT_S = 5.0
EX_CONFIG = os.EX_CONFIG  # 78: a service that cannot start with its configuration (shared/service.py)
STOPPED = frozenset({"STOPPED", "EXITED", "FATAL"})
NOT_RUNNING_FAULTS = frozenset({6, 70})  # SHUTDOWN_STATE, NOT_RUNNING: it got there first


@dataclass(frozen=True)
class Program:
    """One process under supervisord, as its getAllProcessInfo reports it."""

    group: str
    name: str
    pid: int
    state: str

    @property
    def namespec(self) -> str:
        return f"{self.group}:{self.name}"


class Control(Protocol):
    """What the ordered stop needs from supervisord."""

    def priorities(self) -> dict[str, int]:
        """Each group's priority."""

    def programs(self) -> list[Program]:
        """Every process and its state now."""

    def stop(self, namespec: str) -> None:
        """Send a program its stop signal; do not wait."""

    def shutdown(self) -> None:
        """Ask supervisord to exit."""


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.path)


class _UnixTransport(xmlrpc.client.Transport):
    """XML-RPC over supervisord's unix socket, with a timeout (supervisor's own transport has none)."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__()
        self.path, self.timeout = path, timeout

    def make_connection(self, host: Any) -> http.client.HTTPConnection:
        connection = self._connection[1]
        if connection is None:
            _, self._extra_headers, _ = self.get_host_info(host)  # the basic-auth header from the URL
            connection = _UnixConnection(self.path, self.timeout)
            self._connection = host, connection
        return connection


class RpcControl:
    """supervisord's XML-RPC interface, reached as ``supervisorctl`` would from its rendered config."""

    def __init__(self, conf: Path, timeout: float = RPC_TIMEOUT_S) -> None:
        parser = configparser.RawConfigParser()
        parser.read(conf)
        ctl = parser["supervisorctl"]
        path = ctl["serverurl"].removeprefix("unix://")
        # The password is token_urlsafe: nothing in it needs quoting in a URL.
        self.rpc: Any = xmlrpc.client.ServerProxy(f"http://{ctl['username']}:{ctl['password']}@localhost",
                                                  transport=_UnixTransport(path, timeout))

    def priorities(self) -> dict[str, int]:
        return {c["group"]: int(c["group_prio"]) for c in self.rpc.supervisor.getAllConfigInfo()}

    def programs(self) -> list[Program]:
        return [Program(p["group"], p["name"], int(p["pid"]), str(p["statename"]))
                for p in self.rpc.supervisor.getAllProcessInfo()]

    def given_up(self) -> list[str]:
        """Programs supervisord will not start again by itself: FATAL (they kept exiting as they started), or
        EXITED with ``EX_CONFIG`` (a service refusing its configuration: deploy/supervisord.conf.tmpl)."""
        return [p["name"] for p in self.rpc.supervisor.getAllProcessInfo()
                if p["statename"] == "FATAL" or (p["statename"] == "EXITED" and p["exitstatus"] == EX_CONFIG)]

    def stop(self, namespec: str) -> None:
        self._tolerant(lambda: self.rpc.supervisor.stopProcess(namespec, False))

    def shutdown(self) -> None:
        self._tolerant(self.rpc.supervisor.shutdown)

    @staticmethod
    def _tolerant(call: Callable[[], object]) -> None:
        try:
            call()
        except xmlrpc.client.Fault as exc:
            if exc.faultCode not in NOT_RUNNING_FAULTS:
                raise


def kill_group(pid: int) -> None:
    """SIGKILL ``pid`` and its process group (supervisord makes each program a group leader)."""
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def stop_in_order(control: Control, say: Callable[[str], None], wait_s: float = STOP_WAIT_S,
                  kill: Callable[[int], None] = kill_group) -> None:
    """Stop the groups from the highest priority to the lowest, each group's programs at once; then shut down."""
    started = time.monotonic()
    priorities = control.priorities()
    for group in sorted(priorities, key=lambda g: (-priorities[g], g)):
        count = stop_group(control, group, say, wait_s, kill)
        if count:
            say(f"  ok  stopped {group} ({count})".ljust(52) + f"{time.monotonic() - started:5.2f} s")
    control.shutdown()


def stop_group(control: Control, group: str, say: Callable[[str], None], wait_s: float,
               kill: Callable[[int], None]) -> int:
    """Stop every running program of ``group``; kill by PID those still there after ``wait_s``. How many."""
    running = _left(control, group)
    for program in running:
        control.stop(program.namespec)
    deadline, killed = time.monotonic() + wait_s, False
    while left := _left(control, group):
        if time.monotonic() > deadline:
            if killed:
                raise StopTimeout([p.name for p in left], REAP_WAIT_S)
            for program in left:
                say(f"  !!  {program.name} (pid {program.pid}) still running {wait_s:g} s after SIGTERM: "
                    f"killing it (SIGKILL to its process group)")
                kill(program.pid)
            deadline, killed = time.monotonic() + REAP_WAIT_S, True
        time.sleep(POLL_S)  # each question also wakes supervisord to reap what has exited
    return len(running)


def _left(control: Control, group: str) -> list[Program]:
    return [p for p in control.programs() if p.group == group and p.state not in STOPPED]


class StopTimeout(Exception):
    """supervisord still reports programs running after they were killed."""

    def __init__(self, names: list[str], seconds: float) -> None:
        super().__init__(f"supervisord still reports {', '.join(names)} running {seconds:g} s after SIGKILL")
        self.names, self.seconds = names, seconds
