"""leafwire's exceptions. Each carries the status and OpenAI error fields it maps to.

    LeafwireError                    500 server_error
    ├── InvalidRequest               400 invalid_request_error
    │   ├── ContextLengthExceeded    400 code=context_length_exceeded
    │   ├── TooLarge                 413 code=request_too_large (bigger than one NATS message may be)
    │   └── AnswerTooLarge           413 code=answer_too_large (an embeddings answer one NATS message cannot carry)
    ├── Unauthorized                 401 authentication_error
    ├── ModelNotFound                404 code=model_not_found
    ├── Overloaded                   429 rate_limit_error  (carries retry_after)
    ├── BudgetExceeded               429 insufficient_quota code=budget_exceeded (carries scope, period)
    ├── Unavailable                  503 service_unavailable (carries retry_after)
    │   ├── ProviderUnavailable      503 code=provider_unavailable (breaker open), provider_key_missing
    │   ├── NotBatched               503 code=not_batched: the batcher cannot queue it, go direct
    │   └── HubUnreachable           503 code=hub_unreachable: hub-owned state (config) cannot be written
    ├── DeadlineExceeded             504 timeout
    ├── Cancelled                    499 cancelled
    ├── UpstreamError                502 upstream_error (carries retryable, provider_fault)
    │   ├── UpstreamTimeout          504 timeout code=upstream_timeout
    │   └── UpstreamRateLimited      429 rate_limit_error code=upstream_rate_limited
    └── RemoteError                  any: an error another service sent over NATS, kept as sent

``UpstreamError`` also carries these codes: ``upstream_bad_response`` (malformed JSON, wrong content
type, a stream cut short), ``upstream_auth_failed`` (the provider refused leafwire's key),
``upstream_insufficient_quota`` (the provider account is out of credit), ``destination_refused`` (the
provider's address is private/loopback/link-local and the provider is not marked local),
``upstream_proxy_auth_failed`` (the provider's HTTP proxy refused the adapter's proxy credentials) and
``upstream_proxy_error`` (the proxy could not be reached, or could not reach the provider).

Lower-layer errors are translated at a service's boundary (``raise Unavailable(...) from exc``); the
gateway maps them to OpenAI's error shape once, and NATS handlers to an ``error`` event once.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from schemas.errors import ErrorBody, ErrorResponse
from shared.logging import scrub

INPUT_AT = re.compile(r"\binput\[(\d+)\]")  # how an error names one input (context_length_exceeded)


def renumber_inputs(message: str, index: Callable[[int], int]) -> str:
    """``message`` with each ``input[i]`` it names as ``input[index(i)]``: an error about a request's part, or
    about the inputs a provider was sent of a request's, told in the caller's numbering."""
    return INPUT_AT.sub(lambda m: f"input[{index(int(m[1]))}]", message)


class BadConfiguration(Exception):
    """A service cannot start because of its configuration (a file it reads, a setting): it says what and
    where in one error line and exits with ``EX_CONFIG`` (78), which supervisors are told not to restart, since
    starting it again mends nothing (``shared/service.py``). Not reported to callers."""


class LeafwireError(Exception):
    """Root of every error leafwire reports to a caller."""

    status: int = 500
    type: str = "server_error"
    default_code: str | None = None
    final: bool = False
    """No retry of the request can mend it soon (a cloud provider's failure after the adapter's own retries):
    the caller is told not to retry (``x-should-retry: false``), which OpenAI's clients honour."""
    cost_usd: float = 0.0
    """What the request cost before it was refused (``Lw-Cost``): the call that found a provider without ``n``
    (``ChoicesOneByOne``), paid for, whose choices are then asked a call each."""

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code or self.default_code
        self.retry_after = retry_after

    def to_response(self) -> ErrorResponse:
        """This error in OpenAI's shape, with every registered secret (a provider's key a provider echoed in
        its error, say) replaced: what leaves a service is never a key."""
        return ErrorResponse(error=ErrorBody(message=scrub(self.message), type=self.type,
                                             param=None if self.param is None else scrub(self.param),
                                             code=None if self.code is None else scrub(self.code)))


class InvalidRequest(LeafwireError):
    """The request is malformed or asks for something impossible."""

    status = 400
    type = "invalid_request_error"


class ChoicesOneByOne(InvalidRequest):
    """A request of ``n`` > 1 choices to a target that answers one choice a request (a local model, an
    Anthropic one): the HTTP gateway then asks each choice as its own request. ``failed``: the targets of the
    route that refused it first (a fallback chain), for the choices to skip (``Lw-Skip``)."""

    default_code = "n_unsupported"

    def __init__(self, n: int, target: str, failed: tuple[str, ...] = (), cost_usd: float = 0.0) -> None:
        super().__init__(f"{target} answers one choice a request; n = {n} is asked natively only of "
                         f"OpenAI-compatible cloud models: send {n} requests instead (the HTTP gateway does)",
                         param="n")
        self.failed = failed
        self.cost_usd = cost_usd


class ContextLengthExceeded(InvalidRequest):
    """Prompt plus requested completion do not fit the model's context."""

    default_code = "context_length_exceeded"

    def __init__(self, *, model: str, context_length: int, prompt_tokens: int, max_tokens: int) -> None:
        super().__init__(
            f"This model's maximum context length is {context_length} tokens. However, you requested "
            f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the messages, {max_tokens} in the "
            f"completion). Please reduce the length of the messages or completion.",
            param="messages",
        )
        self.model = model
        self.context_length = context_length
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens


