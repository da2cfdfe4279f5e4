"""The routing decision: rules, guards and aliases."""

from __future__ import annotations

import pytest

from schemas.chat import ChatCompletionRequest
from services.router.decide import (
    Conditions,
    Facts,
    ResidencyViolation,
    embeddings_plan,
    plan,
)
from services.router.policy import Policy, parse
from services.router.signals import Signals
from shared.errors import BudgetExceeded, InvalidRequest, LeafwireError, ModelNotFound, Overloaded, Unavailable

POLICY = parse("""
local_model: small
aliases:
  fast: small
  smart: openai/gpt-4o
rules:
  - {name: ops-tenant, when: {tenant: ops}, route: [anthropic/claude]}
  - {name: onsite, when: {residency: onsite}, route: [local]}
  - {name: offline, when: {uplink: down}, route: [local]}
  - {name: broke, when: {budget: exhausted}, route: [local]}
  - {name: openai-down, when: {provider_health: {openai: open}, model: auto}, route: [anthropic/claude, local]}
  - {name: long, when: {model: auto, prompt_tokens: {gt: 1000}}, route: [openai/gpt-4o, local]}
  - {name: hard, when: {model: auto, complexity: {gte: 0.5}}, route: [openai/gpt-4o-mini, local]}
  - {name: default, route: [requested, local]}
""")
UP = Conditions(local_models=frozenset({"small", "tiny"}))


def facts(model: str = "auto", tenant: str = "acme", tokens: int = 10, complexity: float = 0.1,
          onsite: bool = False, user: str | None = None) -> Facts:
    return Facts(model=model, tenant=tenant, user=user, onsite=onsite, signals=Signals(tokens, complexity))


def chain(f: Facts, c: Conditions = UP, policy: Policy = POLICY) -> tuple[tuple[str, ...], str]:
    p = plan(policy, f, c)
    return p.chain, p.rule


class TestRules:
    def test_tenant_rule(self) -> None:
        """A rule on the tenant applies to that tenant only."""
        assert chain(facts(tenant="ops")) == (("anthropic/claude", "small"), "ops-tenant")
        assert chain(facts(tenant="acme"))[1] != "ops-tenant"

    def test_model_and_alias(self) -> None:
        """Aliases resolve; an explicit model is tried first, then the local fallback."""
        assert chain(facts("smart")) == (("openai/gpt-4o", "small"), "default")
        assert chain(facts("fast")) == (("small",), "default")
        assert chain(facts("tiny")) == (("tiny", "small"), "default")

    def test_prompt_length(self) -> None:
        """Long `auto` prompts go to the cloud model first."""
        assert chain(facts(tokens=1001)) == (("openai/gpt-4o", "small"), "long")
        assert chain(facts(tokens=1000))[1] == "default"

    def test_complexity(self) -> None:
        """Complex `auto` prompts go to the rule for complexity."""
        assert chain(facts(complexity=0.5)) == (("openai/gpt-4o-mini", "small"), "hard")

    def test_provider_health(self) -> None:
        """A rule can match on a provider's breaker state."""
        down = Conditions(local_models=UP.local_models, provider_health={"openai": "open"})
        assert chain(facts(tokens=5000), down) == (("anthropic/claude", "small"), "openai-down")

    def test_auto_with_no_cloud_rule_runs_locally(self) -> None:
        """`auto` under the default rule is the local model."""
        assert chain(facts()) == (("small",), "default")

    def test_first_match_wins(self) -> None:
        """Rules are evaluated in order."""
        assert chain(facts(tenant="ops", onsite=True))[1] == "ops-tenant"

    def test_last_resort_is_local(self) -> None:
        """After the rule's own route the local model is tried, unless the policy turns that off."""
        assert chain(facts(tenant="ops")) == (("anthropic/claude", "small"), "ops-tenant")
        offline = Conditions(uplink_up=False, local_models=UP.local_models)
        assert chain(facts(tenant="ops"), offline) == (("small",), "ops-tenant")
        strict = parse("local_model: small\nlast_resort: none\nrules: [{name: r, route: [openai/gpt-4o]}]")
        with pytest.raises(Unavailable):
            plan(strict, facts(), offline)


