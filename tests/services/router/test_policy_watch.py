"""The router's policy follower: outcomes announced, the policy in force kept when a newer one is invalid."""

from __future__ import annotations

from services.router.catalog import Catalog
from services.router.masking import Masker
from services.router.policy import parse
from services.router.policy_watch import PolicyFollower
from services.router.state import LiveState

SITE = "plant3"
GLOBAL, OWN = "router.policy", "router.policy.plant3"


def rule(name: str) -> bytes:
    return f"rules: [{{name: {name}, route: [requested]}}]\n".encode()


class TestPolicyFollower:
    def follower(self) -> tuple[PolicyFollower, list[dict[str, object]]]:
        file_policy = parse(rule("from-file").decode(), "file")
        state = LiveState(Catalog(SITE), file_policy, Masker(()), file_policy=file_policy)
        events: list[dict[str, object]] = []

        async def announce(event: dict[str, object]) -> None:
            events.append(event)

        return PolicyFollower(state, SITE, announce), events

    async def feed(self, follower: PolicyFollower, key: str, value: bytes | None) -> None:
        await follower.on_entry(key, value)
        await follower.settled()

    async def test_invalid_fallback_keeps_the_policy_in_force(self) -> None:
        """When deleting the override would fall back to an invalid global policy, the override stays."""
        follower, events = self.follower()
        await self.feed(follower, GLOBAL, b"rules: not-a-list\n")
        await self.feed(follower, OWN, rule("s"))
        await self.feed(follower, OWN, None)
        assert [e["outcome"] for e in events] == ["rejected", "applied", "rejected"]
        assert follower.state.policy.rules[0].name == "s"
        assert follower.state.policy_source == "kv:router.policy.plant3"
        await self.feed(follower, GLOBAL, rule("g"))
        assert events[-1] == {"outcome": "applied", "source": "kv:router.policy", "rules": ["g"]}

    async def test_invalid_global_under_an_override_is_rejected(self) -> None:
        """A broken global policy is reported as rejected even where a site override hides it."""
        follower, events = self.follower()
        await self.feed(follower, OWN, rule("s"))
        await self.feed(follower, GLOBAL, b"rules: [{name: x, route: []}]\n")
        assert events[-1]["outcome"] == "rejected"
        assert events[-1]["key"] == GLOBAL
        assert follower.state.policy.rules[0].name == "s"

    async def test_deleting_everything_returns_to_the_file(self) -> None:
        """With no key left the router uses its policy file again, and says so."""
        follower, events = self.follower()
        await self.feed(follower, GLOBAL, rule("g"))
        await self.feed(follower, GLOBAL, None)
        assert events[-1] == {"outcome": "reverted", "source": "file", "rules": ["from-file"]}
        assert follower.state.policy.rules[0].name == "from-file"

    async def test_a_config_bucket_created_anew_counts_revisions_from_one(self) -> None:
        """Revisions the router has seen are ignored when they come again (the hub read and the mirror overlap);
        a bucket created anew starts from revision 1, and its policy applies."""
        follower, events = self.follower()
        await follower.on_entry(GLOBAL, rule("old"), 7)
        await follower.settled()
        await follower.on_entry(GLOBAL, rule("stale"), 6)  # older than what was seen: ignored
        await follower.settled()
        assert follower.state.policy.rules[0].name == "old"
        await follower.replaced()
        await follower.on_entry(GLOBAL, rule("new"), 1)
        await follower.settled()
        assert follower.state.policy.rules[0].name == "new"
        assert events[-1] == {"outcome": "applied", "source": "kv:router.policy", "rules": ["new"]}
