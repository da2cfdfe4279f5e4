"""Run a module under cProfile timed by CPU time, not wall time: ``python -m loadtests.cpu_profile OUT MODULE``.

On a busy machine a wall-clock profile charges a function for the time the process spent preempted (a
socket write that wakes the receiver, say); CPU time shows what the process itself spends. The stats are
written to OUT when the module returns (a service returns after SIGTERM).
"""

from __future__ import annotations

import cProfile
import runpy
import sys
import time


def main() -> None:
    out, module = sys.argv[1], sys.argv[2]
    sys.argv = [module, *sys.argv[3:]]
    profile = cProfile.Profile(time.process_time)
    profile.enable()
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    finally:
        profile.disable()
        profile.dump_stats(out)


if __name__ == "__main__":
    main()