class TestGuards:
    def test_onsite_never_leaves_the_site(self) -> None:
        """A request marked on-site-only never gets a cloud target, whatever the rule says."""
        assert chain(facts("smart", onsite=True)) == (("small",), "onsite")
        p = parse("local_model: small\nlast_resort: none\nrules: [{name: cloud-only, route: [openai/gpt-4o]}]")
        with pytest.raises(ResidencyViolation):
            plan(p, facts(onsite=True), UP)

    def test_uplink_down_runs_locally(self) -> None:
        """With the uplink down only local targets remain."""
        offline = Conditions(uplink_up=False, local_models=UP.local_models)
        assert chain(facts("smart"), offline) == (("small",), "offline")
        assert plan(POLICY, facts("smart", tenant="ops"), offline).skipped == (("anthropic/claude", "uplink down"),)

    def test_budget_exhausted_runs_locally(self) -> None:
        """With the budget exhausted cloud targets are skipped; without a local one the answer is 429."""
        broke = Conditions(budget="exhausted", local_models=UP.local_models)
        assert chain(facts("smart"), broke) == (("small",), "broke")
        assert chain(facts(tenant="ops"), broke) == (("small",), "ops-tenant")
        strict = parse("last_resort: none\nrules: [{name: r, route: [openai/gpt-4o]}]")
        with pytest.raises(BudgetExceeded) as exc:
            plan(strict, facts(), broke)
        assert exc.value.status == 429

    def test_open_breaker_skips_to_the_next_in_chain(self) -> None:
        """A provider with an open breaker is skipped; the chain goes on."""
        p = parse("local_model: small\nrules: [{name: r, route: [openai/gpt-4o, anthropic/claude]}]")
        c = Conditions(local_models=UP.local_models, provider_health={"openai": "open"})
        result = plan(p, facts(), c)
        assert result.chain == ("anthropic/claude", "small")
        assert result.skipped == (("openai/gpt-4o", "openai circuit open"),)
        half_open = Conditions(local_models=UP.local_models, provider_health={"openai": "half_open"})
        assert plan(p, facts(), half_open).chain[0] == "openai/gpt-4o"

    def test_saturated_local_model(self) -> None:
        """When every worker of the only target is busy the answer is 429 with Retry-After."""
        busy = Conditions(local_models=UP.local_models, saturated=frozenset({"small"}))
        with pytest.raises(Overloaded) as exc:
            plan(POLICY, facts(), busy)
        assert exc.value.retry_after is not None

    def test_everything_unavailable_is_503(self) -> None:
        """With no target left for other reasons the answer is 503."""
        p = parse("rules: [{name: r, route: [openai/gpt-4o]}]")
        with pytest.raises(Unavailable):
            plan(p, facts(), Conditions(uplink_up=False))

    def test_unknown_local_model_is_404(self) -> None:
        """A name that is no alias, no cloud model and no local model is not found."""
        with pytest.raises(ModelNotFound):
            plan(POLICY, facts("nope"), UP)

    def test_a_local_model_whose_worker_restarts_is_not_404(self) -> None:
        """No live worker has it right now, but it is expected back: the policy's own local model, or one a
        worker served before. It stays in the chain (the hand-over answers 503 with Retry-After), so clients
        that retry on 503 get it once the worker is back; a 404 would tell them it does not exist."""
        restarting = Conditions(local_models=frozenset(), served_before=frozenset({"tiny", "small"}))
        assert chain(facts("tiny"), restarting) == (("tiny", "small"), "default")
        assert chain(facts("small"), Conditions(local_models=frozenset())) == (("small",), "default")
        with pytest.raises(ModelNotFound):
            plan(POLICY, facts("nope"), restarting)


    def test_a_cloud_model_no_adapter_is_configured_for_is_404(self) -> None:
        """Once the live cloud-adapters say which cloud models they are configured for, any other
        <provider>/<model> (a typo, say) is not found, as an unknown local name is, not quietly answered by
        the local fallback; a route entry they lack is skipped, saying why. While no adapter has said (none
        heard from), a cloud name is taken on trust and its failure falls back as before."""
        known = Conditions(local_models=UP.local_models, cloud_models=frozenset({"openai/gpt-4o"}))
        with pytest.raises(ModelNotFound):
            plan(POLICY, facts("openai/gpt-4o-typo"), known)
        assert chain(facts("openai/gpt-4o"), known) == (("openai/gpt-4o", "small"), "default")
        assert chain(facts("openai/gpt-4o-typo")) == (("openai/gpt-4o-typo", "small"), "default")
        routed = plan(POLICY, facts(tenant="ops"), known)  # the rule routes to anthropic/claude
        assert routed.chain == ("small",)
        assert routed.skipped == (("anthropic/claude", "no cloud-adapter is configured for it"),)


    def test_a_provider_on_the_sites_network_is_tried_with_the_uplink_down(self) -> None:
        """A cloud model of a `local: true` provider (a vLLM on the plant's LAN) does not need the uplink: it
        stays in the route while the uplink is down; others are skipped as before."""
        policy = parse("local_model: small\nrules: [{name: default, route: [requested, local]}]")
        offline = Conditions(uplink_up=False, local_models=UP.local_models, uplink_free=frozenset({"lan/llama"}))
        assert plan(policy, facts("lan/llama"), offline).chain == ("lan/llama", "small")
        assert plan(policy, facts("openai/gpt-4o"), offline).skipped == (("openai/gpt-4o", "uplink down"),)


