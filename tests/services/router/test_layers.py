"""Which policy is in force on a site: its own key, else the global key, else the file."""

from __future__ import annotations

from services.router.layers import Layers, Step, in_force

SITE = "plant3"
GLOBAL, OWN = "router.policy", "router.policy.plant3"


def rule(name: str) -> bytes:
    return f"rules: [{{name: {name}, route: [requested]}}]\n".encode()


def changes(layers: Layers, *entries: tuple[str, bytes | None]) -> list[Step]:
    for key, value in entries:
        layers.seen(key, value)
    steps = layers.settle()
    for step in steps:
        if step.outcome != "overridden":
            layers.switched(step.key)
    return steps


class TestInForce:
    def test_site_key_wins_over_global(self) -> None:
        """A site's own key wins; without it the global key; without both the file (None)."""
        assert in_force({GLOBAL: b"g", OWN: b"s"}, SITE) == OWN
        assert in_force({GLOBAL: b"g"}, SITE) == GLOBAL
        assert in_force({}, SITE) is None

    def test_other_sites_keys_do_not_count(self) -> None:
        """Another site's override is not this site's policy."""
        assert in_force({"router.policy.plant4": b"x"}, SITE) is None


class TestLayers:
    def test_global_then_override_then_fallbacks(self) -> None:
        """Global applies; the override applies over it; deleting falls back one level at a time."""
        layers = Layers(SITE)
        assert changes(layers, (GLOBAL, rule("g"))) == [Step("applied", GLOBAL, rule("g"))]
        assert changes(layers, (OWN, rule("s"))) == [Step("applied", OWN, rule("s"))]
        assert changes(layers, (OWN, None)) == [Step("reverted", GLOBAL, rule("g"))]
        assert changes(layers, (GLOBAL, None)) == [Step("reverted", None, None)]

    def test_global_change_under_an_override_is_only_noted(self) -> None:
        """A new global policy does not replace a site's own one; it is reported as overridden."""
        layers = Layers(SITE)
        changes(layers, (OWN, rule("s")))
        assert changes(layers, (GLOBAL, rule("g"))) == [Step("overridden", GLOBAL, rule("g"))]
        assert changes(layers, (GLOBAL, None)) == [Step("overridden", GLOBAL, None)]

    def test_initial_state_settles_once_on_the_winner(self) -> None:
        """Both keys read at start: the override applies, the global one is noted as overridden."""
        steps = changes(Layers(SITE), (GLOBAL, rule("g")), (OWN, rule("s")))
        assert steps == [Step("applied", OWN, rule("s")), Step("overridden", GLOBAL, rule("g"))]

    def test_other_sites_and_empty_settles_change_nothing(self) -> None:
        """Another site's key, or a settle with nothing new, gives nothing to do."""
        layers = Layers(SITE)
        assert changes(layers, ("router.policy.plant4", rule("x"))) == []
        assert changes(layers) == []

    def test_a_revision_seen_before_is_ignored(self) -> None:
        """The hub's copy and the mirror's carry the same revisions: the second arrival changes nothing,
        and an older revision never replaces a newer one."""
        layers = Layers(SITE)
        layers.seen(GLOBAL, rule("new"), 7)
        assert [s.outcome for s in layers.settle()] == ["applied"]
        layers.switched(GLOBAL)
        layers.seen(GLOBAL, rule("new"), 7)
        layers.seen(GLOBAL, rule("old"), 5)
        assert layers.settle() == []
        assert layers.entries[GLOBAL] == rule("new")

    def test_rewriting_the_policy_in_force_applies_it_again(self) -> None:
        """Writing the same policy again is answered again (a push always gets a verdict)."""
        layers = Layers(SITE)
        changes(layers, (GLOBAL, rule("g")))
        assert changes(layers, (GLOBAL, rule("g"))) == [Step("applied", GLOBAL, rule("g"))]

    def test_a_mirror_made_anew_with_the_same_policy_changes_nothing(self) -> None:
        """The edge's mirror made anew brings the policy in force again, from revision 1 and unchanged: no
        step (no second "applied" announced); a key it changed or no longer holds still counts."""
        layers = Layers(SITE)
        layers.seen(GLOBAL, rule("g"), 5)
        layers.seen(OWN, rule("own"), 6)
        changes(layers)
        layers.replaced()
        layers.seen(OWN, rule("own"), 1)
        layers.seen(GLOBAL, rule("g"), 2)
        assert layers.settle() == []
        layers.replaced()
        layers.seen(GLOBAL, rule("g"), 1)  # the site's own key is gone from the bucket made anew
        assert changes(layers) == [Step("reverted", GLOBAL, rule("g"))]

    def test_a_bucket_created_anew_is_read_whole(self) -> None:
        """After the bucket was created anew its revisions count from 1, and a key it does not bring by the
        next settle is gone, also one that was read from the hub alone (no delete ever comes for it)."""
        layers = Layers(SITE)
        layers.seen(GLOBAL, rule("old"), 7)
        layers.seen(OWN, rule("own"), 8)  # as the hub read brings it while the mirror is silent
        layers.settle()
        layers.switched(OWN)
        layers.replaced()
        layers.seen(GLOBAL, rule("new"), 1)
        assert layers.settle() == [Step("applied", GLOBAL, rule("new"))]
        assert layers.entries == {GLOBAL: rule("new")}
