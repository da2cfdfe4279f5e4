"""Check a providers file before a cloud-adapter reads it (at its start, or when the file changes under it).

    uv run leafwire providers validate deploy/providers.yaml
    uv run leafwire providers validate /etc/leafwire/providers.yaml --production

Prints each provider with its models and where its key (and its proxy's credentials) come from, and whether
they can be read here: this machine's environment and files, so run it where the adapter runs. Key values are
never printed. Exit status: 0 valid; 1 invalid (the reason printed), or with ``--production`` a key that
cannot be read here (a production adapter refuses to start, or to apply the file, without it).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from services.cloud_adapter import config


def _limits(rpm: int | None, tpm: int | None, shape: str) -> str:
    """``rpm 500, tpm 200000`` in ``shape`` (``""`` without either)."""
    said = ", ".join(f"{name} {value}" for name, value in (("rpm", rpm), ("tpm", tpm)) if value)
    return shape.format(said) if said else ""


def describe(provider: config.Provider) -> str:
    """One provider as a line: kind, URL, proxy, models, and where its secrets are."""
    spec = provider.spec
    models = ", ".join(name + (" [embeddings]" if m.kind == "embeddings" else "") + _limits(m.rpm, m.tpm, " [{}]")
                       for name, m in spec.models.items())
    secrets = []
    if spec.api_key_env or spec.api_key_file:
        where = f"environment variable {spec.api_key_env}" if spec.api_key_env else f"file {spec.api_key_file}"
        secrets.append(f"key: {where} ({'read' if provider.key is not None else 'NOT readable here'})")
    else:
        secrets.append("no key")
    if spec.proxy:
        auth = ""
        if spec.proxy_auth_env or spec.proxy_auth_file:
            where = (f"environment variable {spec.proxy_auth_env}" if spec.proxy_auth_env
                     else f"file {spec.proxy_auth_file}")
            auth = f", credentials: {where} ({'read' if provider.proxy_auth is not None else 'NOT readable here'})"
        secrets.append(f"proxy: {spec.proxy}{auth}")
    local = ", local" if spec.local else ""
    limits = _limits(spec.rpm, spec.tpm, ", {}")
    return f"  {spec.name} ({spec.kind}, {spec.base_url}{local}{limits}): {models}; {'; '.join(secrets)}"


def validate(path: Path, production: bool) -> int:
    """Parse the file and read each provider's secrets; print what it holds, or what is wrong."""
    try:
        text = path.read_text()
    except OSError as exc:  # missing, a directory, unreadable
        print(f"cannot read {path}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    try:
        file = config.parse(text, f"providers file {path}")
    except config.ConfigError as exc:
        print(f"invalid: {exc.message}", file=sys.stderr)
        return 1
    providers = [config.read_key(spec) for spec in file.providers]
    models = sum(len(p.spec.models) for p in providers)
    budgets = file.budgets
    print(f"valid: {len(providers)} provider(s), {models} model(s); budgets: global {limits(budgets.global_)}, "
          f"each tenant {limits(budgets.tenant_default)}, {len(budgets.tenants)} tenant(s) of their own")
    for provider in providers:
        print(describe(provider))
    missing = [f"{p.spec.name}: {p.missing_key}" for p in providers if p.missing_key]
    if missing and production:
        print("a production adapter would refuse this file here: " + "; ".join(missing), file=sys.stderr)
        return 1
    if missing:
        print("in development these providers answer 503 provider_key_missing until their secrets can be read: "
              + "; ".join(missing))
    return 0


def limits(limits: config.BudgetLimits) -> str:
    """A scope's limits, as dollars a day and a month."""
    shown = [f"${value:g} {period}" for period, value in (("a day", limits.daily_usd), ("a month", limits.monthly_usd))
             if value is not None]
    return " and ".join(shown) or "unlimited"


def main(argv: Sequence[str] | None = None, prog: str = "leafwire providers") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("validate", help="check a providers file and the secrets it names")
    check.add_argument("file", type=Path, nargs="?", default=Path("deploy/providers.yaml"),
                       help="the providers file (default: deploy/providers.yaml, LW_PROVIDERS_FILE's default)")
    check.add_argument("--production", action="store_true",
                       help="fail when a key cannot be read here, as a production adapter refuses it")
    args = parser.parse_args(argv)
    return validate(args.file, args.production)


if __name__ == "__main__":
    sys.exit(main())