EMBEDDERS = frozenset({"openai/embed"})


class TestCloudEmbeddings:
    def test_an_embeddings_model_alone_no_fallback(self) -> None:
        """An embeddings request for a cloud embeddings model goes to it alone, by rule `embeddings`, with its
        A/B variant: another model's vectors would be of another space."""
        p = embeddings_plan("openai/embed", "blue", facts("openai/embed"), UP, EMBEDDERS)
        assert (p.chain, p.rule, p.variant) == (("openai/embed",), "embeddings", "blue")
        assert p.header("openai/embed") == "target=openai/embed; rule=embeddings; variant=blue; reason=rule embeddings"

    def test_an_unconfigured_or_chat_model_is_404(self) -> None:
        """A cloud model no adapter has as an embeddings model (a typo, or a chat model) is a 404 naming what
        was asked for; while no adapter has said, it is taken on trust."""
        with pytest.raises(ModelNotFound) as exc:
            embeddings_plan("openai/gpt-4o", None, facts("smart"), UP, EMBEDDERS)
        assert exc.value.model == "smart"
        assert embeddings_plan("openai/other", None, facts("openai/other"), UP, None).chain == ("openai/other",)

    def test_the_guards_of_chat_refuse_it(self) -> None:
        """What keeps a chat request from a cloud model keeps an embeddings request from it, with chat's answer:
        residency 403, uplink down 503, budget spent 429, an open breaker 503 with Retry-After."""
        def refused(f: Facts, c: Conditions) -> LeafwireError:
            with pytest.raises(LeafwireError) as exc:
                embeddings_plan("openai/embed", None, f, c, EMBEDDERS)
            return exc.value
        assert isinstance(refused(facts(onsite=True), UP), ResidencyViolation)
        down = refused(facts(), Conditions(uplink_up=False))
        assert isinstance(down, Unavailable)
        assert (down.code, down.retry_after) == ("uplink_down", 5)
        assert isinstance(refused(facts(), Conditions(budget="exhausted")), BudgetExceeded)
        open_ = refused(facts(), Conditions(provider_health={"openai": "open"}, probes_in={"openai": 7.2}))
        assert (open_.code, open_.retry_after) == ("provider_unavailable", 8)
        lan = Conditions(uplink_up=False, uplink_free=EMBEDDERS)
        assert embeddings_plan("openai/embed", None, facts(), lan, EMBEDDERS).chain == ("openai/embed",)


class TestDecisionHeader:
    def test_header_names_rule_skips_and_fallbacks(self) -> None:
        """The decision says which rule chose the target, what was skipped and what failed before."""
        offline = Conditions(uplink_up=False, local_models=UP.local_models)
        p = plan(POLICY, facts("smart", tenant="ops"), offline)
        header = p.decision("small", [("x/y", "503 unavailable")]).header()
        assert header.startswith("target=local/small; rule=ops-tenant")
        assert "skipped anthropic/claude (uplink down)" in header
        assert "fell back from x/y (503 unavailable)" in header


def ask(model: str = "auto", tenant: str = "acme", **extra: object) -> Facts:
    """Facts for a chat request carrying ``extra`` OpenAI parameters (tools, response_format...)."""
    request = ChatCompletionRequest.model_validate(
        {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra})
    return Facts(model=model, tenant=tenant, user=None, onsite=False, signals=Signals(10, 0.1), request=request)


TOOLS = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]


