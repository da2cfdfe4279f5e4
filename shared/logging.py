"""JSON logs through structlog, with the request id, tenant and subject bound where known.

``configure()`` is called once at start-up; nothing is configured at import. Third-party loggers
(FastStream, aiohttp, nats) go through the same renderer, so every line is one JSON object.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any

import structlog

SECRET_KEYS = frozenset({"api_key", "authorization", "password", "token", "secret", "x-api-key", "key",
                         "api-key", "proxy-authorization", "cookie", "set-cookie"})
REDACTED = "[redacted]"
_MIN_SECRET_LEN = 4  # shorter is no secret, and would blank out ordinary words
_WHOLE_BELOW = 8  # a shorter secret is replaced only as a whole token: "test1" is, "latest1" is not touched
_secret_values: set[str] = set()
_short_secrets: set[str] = set()
_short_pattern: re.Pattern[str] | None = None


def register_secret(value: str) -> None:
    """Never log ``value``: it is replaced wherever it appears in a log line (messages, tracebacks...).

    For credentials the service holds (provider API keys, a local server's short ``--api-key`` too): from 8
    characters on wherever it appears, from 4 as a whole token (not inside a longer word or key, which
    scrubbing would mangle); a value shorter than 4 characters is ignored.
    """
    global _short_pattern
    if len(value) >= _WHOLE_BELOW:
        _secret_values.add(value)
    elif len(value) >= _MIN_SECRET_LEN and value not in _short_secrets:
        _short_secrets.add(value)
        alternatives = "|".join(re.escape(s) for s in sorted(_short_secrets, key=len, reverse=True))
        _short_pattern = re.compile(rf"(?<![\w-])(?:{alternatives})(?![\w-])")


def scrub(text: str) -> str:
    """``text`` with every registered secret replaced."""
    for secret in _secret_values:
        if secret in text:
            text = text.replace(secret, REDACTED)
    if _short_pattern is not None:
        text = _short_pattern.sub(REDACTED, text)
    return text


def _scrub_value(value: Any, depth: int = 0) -> Any:
    if isinstance(value, str):
        return scrub(value)
    if depth < 3 and isinstance(value, Mapping):
        return {k: _scrub_value(v, depth + 1) for k, v in value.items()}
    if depth < 3 and isinstance(value, list | tuple):
        return [_scrub_value(v, depth + 1) for v in value]
    if isinstance(value, BaseException):
        return scrub(repr(value))
    return value


def scrub_secret_values(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Replace registered secret values anywhere in the event, including a rendered traceback."""
    if _secret_values or _short_pattern is not None:
        for key in list(event_dict):
            event_dict[key] = _scrub_value(event_dict[key])
    return event_dict


def redact_secrets(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Replace values of keys that hold secrets (API keys, tokens) before anything is rendered."""
    for key in list(event_dict):
        if key.lower() in SECRET_KEYS:
            event_dict[key] = REDACTED
        elif isinstance(event_dict[key], Mapping):
            event_dict[key] = {k: (REDACTED if str(k).lower() in SECRET_KEYS else v)
                               for k, v in event_dict[key].items()}
    return event_dict


def _shared_processors(service: str) -> list[Any]:
    def add_service(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        event_dict.setdefault("service", service)
        return event_dict

    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        add_service,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        redact_secrets,
    ]


_root_level = logging.INFO


class LeveledLogger(structlog.stdlib.BoundLogger):
    """structlog's stdlib logger, returning at once for debug and info events below the root level.

    Hot paths log a line per request at debug or info; with the service at ``warning`` each such call
    would still copy the context and raise and catch ``DropEvent`` in ``filter_by_level`` (kept for
    loggers set above the root level, like FastStream's).
    """

    def debug(self, event: str | None = None, *args: Any, **kw: Any) -> Any:
        if _root_level > logging.DEBUG:
            return None
        return super().debug(event, *args, **kw)

    def info(self, event: str | None = None, *args: Any, **kw: Any) -> Any:
        if _root_level > logging.INFO:
            return None
        return super().info(event, *args, **kw)


def configure(service: str, level: str = "info") -> None:
    """Send structlog and stdlib logging to stderr as JSON lines, at ``level``."""
    shared = _shared_processors(service)
    structlog.configure(
        # Events below the logger's level are dropped first, before any processor runs: hot paths log
        # at debug, and FastStream logs every message at info through a logger set to warning.
        processors=[structlog.stdlib.filter_by_level, *shared, structlog.processors.format_exc_info,
                    structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=LeveledLogger,
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.format_exc_info,
                    scrub_secret_values,
                    structlog.processors.JSONRenderer()],
    ))
    global _root_level
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    _root_level = root.level
    for noisy in ("faststream", "faststream.access", "aiohttp.access"):
        logger = logging.getLogger(noisy)
        logger.setLevel(max(logging.WARNING, root.level))
        if noisy.startswith("faststream"):  # its own coloured plain-text handler, set up at import: JSON too
            logger.handlers.clear()
            logger.propagate = True


def bind_request(request_id: str, tenant: str, subject: str | None = None) -> None:
    """Bind the request's identity to every log line of the current task."""
    structlog.contextvars.bind_contextvars(request_id=request_id, tenant=tenant,
                                           **({"subject": subject} if subject else {}))


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    """A logger for ``name``."""
    return structlog.stdlib.get_logger(name)
