"""The ordered stop of `just down` (deploy/shutdown.py), on a real supervisord running small programs."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from deploy import shutdown, stack
from tests.support import ROOT, eventually

# Notes "<name> term" when told to stop and "<name> exit" once its (simulated) draining is done; with
# "ignore" as its last argument it notes the SIGTERM and carries on.
PROGRAM = """
import signal, sys, time
name, record, drain_s, mode = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]

def note(what):
    with open(record, "a") as f:
        f.write(f"{name} {what}\\n")

def on_term(*_):
    note("term")
    if mode == "obey":
        time.sleep(drain_s)
        note("exit")
        sys.exit(0)

signal.signal(signal.SIGTERM, on_term)
while True:
    time.sleep(60)
"""


@dataclass
class Supervised:
    """A supervisord of small programs, its control, and the record the programs write."""

    proc: subprocess.Popen[bytes]
    control: shutdown.RpcControl
    record: Path

    def notes(self) -> list[str]:
        return self.record.read_text().splitlines() if self.record.exists() else []


@contextlib.contextmanager
def supervised(tmp_path: Path, groups: dict[str, tuple[int, dict[str, tuple[float, str]]]]) -> Iterator[Supervised]:
    """Run ``{group: (priority, {program: (drain_s, "obey" | "ignore")})}`` under supervisord until all run."""
    run_dir, record = tmp_path / "run", tmp_path / "record"
    (run_dir / "logs").mkdir(parents=True)
    script = tmp_path / "program.py"
    script.write_text(PROGRAM)
    text = stack.supervisord_conf(run_dir)
    for name, (priority, programs) in groups.items():
        commands = {p: (f"{sys.executable} {script} {p} {record} {drain_s} {mode}", {})
                    for p, (drain_s, mode) in programs.items()}
        text += stack.group(name, priority, commands, run_dir / "logs")
    conf = run_dir / "supervisord.conf"
    conf.write_text(text)
    proc = subprocess.Popen([sys.executable, "-m", "supervisor.supervisord", "-n", "-c", str(conf)],
                            start_new_session=True, cwd=ROOT)
    control = shutdown.RpcControl(conf)
    count = sum(len(programs) for _, programs in groups.values())
    try:
        eventually(lambda: _all_running(control, count), 30, "every program RUNNING")
        yield Supervised(proc, control, record)
    finally:
        if proc.poll() is None:
            with contextlib.suppress(OSError):
                for program in control.programs():
                    if program.pid:
                        shutdown.kill_group(program.pid)
            proc.kill()
        proc.wait(10)


def _all_running(control: shutdown.RpcControl, count: int) -> bool:
    try:
        programs = control.programs()
    except OSError:  # the control socket is not there yet
        return False
    return len(programs) == count and all(p.state == "RUNNING" for p in programs)


class TestStopInOrder:
    def test_each_group_waits_for_the_one_before_and_stops_at_once(self, tmp_path: Path) -> None:
        """The gateway-like group exits before the next is told to stop; a group's programs stop together."""
        groups = {"front": (200, {"front": (0.3, "obey")}),
                  "middle": (100, {"middle-a": (0.3, "obey"), "middle-b": (0.3, "obey")}),
                  "base": (10, {"base": (0.0, "obey")})}
        said: list[str] = []
        with supervised(tmp_path, groups) as sup:
            shutdown.stop_in_order(sup.control, said.append)
            assert sup.proc.wait(10) == 0
            notes = sup.notes()
        at = notes.index
        assert at("front exit") < min(at("middle-a term"), at("middle-b term"))
        assert max(at("middle-a term"), at("middle-b term")) < min(at("middle-a exit"), at("middle-b exit"))
        assert max(at("middle-a exit"), at("middle-b exit")) < at("base term") < at("base exit")
        assert [line.split()[2] for line in said] == ["front", "middle", "base"]

    def test_a_program_that_ignores_sigterm_is_killed_by_pid(self, tmp_path: Path) -> None:
        """After the bound, a program still running is killed by its PID, named in a message; the stop goes on."""
        groups = {"middle": (100, {"stubborn": (0.0, "ignore")}), "base": (10, {"base": (0.0, "obey")})}
        said: list[str] = []
        with supervised(tmp_path, groups) as sup:
            pid = next(p.pid for p in sup.control.programs() if p.name == "stubborn")
            shutdown.stop_in_order(sup.control, said.append, wait_s=0.5)
            assert sup.proc.wait(10) == 0
            notes = sup.notes()
        assert f"stubborn (pid {pid}) still running 0.5 s after SIGTERM" in said[0]
        assert not Path(f"/proc/{pid}").exists()
        assert notes == ["stubborn term", "base term", "base exit"]

