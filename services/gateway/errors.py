"""Errors over HTTP: every failure leaves the gateway once, in OpenAI's error shape."""

from __future__ import annotations

import json
import math
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from shared.errors import InvalidRequest, LeafwireError
from shared.handling import invalid_request
from shared.logging import get_logger

log = get_logger("leafwire.gateway")

M = TypeVar("M", bound=BaseModel)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(err: LeafwireError, headers: dict[str, str] | None = None) -> web.Response:
    """``err`` as an HTTP response (Retry-After included when the error carries one)."""
    h = dict(headers or {})
    if err.retry_after is not None and math.isfinite(err.retry_after):
        h["Retry-After"] = str(max(1, math.ceil(err.retry_after)))
    return web.json_response(err.to_response().model_dump(), status=err.status, headers=h)


def _http_error(exc: web.HTTPException, request: web.Request) -> LeafwireError:
    if isinstance(exc, web.HTTPNotFound):
        err = InvalidRequest(f"Unknown request URL: {request.method} {request.path}.", code="unknown_url")
    elif isinstance(exc, web.HTTPMethodNotAllowed):
        err = InvalidRequest(f"Method {request.method} is not allowed on {request.path}.",
                             code="method_not_allowed")
    elif isinstance(exc, web.HTTPRequestEntityTooLarge):
        err = InvalidRequest(f"The request body is too large: the limit is {request.app['max_body']} bytes.",
                             code="request_too_large")
    else:
        err = InvalidRequest(exc.reason or "bad request")
    err.status = exc.status
    return err


@web.middleware
async def openai_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Map every failure to OpenAI's error shape; an unexpected one is logged and becomes a 500."""
    try:
        return await handler(request)
    except LeafwireError as err:
        return error_response(err)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_response(_http_error(exc, request))
    except (ConnectionResetError, TimeoutError) as exc:
        raise exc
    except Exception:
        log.exception("unhandled error", path=request.path)
        return error_response(LeafwireError("The server had an error while processing your request."))


async def read_json(request: web.Request) -> Any:
    """The request body as JSON; 400 when it is not JSON, 413 when it is over the limit."""
    raw = await request.read()
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidRequest(
            "We could not parse the JSON body of your request. (HINT: This likely means you aren't using "
            "your HTTP library correctly. The OpenAI API expects a JSON payload.)") from exc


async def read_model(request: web.Request, model: type[M]) -> tuple[M, bytes]:
    """The request body as ``model``, and its bytes; the errors of ``read_json`` and ``validate``.

    A valid body is parsed once, straight from its bytes; only an invalid one takes the slower path that
    words the error."""
    raw = await request.read()
    try:
        return model.model_validate_json(raw), raw
    except ValidationError:
        return validate(model, await read_json(request)), raw


def validate(model: type[M], body: Any) -> M:
    """``body`` as ``model``; a 400 naming the first offending parameter otherwise."""
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise invalid_request(exc) from exc
