"""Errors over HTTP: every failure leaves the gateway once, in OpenAI's error shape; and the body of a request,
read, decoded and parsed, or refused with a 4xx that says why before anything is sent to the site."""

from __future__ import annotations

import asyncio
import json
import math
import re
import zlib
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar

from aiohttp import hdrs, web
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from shared.envelope import new_request_id
from shared.errors import InvalidRequest, LeafwireError
from shared.logging import get_logger

log = get_logger("leafwire.gateway")

M = TypeVar("M", bound=BaseModel)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

REQUEST_ID = "x-request-id"
MAX_BODY = web.AppKey("max_body", int)  # bytes a request body may have
BODY_TIMEOUT_S = web.AppKey("body_timeout_s", float)  # seconds a request body may take to arrive
CODINGS = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}  # the Content-Encodings read (identity aside)
ACCEPTED = ", ".join(CODINGS)
NOT_JSON = ("We could not parse the JSON body of your request. (HINT: This likely means you aren't using your HTTP "
            "library correctly. The OpenAI API expects a JSON payload.)")


class UnsupportedEncoding(InvalidRequest):
    """A body in a Content-Encoding the gateway does not decode (415, with ``Accept-Encoding``, RFC 9110)."""

    status = 415
    default_code = "unsupported_content_encoding"


# Errors no retry can mend soon: only an operator (a provider key, the provider account's credit, a refused
# address) or the end of a budget's window can. OpenAI's clients retry every 5xx and 429 unless the answer says
# ``x-should-retry: false``: each retry would reach the provider, and its breaker, again for nothing. So do
# errors marked ``final``: a provider's failure the adapter already retried (a client's retries on top would
# multiply its calls), or one no retry mends (a redirect, an unexpected 4xx).
NOT_WORTH_RETRYING = frozenset({"upstream_auth_failed", "upstream_insufficient_quota", "destination_refused",
                                "budget_exceeded", "provider_key_missing", "upstream_proxy_auth_failed"})


def error_response(err: LeafwireError, headers: dict[str, str] | None = None) -> web.Response:
    """``err`` as an HTTP response (Retry-After included when the error carries one; ``x-should-retry:
    false`` when retrying cannot help)."""
    h = dict(headers or {})
    if err.retry_after is not None and math.isfinite(err.retry_after):
        h["Retry-After"] = str(max(1, math.ceil(err.retry_after)))
    if err.code in NOT_WORTH_RETRYING or err.final:
        h["x-should-retry"] = "false"
    return web.json_response(err.to_response().model_dump(), status=err.status, headers=h)


def too_large(limit: int) -> InvalidRequest:
    """The 413 of a body over ``limit`` bytes."""
    err = InvalidRequest(f"The request body is too large: the limit is {limit} bytes.", code="request_too_large")
    err.status = 413
    return err


def _http_error(exc: web.HTTPException, request: web.Request) -> LeafwireError:
    if isinstance(exc, web.HTTPNotFound):
        err = InvalidRequest(f"Unknown request URL: {request.method} {request.path}.", code="unknown_url")
    elif isinstance(exc, web.HTTPMethodNotAllowed):
        err = InvalidRequest(f"Method {request.method} is not allowed on {request.path}.",
                             code="method_not_allowed")
    elif isinstance(exc, web.HTTPRequestEntityTooLarge):
        return too_large(request.app[MAX_BODY])
    else:
        err = InvalidRequest(exc.reason or "bad request")
    err.status = exc.status
    return err


def _headers(exc: Exception) -> dict[str, str]:
    """The headers of an error the gateway answers itself: a fresh request id, as every answer has, and what
    tells the caller how to do better (``Allow`` of a 405, ``Accept-Encoding`` of a 415)."""
    headers = {REQUEST_ID: new_request_id()}
    if isinstance(exc, web.HTTPMethodNotAllowed):
        headers[hdrs.ALLOW] = exc.headers[hdrs.ALLOW]
    if isinstance(exc, UnsupportedEncoding):
        headers[hdrs.ACCEPT_ENCODING] = ACCEPTED
    return headers