class TestLocalCapabilities:
    """A local model that cannot honour a request (tools, JSON mode, images) is skipped like a busy one."""

    def test_tools_go_to_the_cloud_model_of_the_chain(self) -> None:
        """A model with a cloud target first keeps it, and the local fallback is dropped, saying why."""
        p = plan(POLICY, ask("smart", tools=TOOLS), UP)
        assert p.chain == ("openai/gpt-4o",)
        assert p.skipped == (("small", "does not support tools"),)

    def test_a_local_chain_is_refused_at_once_as_the_model_would(self) -> None:
        """Nothing else in the chain: the 400 the worker would give, naming the parameter, before any wait."""
        with pytest.raises(InvalidRequest) as refused:
            plan(POLICY, ask("fast", response_format={"type": "json_object"}), UP)
        assert refused.value.status == 400
        assert refused.value.param == "response_format"
        assert refused.value.code == "unsupported_parameter"
        assert "small" in refused.value.message

    def test_images_are_refused_by_a_text_only_chain(self) -> None:
        """An image part: the local model reads text only."""
        request = ChatCompletionRequest.model_validate({"model": "small", "messages": [{"role": "user", "content": [
            {"type": "text", "text": "what is it"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]})
        with pytest.raises(InvalidRequest, match="reads text only"):
            plan(POLICY, Facts("small", "acme", None, False, Signals(5, 0.0), request=request), UP)

    def test_tools_that_may_not_be_called_stay_local(self) -> None:
        """tool_choice "none" forbids calling the tools: the answer is text, which the local model gives."""
        assert plan(POLICY, ask("smart", tools=TOOLS, tool_choice="none"), UP).chain == ("openai/gpt-4o", "small")
        with pytest.raises(InvalidRequest):
            plan(POLICY, ask("fast", tools=TOOLS, tool_choice="auto"), UP)

    def test_default_values_stay_local(self) -> None:
        """Values that ask for nothing (no tools, tool_choice auto, text format) keep the local model."""
        p = plan(POLICY, ask("fast", tools=[], tool_choice="auto", response_format={"type": "text"}), UP)
        assert p.chain == ("small",)
        assert p.skipped == ()

    def test_a_passing_reason_is_named_before_the_capability(self) -> None:
        """Cloud skipped for its open breaker, local for tools: a 503 (it may pass), the detail naming both,
        not a 400 that would say the request itself is wrong."""
        down = Conditions(local_models=UP.local_models, provider_health={"openai": "open"})
        with pytest.raises(Unavailable) as refused:
            plan(POLICY, ask("smart", tools=TOOLS), down)
        assert refused.value.code == "provider_unavailable"
        assert "small: does not support tools" in refused.value.message

    def test_a_cloud_target_nobody_serves_does_not_hide_the_capability(self) -> None:
        """A route's cloud model no adapter is configured for will not come back: the local model's 400 is
        the answer, not a 503 telling the caller to retry in 5 s for ever."""
        long_auto = Facts("auto", "acme", None, False, Signals(2000, 0.1), request=ask(tools=TOOLS).request)
        conditions = Conditions(local_models=UP.local_models, cloud_models=frozenset({"anthropic/claude"}))
        with pytest.raises(InvalidRequest) as refused:
            plan(POLICY, long_auto, conditions)
        assert (refused.value.param, refused.value.code) == ("tools", "unsupported_parameter")

    def test_a_cloud_model_a_rule_left_out_for_the_uplink_names_the_uplink(self) -> None:
        """An `uplink: down` rule routing to the local model (docs/routing.md's example policy) and tools for a
        cloud model: the 503 uplink_down that passes, not a 400 saying cloud models take tools."""
        offline = Conditions(uplink_up=False, local_models=UP.local_models)
        with pytest.raises(Unavailable) as refused:
            plan(POLICY, ask("smart", tools=TOOLS), offline)
        assert refused.value.code == "uplink_down"
        assert "openai/gpt-4o: uplink down" in refused.value.message
        assert "small: does not support tools" in refused.value.message
        broke = Conditions(budget="exhausted", local_models=UP.local_models)
        with pytest.raises(BudgetExceeded):
            plan(POLICY, ask("smart", tools=TOOLS), broke)

    def test_a_cloud_model_a_rule_left_out_by_choice_is_the_local_400(self) -> None:
        """A rule that keeps requests local while the cloud model could be used: the local model's 400."""
        local_only = parse("local_model: small\nrules: [{name: local-only, route: [local]}]\n")
        with pytest.raises(InvalidRequest) as refused:
            plan(local_only, ask("openai/gpt-4o", tools=TOOLS), UP)
        assert refused.value.param == "tools"
