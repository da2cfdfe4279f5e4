"""Where leafwire keeps what it builds on a machine: one place for the model build, the local stack and the
local-inference worker's model registry."""

from __future__ import annotations

import os
from pathlib import Path


def lw_home() -> Path:
    """Models and build environments (``$LW_HOME``, default ``~/.cache/leafwire``)."""
    return Path(os.environ.get("LW_HOME", Path.home() / ".cache" / "leafwire")).expanduser()


def modified_at(*files: Path) -> int:
    """The newest modification time of ``files`` in unix seconds (those missing count for nothing; 0 if all
    are): when a model was built, or a providers file written, for ``created`` in ``GET /v1/models``."""
    times = []
    for path in files:
        try:
            times.append(int(path.stat().st_mtime))
        except OSError:
            continue
    return max(times, default=0)


def models_dir() -> Path:
    """The built models (``$LW_MODELS_DIR``, default ``$LW_HOME/models``)."""
    return Path(os.environ.get("LW_MODELS_DIR", lw_home() / "models")).expanduser()
