"""Which routing policy is in force on a site, and what a change of the config bucket does to it.

The ``config`` bucket (written at the hub, mirrored to every edge) may hold two policies for a site:

    router.policy.<site>   this site only: wins over the global one here
    router.policy          every site without its own key
    (neither)              the router's policy file (``LW_ROUTER_POLICY_FILE``)

Deleting a key falls back one level. A policy that does not validate is rejected and the one in force
stays. Pure: no NATS, no clock; ``watch.py`` feeds it entries and announces the outcomes it returns.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from shared import subjects

FILE = "file"
Outcome = Literal["applied", "reverted", "rejected", "overridden"]


def source_of(key: str | None) -> str:
    """How a policy's origin is shown (dry runs, announcements): ``file`` or ``kv:<key>``."""
    return FILE if key is None else f"kv:{key}"


def policy_keys(site: str) -> tuple[str, str]:
    """The keys a site reads, the strongest first (other sites' overrides are not its business)."""
    return subjects.site_policy_key(site), subjects.POLICY_KEY


def in_force(entries: Mapping[str, bytes], site: str) -> str | None:
    """The key whose policy ``site`` uses, ``None`` for its policy file."""
    return next((key for key in policy_keys(site) if key in entries), None)


@dataclass(frozen=True)
class Step:
    """One thing to do after a change: try the policy of ``key`` (``None``: the file) and announce
    ``outcome`` if it validates; or only validate ``key``'s text and announce ``overridden``."""

    outcome: Outcome
    key: str | None
    text: bytes | None = None


@dataclass
class Layers:
    """The policy keys of one site as last read, and the key whose policy is in force.

    Entries may come twice, from the site's mirror and from the hub itself (a mirror is copied with the
    hub's sequence numbers, so a key's revision is the same on both): a revision already seen, or older,
    is ignored. A bucket created anew (``replaced``) counts from 1 again and is read whole: what it does not
    hold by the next ``settle`` is gone, also what was read from the hub alone; a key it brings again as it was
    is no change (a push of the same policy, outside such a re-read, is one: every push gets a verdict).
    """

    site: str
    entries: dict[str, bytes] = field(default_factory=dict)
    revisions: dict[str, int] = field(default_factory=dict)
    current: str | None = None
    pending: set[str] = field(default_factory=set)
    reread: set[str] | None = None  # keys seen since the bucket was replaced, until the next settle

    def relevant(self, key: str) -> bool:
        """True for the keys this site reads."""
        return key in policy_keys(self.site)

    def seen(self, key: str, value: bytes | None, revision: int = 0) -> None:
        """A key was written (``value``) or deleted (``None``) at ``revision`` (0: unknown); acted on at
        ``settle``."""
        if not self.relevant(key) or (revision and revision <= self.revisions.get(key, 0)):
            return
        if revision:
            self.revisions[key] = revision
        if self.reread is not None:
            self.reread.add(key)
            if value is not None and self.entries.get(key) == value:
                return  # the bucket made anew (a mirror remade) brings it again as it was: nothing changed
        if value is None:
            self.entries.pop(key, None)
        else:
            self.entries[key] = value
        self.pending.add(key)

    def settle(self) -> list[Step]:
        """What the changes seen since the last call mean: at most one policy to switch to, and an
        ``overridden`` note when the global key changed under a site override."""
        if self.reread is not None:
            for key in set(self.entries) - self.reread:  # held by the bucket that was replaced
                self.seen(key, None)
            self.reread = None
        changed, self.pending = self.pending, set()
        if not changed:
            return []
        target = in_force(self.entries, self.site)
        steps = []
        if target != self.current or target in changed:
            written = target is not None and target in changed
            steps.append(Step("applied" if written else "reverted", target, self.entries.get(target or "")))
        shadowed = subjects.POLICY_KEY
        if shadowed in changed and target == subjects.site_policy_key(self.site):
            steps.append(Step("overridden", shadowed, self.entries.get(shadowed)))
        return steps

    def replaced(self) -> None:
        """The bucket was created anew: its revisions count from 1 again, and the keys it does not bring by the
        next ``settle`` are gone."""
        self.revisions.clear()
        self.reread = set()

    def switched(self, key: str | None) -> None:
        """The policy of ``key`` is now in force."""
        self.current = key
