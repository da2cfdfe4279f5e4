"""``POST /v1/completions`` requests: what the legacy text-completions body may hold, what of it the site
cannot honour (refused with a 400 naming it), and the chat requests that answer it.

Each prompt becomes a chat request whose one user message holds it, sent down the chat path unchanged
(routing, aliases, ``auto``, local and cloud models alike), as LiteLLM and Ollama answer text completions with
chat models. A list of prompts, or ``n`` > 1, becomes one chat request per choice: choice ``i * n + j`` is
prompt ``i``'s ``j``-th, as OpenAI numbers them. With a ``seed``, choice ``j`` of a prompt is sampled with
``seed + j``: the ``n`` samples differ, as OpenAI's and vLLM's do, and choice 0 is what the same request with
``n: 1`` gets.
"""

from __future__ import annotations

from collections import Counter
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt

from schemas.chat import MAX_CHOICES, ChatCompletionRequest, ChatMessage, StreamOptions, choice_seed
from services.gateway.choices import Choice, choice_env
from services.gateway.errors import validate
from shared.envelope import Envelope
from shared.errors import InvalidRequest

DEFAULT_MAX_TOKENS = 16  # OpenAI's for this endpoint, and vLLM's: a caller's code written for either gets it
COMPLETION_ONLY = frozenset({"prompt", "n", "best_of", "echo", "suffix", "logprobs"})  # never sent to the site

TokenIds = Annotated[list[StrictInt], Field(min_length=1)]


class CompletionRequest(BaseModel):
    """The body of ``POST /v1/completions``. Parameters shared with chat (``temperature``, ``stop``, ``seed``,
    ``logit_bias``, ``user``...) are kept as extras and checked by the chat request they go on in."""

    model_config = ConfigDict(extra="allow")
    model: Annotated[str, Field(min_length=1, max_length=256)]
    prompt: str | Annotated[list[str], Field(min_length=1)] | TokenIds | Annotated[list[TokenIds], Field(min_length=1)]
    max_tokens: Annotated[StrictInt | None, Field(ge=1)] = None  # None: DEFAULT_MAX_TOKENS
    n: Annotated[StrictInt | None, Field(ge=1, le=MAX_CHOICES)] = None
    best_of: Annotated[StrictInt | None, Field(ge=1)] = None
    echo: StrictBool | None = None
    suffix: str | None = None
    logprobs: Annotated[StrictInt | None, Field(ge=0)] = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None

    def prompts(self) -> list[str]:
        """The prompts as text (token ids were refused by ``refuse_unsupported``)."""
        return [self.prompt] if isinstance(self.prompt, str) else [p for p in self.prompt if isinstance(p, str)]

    def choices_per_prompt(self) -> int:
        """``n``: how many choices each prompt gets."""
        return self.n or 1

    def include_usage(self) -> bool:
        """Whether a streamed answer ends with a usage chunk."""
        return self.stream and self.stream_options is not None and self.stream_options.include_usage


def unsupported(param: str, why: str) -> InvalidRequest:
    """The 400 of a parameter the site cannot honour (the code local models use for theirs)."""
    return InvalidRequest(why, param=param, code="unsupported_parameter")


def refuse_unsupported(request: CompletionRequest) -> None:
    """A 400 naming the first parameter that asks for what the chat path cannot give, rather than an answer
    that quietly lacks it."""
    if not isinstance(request.prompt, str) and not all(isinstance(p, str) for p in request.prompt):
        raise unsupported("prompt", "Token-id prompts (a list of integers, or a list of lists of them) are not "
                                    "supported: send the prompt as text, a string or a list of strings.")
    if request.suffix:
        raise unsupported("suffix", "suffix is not supported: models here complete after the prompt only (no "
                                    "fill-in-the-middle). Leave it out, or send null.")
    if request.logprobs is not None:
        raise unsupported("logprobs", "logprobs is not supported: answers here carry no log probabilities. Leave "
                                      "it out, or send null.")
    n = request.choices_per_prompt()
    if request.best_of is not None and request.best_of < n:
        raise InvalidRequest(f"best_of ({request.best_of}) must be greater than or equal to n ({n}).",
                             param="best_of")
    if request.best_of is not None and request.best_of > n:
        raise unsupported("best_of", "best_of greater than n is not supported: choosing the best answers needs "
                                     "log probabilities, which answers here do not carry. Ask for n choices "
                                     "instead, or leave best_of out.")
    if len(request.prompts()) * n > MAX_CHOICES:
        raise InvalidRequest(f"A request may ask for at most {MAX_CHOICES} choices (prompts × n); this one asks "
                             f"for {len(request.prompts()) * n}. Send the prompts in several requests.",
                             param="n" if n > 1 else "prompt")


def as_chat(request: CompletionRequest) -> ChatCompletionRequest:
    """The chat request every choice is a copy of (with its own prompt and seed); a 400 naming the parameter
    the chat path refuses (``temperature`` out of range, a fifth stop sequence...)."""
    body: dict[str, Any] = request.model_dump(exclude_unset=True, exclude=set(COMPLETION_ONLY))
    # chat's newer name for the limit, if a caller sends it here, is the limit (never both: OpenAI refuses both)
    limit = request.max_tokens or body.pop("max_completion_tokens", None) or DEFAULT_MAX_TOKENS
    body |= {"messages": [{"role": "user", "content": ""}], "max_tokens": limit}
    return validate(ChatCompletionRequest, body)


def with_n(request: CompletionRequest) -> ChatCompletionRequest:
    """The chat request of a lone prompt's ``n`` choices asked at once (``n`` kept, the seed as given)."""
    chat = as_chat(request)
    return chat.model_copy(update={"messages": [ChatMessage(role="user", content=request.prompts()[0])],
                                   "n": request.choices_per_prompt()})


def plan(request: CompletionRequest, env: Envelope) -> list[Choice]:
    """The chat requests that answer ``request``, one per choice, in index order. A lone choice has the
    request's own envelope (its id is the one the caller sees); several have ids ``<id>-<index>``."""
    refuse_unsupported(request)
    chat = as_chat(request)
    n = request.choices_per_prompt()
    prompts = request.prompts()
    choices = []
    asked: Counter[str] = Counter()  # the samples of a prompt given twice are numbered on (their cache entries)
    for i, prompt in enumerate(prompts):
        base = chat.model_copy(update={"messages": [ChatMessage(role="user", content=prompt)]}).model_dump_json(
            exclude_unset=True, exclude={"seed"}).encode()  # one copy that the prompt's choices share
        before = asked[prompt]
        asked[prompt] += n
        for j in range(n):
            index = i * n + j
            choices.append(Choice(index, base, choice_env(env, index, len(prompts) * n, before + j),
                                  choice_seed(chat.seed, j)))
    return choices
