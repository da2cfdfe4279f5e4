"""Which refusals of a target let the router offer the request to the next one."""

from __future__ import annotations

from services.router.handover import falls_back
from shared.errors import InvalidRequest


def test_a_parameter_one_target_cannot_honour_lets_the_next_try() -> None:
    """An Anthropic model refusing JSON mode (400 unsupported_parameter) says nothing of the OpenAI model after
    it in the chain, which takes it: the request is offered on, as for a context too small."""
    refused = InvalidRequest("The Anthropic model claude does not support response_format",
                             param="response_format", code="unsupported_parameter")
    assert falls_back(refused)


def test_a_malformed_request_is_not_offered_on() -> None:
    """A request no target can take (a bad value) stops at the first."""
    assert not falls_back(InvalidRequest("temperature must be at most 2", param="temperature"))