class TooLarge(InvalidRequest):
    """A request bigger than one NATS message may be (the server's ``max_payload``, headers included)."""

    status = 413
    default_code = "request_too_large"

    def __init__(self, size: int, max_payload: int) -> None:
        super().__init__(f"The request is {size} bytes as sent between leafwire's services (its headers included), "
                         f"more than one NATS message may carry (the server's max_payload: {max_payload} bytes). "
                         "Send a smaller request.")
        self.size = size
        self.max_payload = max_payload


class AnswerTooLarge(InvalidRequest):
    """An embeddings answer larger than one NATS message may be: the caller must ask for less at once."""

    status = 413
    default_code = "answer_too_large"

    def __init__(self, size: int, max_payload: int, inputs: int, floats: bool) -> None:
        fix = "send fewer inputs per request"
        if floats:
            fix += ", or ask for encoding_format base64 (a quarter of the size)"
        super().__init__(f"The answer to these {inputs} inputs ({size} bytes) is larger than the NATS server's "
                         f"max_payload ({max_payload} bytes): {fix}.", param="input")
        self.size = size
        self.max_payload = max_payload


class Unauthorized(LeafwireError):
    """Missing or wrong API key."""

    status = 401
    type = "authentication_error"
    default_code = "invalid_api_key"


class ModelNotFound(LeafwireError):
    """No worker, provider or alias is known for the model."""

    status = 404
    type = "invalid_request_error"
    default_code = "model_not_found"

    def __init__(self, model: str, message: str | None = None) -> None:
        super().__init__(message or f"The model '{model}' does not exist or is not served here.", param="model")
        self.model = model

    @classmethod
    def other_kind(cls, model: str, kind: str) -> ModelNotFound:
        """The 404 for a model asked for work of the other kind: ``kind`` is what the model is (``chat`` or
        ``embeddings``), so chat of an embeddings model, or vectors of a chat model."""
        endpoint = "POST /v1/embeddings" if kind == "embeddings" else "chat or text completions"
        return cls(model, f"The model '{model}' is {'an' if kind == 'embeddings' else 'a'} {kind} model: ask "
                          f"{endpoint} of it.")


class Overloaded(LeafwireError):
    """A bounded queue is full: try again after ``retry_after`` seconds."""

    status = 429
    type = "rate_limit_error"
    default_code = "overloaded"


class Unavailable(LeafwireError):
    """Nothing can serve the request right now (no worker, no router, NATS down)."""

    status = 503
    type = "service_unavailable"
    default_code = "unavailable"


class NotBatched(Unavailable):
    """The batcher cannot queue the request (it knows no worker of the model, or it is stopping); the
    router then hands the request to the workers directly. Callers never see this error."""

    default_code = "not_batched"


class HubUnreachable(Unavailable):
    """The hub's JetStream does not answer (uplink down, hub stopped): what only the hub may write, such as
    the config bucket, cannot be written now."""

    default_code = "hub_unreachable"


class DeadlineExceeded(LeafwireError):
    """The request's deadline passed before it was answered."""

    status = 504
    type = "timeout"
    default_code = "deadline_exceeded"


class Cancelled(LeafwireError):
    """The caller cancelled the request."""

    status = 499
    type = "cancelled"
    default_code = "cancelled"


class BudgetExceeded(LeafwireError):
    """A cloud budget (a tenant's or the global one) is spent for the current day or month.

    Routers act on ``code == "budget_exceeded"`` (take a local model instead); ``retry_after`` is the time
    until the budget's period starts again.
    """

    status = 429
    type = "insufficient_quota"
    default_code = "budget_exceeded"

    def __init__(self, message: str, *, scope: str | None = None, period: str | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message, retry_after=retry_after)
        self.scope = scope
        self.period = period


class ProviderUnavailable(Unavailable):
    """A cloud provider is not taking calls now: its circuit breaker is open, or it has no API key."""

    default_code = "provider_unavailable"

    def __init__(self, message: str, *, provider: str, retry_after: float | None = None,
                 code: str | None = None) -> None:
        super().__init__(message, retry_after=retry_after, code=code)
        self.provider = provider


class UpstreamError(LeafwireError):
    """A provider or worker failed after taking the request.

    ``retryable``: another attempt may succeed (5xx, connection errors, malformed answers); never set for
    client errors. ``provider_fault``: the failure says something about the provider's health and counts
    against its circuit breaker (a 400 caused by the request does not).
    """

    status = 502
    type = "upstream_error"
    default_code = "upstream_error"

    def __init__(self, message: str, *, code: str | None = None, retry_after: float | None = None,
                 retryable: bool = False, provider_fault: bool = True) -> None:
        super().__init__(message, code=code, retry_after=retry_after)
        self.retryable = retryable
        self.provider_fault = provider_fault


class IncompleteAnswer(UpstreamError):
    """Part of an answer never reached its reader (a NATS connection was cut while it was published)."""

    default_code = "answer_incomplete"


class UpstreamTimeout(UpstreamError):
    """A provider did not answer in time (connect, first byte, or the whole call)."""

    status = 504
    type = "timeout"
    default_code = "upstream_timeout"


class UpstreamRateLimited(UpstreamError):
    """A provider kept answering 429 (rate limit); ``retry_after`` is its hint when it gave one."""

    status = 429
    type = "rate_limit_error"
    default_code = "upstream_rate_limited"


class RemoteError(LeafwireError):
    """An error another service reported over NATS, with the status and fields it was sent with."""

    def __init__(self, status: int, response: ErrorResponse, retry_after: float | None = None) -> None:
        body = response.error
        super().__init__(body.message, param=body.param, code=body.code, retry_after=retry_after)
        self.status = status
        self.type = body.type