@web.middleware
async def openai_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Map every failure to OpenAI's error shape; an unexpected one is logged and becomes a 500."""
    try:
        return await handler(request)
    except LeafwireError as err:
        return error_response(err, _headers(err))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_response(_http_error(exc, request), _headers(exc))
    except (ConnectionResetError, TimeoutError) as exc:
        raise exc
    except Exception as exc:
        headers = _headers(exc)
        log.exception("unhandled error", path=request.path, request_id=headers[REQUEST_ID])
        return error_response(LeafwireError("The server had an error while processing your request."), headers)


def _codings(request: web.Request) -> list[str]:
    """The body's content codings in the order they were applied; a 415 for one the gateway does not decode."""
    named = (c.strip().lower() for c in ",".join(request.headers.getall(hdrs.CONTENT_ENCODING, ())).split(","))
    codings = [c for c in named if c and c != "identity"]
    if unknown := [c for c in codings if c not in CODINGS]:
        raise UnsupportedEncoding(f"The request body's Content-Encoding {unknown[0]!r} is not supported: send the "
                                  f"body as is, or compressed with one of: {ACCEPTED}.")
    return codings


def _inflate(data: bytes, coding: str, limit: int) -> bytes:
    """``data`` decoded from ``coding``; a 413 past ``limit`` bytes (a small body may inflate to gigabytes)."""
    wbits = CODINGS[coding]
    if coding == "deflate" and data[:1] and data[0] & 0x0F != 8:
        wbits = -zlib.MAX_WBITS  # raw deflate, without the zlib wrapper: some clients send it so
    out = bytearray()
    while True:
        inflater = zlib.decompressobj(wbits)
        out += inflater.decompress(data, limit + 1 - len(out))
        if len(out) > limit:
            raise too_large(limit)
        if not inflater.eof:
            raise zlib.error("the compressed data ends early")
        data = inflater.unused_data
        if not data or coding != "gzip":  # gzip alone may hold several members, one after the other
            break
    if data:
        raise zlib.error("data follows the end of the compressed data")
    return bytes(out)


def _decode(data: bytes, codings: list[str], limit: int) -> bytes:
    for coding in reversed(codings):
        try:
            data = _inflate(data, coding, limit)
        except zlib.error as exc:
            raise InvalidRequest(f"The request body could not be decoded as {coding}, as its Content-Encoding "
                                 f"says it is ({exc}).", code="invalid_content_encoding") from exc
    return data


async def read_body(request: web.Request) -> bytes:
    """The request body, decoded from its Content-Encoding (off the event loop); a 408 when it does not arrive
    within the body timeout, a 413 over the body limit (compressed or not), a 415 for a coding the gateway does
    not decode, a 400 for a body it cannot decode."""
    codings = _codings(request)
    try:
        async with asyncio.timeout(request.app[BODY_TIMEOUT_S]):
            raw = await request.read()
    except TimeoutError as exc:
        err = InvalidRequest(f"The request body did not arrive within {request.app[BODY_TIMEOUT_S]:g} s.",
                             code="request_timeout")
        err.status = 408
        raise err from exc
    if not codings:
        return raw
    return await asyncio.to_thread(_decode, raw, codings, request.app[MAX_BODY])


def _encodable(value: str) -> bool:
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def _lone_surrogate(body: Any) -> str | None:
    """Where in ``body`` a string (or key) holds a lone UTF-16 surrogate, or ``None``. Walked without
    recursion: JSON may nest as deep as Python's parser went."""
    todo: list[tuple[str, Any]] = [("", body)]
    while todo:
        where, value = todo.pop()
        if isinstance(value, str) and not _encodable(value):
            return where or "(body)"
        if isinstance(value, dict):
            for key, item in reversed(value.items()):
                path = f"{where}.{key}" if where else key
                if not _encodable(key):
                    return path.encode("utf-8", "backslashreplace").decode()
                todo.append((path, item))
        elif isinstance(value, list):
            todo.extend((f"{where}.{i}" if where else str(i), item) for i, item in reversed(list(enumerate(value))))
    return None


