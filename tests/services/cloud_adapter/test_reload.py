"""Reloading the providers file in a running adapter (in this process): what is kept, what is replaced, what
is refused, and SIGHUP."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from services.cloud_adapter import app
from services.cloud_adapter.adapter import CloudAdapter
from services.cloud_adapter.settings import CloudSettings
from services.cloud_adapter.upstream import Upstream
from shared import metrics
from shared.errors import Overloaded

KEY_ENV = "LW_TEST_RELOAD_KEY"


def provider(name: str, models: dict[str, Any], **more: Any) -> dict[str, Any]:
    return {"name": name, "kind": "openai-compatible", "base_url": "http://127.0.0.1:9/v1", "local": True,
            "api_key_env": KEY_ENV, "models": models, **more}


def write(path: Path, providers: list[dict[str, Any]], **more: Any) -> None:
    path.write_text(json.dumps({"providers": providers, **more}))


def send(upstream: Upstream, model: str | None = None) -> None:
    """What a call that is sent does to the minutes: its slot taken (refused at a full minute), then counted as
    it goes out (``Upstream._post``)."""
    with upstream.slot(model):
        upstream.count(model)


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> CloudSettings:
    monkeypatch.setenv(KEY_ENV, "sk-reload-0123456789")
    file = tmp_path / "providers.yaml"
    write(file, [provider("a", {"m": {}}), provider("b", {"m": {}})],
          budgets={"tenants": {"acme": {"daily_usd": 10}}})
    return CloudSettings(LW_PROVIDERS_FILE=file, LW_CLOUD_PROVIDERS_CHECK_S=0)


async def test_unchanged_providers_keep_their_session_and_breaker(settings: CloudSettings) -> None:
    """Provider ``a`` unchanged keeps its upstream (its breaker's failures too); ``b`` changed gets a new one,
    the old one handed back to be closed; ``c`` is new; a tenant's spending is kept under its new limit."""
    adapter = app.load_adapter(settings)
    await adapter.open_upstreams()
    try:
        a, b = adapter.upstreams["a"], adapter.upstreams["b"]
        a.breaker.record(False, False)
        adapter.ledger.charge("acme", 4.0)
        write(settings.providers_file, [provider("a", {"m": {}}), provider("b", {"m": {}, "m2": {}}),
                                        provider("c", {"x": {}})], budgets={"tenants": {"acme": {"daily_usd": 3}}})
        assert await app.reload_providers(adapter, settings)
        assert adapter.upstreams["a"] is a
        assert a.breaker.consecutive_failures == 1
        assert adapter.upstreams["b"] is not b
        assert sorted(adapter.targets) == ["a/m", "b/m", "b/m2", "c/x"]
        assert adapter.targets["a/m"].upstream is a
        (daily,) = [acct for acct in adapter.ledger.accounts.values()
                    if acct.scope.endswith("acme") and acct.period == "daily"]
        assert (daily.pending, daily.limit) == (4.0, 3.0)
        assert adapter.heartbeat().cloud_models == ["a/m", "b/m", "b/m2", "c/x"]
        await asyncio.sleep(0.05)  # b had no call in flight: closed at once
        assert b._session is None
        for _ in range(10):  # the replaced breaker's last calls failing: not the provider's state any more
            b.breaker.record(False, False)
        assert b.breaker.state.value == "open"
        assert metrics.BREAKER_STATE.labels("b")._value.get() == 0
    finally:
        await adapter.close_upstreams()


async def test_a_changed_provider_keeps_its_minute_against_its_new_rpm(settings: CloudSettings) -> None:
    """rpm 3 and two calls made; the entry changed (a key rotated, the rpm lowered to 2): the minute's two calls
    still count, so the next call is refused at once, not let through by a count started afresh."""
    write(settings.providers_file, [provider("a", {"m": {}}, rpm=3), provider("b", {"m": {}})])
    adapter = app.load_adapter(settings)
    await adapter.open_upstreams()
    try:
        for _ in range(2):
            send(adapter.upstreams["a"])
        write(settings.providers_file, [provider("a", {"m": {}}, rpm=2, max_concurrent=8), provider("b", {"m": {}})])
        assert await app.reload_providers(adapter, settings)
        with pytest.raises(Overloaded) as exc:
            adapter.upstreams["a"].slot()
        assert "its rpm (2)" in exc.value.message
        write(settings.providers_file, [provider("a", {"m": {}}, rpm=5), provider("b", {"m": {}})])
        assert await app.reload_providers(adapter, settings)
        send(adapter.upstreams["a"])  # room again under the higher limit
    finally:
        await adapter.close_upstreams()


async def test_a_models_rpm_beside_the_providers(settings: CloudSettings) -> None:
    """Provider rpm 2, its model ``big`` rpm 1: a call refused at the model's limit is counted in neither
    minute (``small`` still gets the provider's second call); then the provider's limit refuses ``small``. A
    reload keeps the model's minute too."""
    write(settings.providers_file, [provider("a", {"big": {"rpm": 1}, "small": {}}, rpm=2), provider("b", {"m": {}})])
    adapter = app.load_adapter(settings)
    await adapter.open_upstreams()
    try:
        a = adapter.upstreams["a"]
        send(a, "big")
        with pytest.raises(Overloaded) as exc:
            a.slot("big")
        assert "model big of provider a" in exc.value.message
        send(a, "small")
        with pytest.raises(Overloaded) as exc:
            a.slot("small")
        assert exc.value.message.startswith("provider a had 2 calls")
        write(settings.providers_file, [provider("a", {"big": {"rpm": 1}, "small": {}}, rpm=5),
                                        provider("b", {"m": {}})])
        assert await app.reload_providers(adapter, settings)
        with pytest.raises(Overloaded) as exc:
            adapter.upstreams["a"].slot("big")
        assert "its rpm (1)" in exc.value.message
        send(adapter.upstreams["a"], "small")
    finally:
        await adapter.close_upstreams()


async def test_a_models_limit_taken_out_and_put_back_keeps_its_minute(settings: CloudSettings) -> None:
    """QA 22: ``big``'s rpm 1 used, then taken out of the file and put back within the minute: the call made
    still counts, as the provider's own would."""
    write(settings.providers_file, [provider("a", {"big": {"rpm": 1}}), provider("b", {"m": {}})])
    adapter = app.load_adapter(settings)
    await adapter.open_upstreams()
    try:
        send(adapter.upstreams["a"], "big")
        for big in ({}, {"rpm": 1}):
            write(settings.providers_file, [provider("a", {"big": big}), provider("b", {"m": {}})])
            assert await app.reload_providers(adapter, settings)
        with pytest.raises(Overloaded):
            adapter.upstreams["a"].slot("big")
    finally:
        await adapter.close_upstreams()


async def test_an_invalid_file_changes_nothing(settings: CloudSettings) -> None:
    """A file that does not validate is refused: the same upstreams and targets stay."""
    adapter = app.load_adapter(settings)
    await adapter.open_upstreams()
    try:
        before = dict(adapter.upstreams)
        settings.providers_file.write_text('{"providers": [{"name": "a", "kind": "nope"}]}')
        assert not await app.reload_providers(adapter, settings)
        assert adapter.upstreams == before
        assert sorted(adapter.targets) == ["a/m", "b/m"]
    finally:
        await adapter.close_upstreams()


async def test_a_replaced_provider_is_closed_once_its_requests_end(settings: CloudSettings) -> None:
    """A changed provider with a request admitted keeps its session until that request has ended."""
    adapter = app.load_adapter(settings)
    await adapter.open_upstreams()
    try:
        b = adapter.upstreams["b"]
        b.hold()  # a request admitted for it
        write(settings.providers_file, [provider("a", {"m": {}}), provider("b", {"m": {"upstream": "other"}})])
        assert await app.reload_providers(adapter, settings)
        await asyncio.sleep(0.05)
        assert b._session is not None  # its request goes on
        b.unhold()
        await asyncio.sleep(0.05)
        assert b._session is None
    finally:
        await adapter.close_upstreams()


async def test_sighup_applies_the_file(settings: CloudSettings) -> None:
    """With no periodic check (``LW_CLOUD_PROVIDERS_CHECK_S=0``), SIGHUP applies the file."""
    adapter: CloudAdapter = app.load_adapter(settings)
    await adapter.open_upstreams()
    keeping = asyncio.create_task(app.keep_configured(adapter, settings))
    try:
        await asyncio.sleep(0.05)
        write(settings.providers_file, [provider("a", {"m": {}, "new": {}})])
        await asyncio.sleep(0.2)
        assert sorted(adapter.targets) == ["a/m", "b/m"]  # not checked: only told
        os.kill(os.getpid(), signal.SIGHUP)
        for _ in range(100):
            if sorted(adapter.targets) == ["a/m", "a/new"]:
                break
            await asyncio.sleep(0.02)
        assert sorted(adapter.targets) == ["a/m", "a/new"]
    finally:
        keeping.cancel()
        await asyncio.gather(keeping, return_exceptions=True)
        await adapter.close_upstreams()


async def test_a_key_file_written_while_it_is_read_is_read_again(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A key file rewritten (truncated, then written, as ``write_text`` and many tools do) can be read
    between the two: the key is then missing. Its write, landing while the file is applied, is still a
    change: the file is applied again and the key read (seen in CI as a rotated key never used)."""
    key = tmp_path / "key"
    key.write_text("sk-old-0123456789\n")
    file = tmp_path / "providers.yaml"
    keyed = {**provider("a", {"m": {}}), "api_key_file": str(key)}
    del keyed["api_key_env"]
    write(file, [keyed])
    settings = CloudSettings(LW_PROVIDERS_FILE=file, LW_CLOUD_PROVIDERS_CHECK_S=0.02)
    adapter = app.load_adapter(settings)
    applied = app.reload_providers
    read: list[str] = []

    async def reload_as_the_key_is_written(adapter: CloudAdapter, settings: CloudSettings,
                                           text: str | None = None) -> bool:
        read.append(key.read_text())
        if len(read) == 1:
            key.write_text("sk-new-0123456789\n")  # the rest of the write lands while the file is applied
        return await applied(adapter, settings, text)

    monkeypatch.setattr(app, "reload_providers", reload_as_the_key_is_written)
    await adapter.open_upstreams()
    keeping = asyncio.create_task(app.keep_configured(adapter, settings))
    try:
        await asyncio.sleep(0.05)
        key.write_text("")  # truncated: what a reader between the two steps of a rewrite sees
        for _ in range(100):
            if len(read) >= 2:
                break
            await asyncio.sleep(0.02)
        assert read[:2] == ["", "sk-new-0123456789\n"]
        assert adapter.upstreams["a"].provider.key is not None
        assert adapter.upstreams["a"].provider.key.get_secret_value() == "sk-new-0123456789"
    finally:
        keeping.cancel()
        await asyncio.gather(keeping, return_exceptions=True)
        await adapter.close_upstreams()
