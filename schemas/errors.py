"""The error message: OpenAI's error shape, used over HTTP and as the ``error`` event on NATS."""

from __future__ import annotations

from pydantic import BaseModel


class ErrorBody(BaseModel):
    """What went wrong, in OpenAI's fields."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """``{"error": {...}}``; on NATS its status travels in the ``Lw-Status`` header."""

    error: ErrorBody
