"""``leafwire``: the project's operator commands under one name (the package's console script).

    leafwire usage [...]     who used what, and what it cost (``shared.usage_report``)
    leafwire policy [...]    check a routing policy, or change it live (``services.router.policy_cli``)
    leafwire sites [...]     the sites whose usage the hub collects; remove one (``shared.sites_cli``)
    leafwire budgets [...]   what every site spent against each budget (``shared.budgets_cli``)
    leafwire providers [...] check a providers file and the keys it names (``services.cloud_adapter.providers_cli``)

Each is also ``python -m`` of its module. Starting and stopping the local stack is ``just up`` / ``just down``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from services.cloud_adapter import providers_cli
from services.router import policy_cli
from shared import budgets_cli, sites_cli, usage_report

COMMANDS: dict[str, tuple[Callable[[Sequence[str], str], int], str]] = {
    "usage": (usage_report.main, "who used what, and what it cost"),
    "policy": (policy_cli.main, "check a routing policy, or change it live"),
    "sites": (sites_cli.main, "the sites whose usage the hub collects; remove one"),
    "budgets": (budgets_cli.main, "what every site spent today and this month, against each budget"),
    "providers": (providers_cli.main, "check a cloud providers file and the keys it names"),
}


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help") or args[0] not in COMMANDS:
        width = max(map(len, COMMANDS))
        listing = "\n".join(f"  {name.ljust(width)}  {about}" for name, (_, about) in COMMANDS.items())
        out = sys.stdout if args and args[0] in ("-h", "--help") else sys.stderr
        if args and args[0] not in ("-h", "--help"):
            print(f"leafwire: unknown command {args[0]!r}", file=out)
        print(f"usage: leafwire <command> [options]\n\ncommands:\n{listing}\n\n"
              "leafwire <command> --help tells more.", file=out)
        return 0 if out is sys.stdout else 2
    run, _ = COMMANDS[args[0]]
    return run(args[1:], f"leafwire {args[0]}")


if __name__ == "__main__":
    sys.exit(main())
