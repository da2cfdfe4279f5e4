"""Argument types shared by the operator commands (``leafwire usage``, ``policy``, ``sites``, ``budgets``)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from shared import subjects
from shared.numbers import finite

DEFAULT_NATS_URL = "nats://127.0.0.1:4222"


def add_nats(parser: argparse.ArgumentParser, about: str) -> None:
    """``--nats`` and ``--creds``, which default to the services' own ``LW_NATS_URL`` and ``LW_NATS_CREDS``."""
    parser.add_argument("--nats", default=os.environ.get("LW_NATS_URL") or DEFAULT_NATS_URL,
                        help=f"{about}; comma-separated for several (default: $LW_NATS_URL, else {DEFAULT_NATS_URL})")
    parser.add_argument("--creds", type=Path, default=os.environ.get("LW_NATS_CREDS") or None,
                        help="NATS credentials file (default: $LW_NATS_CREDS)")


def nats_servers(args: argparse.Namespace) -> list[str]:
    """The servers of ``--nats``."""
    return [u.strip() for u in str(args.nats).split(",") if u.strip()]


def nats_options(args: argparse.Namespace) -> dict[str, Any]:
    """Connection options of ``--creds``."""
    return {"user_credentials": str(args.creds)} if args.creds else {}


def site_id(text: str) -> str:
    """A site id, also a JetStream domain (``edge1``, ``hub``): what subjects can carry."""
    try:
        return subjects.check_site(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def seconds(text: str) -> float:
    """A wait in seconds: a finite number above 0 (argparse then says what was wrong, in one line)."""
    value = finite(text)
    if value is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: the wait must be more than 0 seconds")
    return value