def parse_json(raw: bytes) -> Any:
    """``raw`` parsed as JSON; a 400 when it is not JSON, nests too deep, or has a string no service could send
    on (a lone UTF-16 surrogate: ``"\\ud800"`` without its pair is no character, and has no UTF-8)."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidRequest(NOT_JSON) from exc
    except RecursionError as exc:
        raise InvalidRequest("Invalid JSON: the body nests arrays or objects too deeply.") from exc
    if (where := _lone_surrogate(body)) is not None:
        raise InvalidRequest(f"Invalid unicode at '{where}': a lone UTF-16 surrogate (a \\ud800-\\udfff escape "
                             "without its pair) is not a character. Send the character itself, or both escapes of "
                             "its surrogate pair.", param=where)
    return body


async def read_json(request: web.Request) -> Any:
    """The request body as JSON: the errors of ``read_body`` and ``parse_json``."""
    return parse_json(await read_body(request))


async def read_model(request: web.Request, model: type[M]) -> tuple[M, bytes]:
    """The request body as ``model``, and its bytes (what is sent on); the errors of ``read_json`` and
    ``validate``.

    A valid body is parsed once, straight from its bytes; only an invalid one takes the slower path that
    words the error."""
    raw = await read_body(request)
    try:
        return model.model_validate_json(raw), raw
    except ValidationError as exc:
        body = parse_json(raw)
        if (first := exc.errors()[0])["type"] == "json_invalid":  # JSON Python reads and no service can (UTF-16)
            raise InvalidRequest(f"{first['msg']}.") from exc
        return validate(model, body), raw


def validate(model: type[M], body: Any) -> M:
    """``body`` as ``model``; a 400 naming the first offending parameter otherwise."""
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise refusal(exc.errors()) from exc


_PARAM = re.compile(r"[a-z_][a-z0-9_]*")
_TYPES = {"str", "int", "float", "bool", "bytes"}
_PYTHON_WORDS = re.compile(r" or instance of \w+")  # "a valid dictionary or instance of ChatMessage": JSON has none


def _is_tag(part: int | str) -> bool:
    """Whether ``part`` of an error's location names a union's member (``str``, ``list[str]``, ``TextPart``,
    ``constrained-str``) rather than a parameter: OpenAI's parameters are snake_case words, and none is a
    type's name."""
    return isinstance(part, str) and (part in _TYPES or not _PARAM.fullmatch(part))


def _where(error: ErrorDetails) -> tuple[int | str, ...]:
    return tuple(p for p in error["loc"] if not _is_tag(p))


def _worst(errors: list[ErrorDetails]) -> ErrorDetails:
    """The error to report: the first; when it is one member of a union refusing the value, the member that
    got furthest (the list of parts the caller sent, not the string it did not), else the first past the
    type check (an empty list, not "Input should be a valid string")."""
    first = _where(errors[0])
    same = [e for e in errors if _where(e)[:len(first)] == first]
    return max(same, key=lambda e: (len(_where(e)), not e["type"].endswith("_type")))


def refusal(errors: Iterable[ErrorDetails]) -> InvalidRequest:
    """A validation failure as a 400 naming the offending parameter (``messages.0.content.1.text``)."""
    listed = list(errors)
    if not listed:
        return InvalidRequest("Invalid request.")
    worst = _worst(listed)
    param = ".".join(str(p) for p in _where(worst)) or None
    where = f" at '{param}'" if param else ""
    said = _PYTHON_WORDS.sub("", worst["msg"].removeprefix("Value error, "))
    return InvalidRequest(f"Invalid request{where}: {said}", param=param)
