"""Refusing private destinations at connect time: a resolver that drops non-public addresses.

The providers file is checked at start (``config.check_base_url``: IP literals and ``localhost``), but a
host name can resolve to a private address later (a changed DNS record, DNS rebinding). Sessions of
providers that are not marked ``local`` resolve through ``PublicOnlyResolver``, so every connection goes
to a public address or fails with ``DestinationRefused``, which is never retried.
"""

from __future__ import annotations

import socket

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

from services.cloud_adapter.config import is_public


class DestinationRefused(OSError):
    """A provider's host resolved only to private, loopback or link-local addresses."""

    def __init__(self, host: str, addresses: list[str]) -> None:
        super().__init__(f"{host} resolves to {', '.join(addresses) or 'nothing'}: private, loopback and "
                         "link-local destinations are refused for providers not marked local")
        self.host = host
        self.addresses = addresses


class PublicOnlyResolver(AbstractResolver):
    """Resolve with ``inner`` and keep only globally routable addresses."""

    def __init__(self, inner: AbstractResolver | None = None) -> None:
        self._inner = inner or DefaultResolver()

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        """The public addresses of ``host``; ``DestinationRefused`` when it has none."""
        found = await self._inner.resolve(host, port, family)
        public = [r for r in found if is_public(r["host"])]
        if not public:
            raise DestinationRefused(host, [r["host"] for r in found])
        return public

    async def close(self) -> None:
        """Release the inner resolver."""
        await self._inner.close()
