"""cloud-adapter on NATS: admit chat and embeddings work for cloud models, answer cancels and roll calls,
announce models.

Admission answers the forwarding router on the message's own reply subject — ``admitted`` only once the
provider's first byte arrived (or the cache had the answer), else an error the router can act on. The
answer then goes straight to the caller's subject (``Lw-Reply``). A handed-off request (``Lw-Handoff``:
the router has no fallback for it) has nobody waiting for admission, and a refusal goes to the caller too.

Chat work is the hot path and is read with an ``Intake`` (``shared/intake.py``: a plain nats-py queue
subscription with FastStream's error contract), and embeddings work alike; cancels and roll calls are rare
and stay FastStream handlers.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

from faststream.nats import NatsBroker
from nats.aio.msg import Msg

from schemas.chat import ChatCompletionRequest
from schemas.embeddings import EmbeddingRequest
from services.cloud_adapter import config
from services.cloud_adapter.adapter import SERVICE, CloudAdapter
from services.cloud_adapter.config import Provider
from services.cloud_adapter.settings import CloudSettings
from services.cloud_adapter.state import CloudState
from shared import hub_usage, metrics, subjects
from shared.envelope import Envelope, admission_subject
from shared.errors import BadConfiguration
from shared.handling import ErrorReplies
from shared.heartbeat import announce, announce_every, subscribe_controls
from shared.intake import Handler, Intake
from shared.logging import get_logger, register_secret
from shared.nats import broker as make_broker
from shared.ops import Readiness
from shared.service import attach_broker
from shared.tasks import every

log = get_logger("leafwire.cloud_adapter")


CHAT_DOC = ("Chat work for cloud models `<provider>/<model>` (queue group `cloud-adapter`). Answers `admitted` "
            "on the message's reply subject once the provider's first byte arrived (or the cache had the answer), "
            "or an error; then streams the answer to the caller's subject given in the Lw-Reply header (first "
            "message: Lw-Cache hit/miss when the cache was consulted). With header Lw-Handoff (a router with no "
            "fallback for it), nothing is answered on the reply subject: a refusal goes to Lw-Reply too.")
EMBEDDINGS_DOC = ("Embeddings work for cloud embeddings models `<provider>/<model>` (queue group `cloud-adapter`), "
                  "handed off by routers (Lw-Handoff): one `result` (OpenAI's embeddings list) or one `error` on the "
                  "caller's subject given in the Lw-Reply header. Without Lw-Handoff, `admitted` (or an error) "
                  "first on the message's reply subject, once the provider answered.")


def sites_of(settings: CloudSettings) -> str:
    """The site token this adapter listens on: its own site, or every site for a hub adapter."""
    return subjects.ANY_SITE if settings.serves_all_sites else settings.site


def chat_handler(adapter: CloudAdapter) -> Handler[ChatCompletionRequest]:
    """Admit cloud chat work; the call itself runs in the background (the intake must not wait on it)."""

    async def on_chat(body: ChatCompletionRequest, msg: Msg, env: Envelope) -> None:
        env.require_reply()
        target = adapter.admit(body, env)
        admit_to = admission_subject(msg.headers, msg.reply)
        serve = (adapter.serve if (body.n or 1) == 1 else
                 adapter.serve_choices_stream if body.stream else adapter.serve_choices)
        adapter.start(serve(target, body, env, admit_to), env, target)

    return on_chat


def embeddings_handler(adapter: CloudAdapter) -> Handler[EmbeddingRequest]:
    """Admit cloud embeddings work; the call runs in the background, as chat's does."""

    async def on_embeddings(body: EmbeddingRequest, msg: Msg, env: Envelope) -> None:
        env.require_reply()
        target = adapter.admit(body, env, "embeddings")
        adapter.start(adapter.serve_embeddings(target, body, env, admission_subject(msg.headers, msg.reply)), env,
                      target)

    return on_embeddings


def document_intakes(broker: NatsBroker, settings: CloudSettings) -> None:
    """Declare the chat and embeddings subjects on a broker that only builds the AsyncAPI document (never
    started): at run time ``Intake``s read them."""

    @broker.subscriber(subjects.cloud_chat(sites_of(settings)), queue=subjects.CLOUD_QUEUE, no_reply=True,
                       title="cloud/chat", description=CHAT_DOC)
    async def on_chat(body: ChatCompletionRequest) -> None:  # pragma: no cover - documentation only
        raise NotImplementedError("documentation only: an Intake serves this subject")

    @broker.subscriber(subjects.cloud_embeddings(sites_of(settings)), queue=subjects.CLOUD_QUEUE, no_reply=True,
                       title="cloud/embeddings", description=EMBEDDINGS_DOC)
    async def on_embeddings(body: EmbeddingRequest) -> None:  # pragma: no cover - documentation only
        raise NotImplementedError("documentation only: an Intake serves this subject")


def build_broker(settings: CloudSettings, adapter: CloudAdapter) -> NatsBroker:
    """The FastStream app: cancels and roll calls (chat work: an ``Intake``)."""
    broker = make_broker(settings, SERVICE, middlewares=[ErrorReplies.for_service(settings.site, SERVICE)])
    subscribe_controls(broker, sites_of(settings), site=settings.site, cancel=adapter.cancel_message,
                       beat=adapter.heartbeat, title="cloud/",
                       cancel_doc="Stop a cloud request (its provider connection is closed).",
                       roll_call_doc="Announce the cloud models at once on the heartbeat subject.")
    return broker


def read_providers(settings: CloudSettings, text: str | None = None) -> tuple[config.ProvidersFile, list[Provider]]:
    """Validate the providers file (``text``, when it was read already) and read its keys (registered for log
    scrubbing)."""
    try:
        file, providers = config.load(settings.providers_file, require_keys=settings.env == "production", text=text)
    except (config.ConfigError, OSError) as exc:  # OSError: a file that is there but cannot be read
        raise BadConfiguration(exc.message if isinstance(exc, config.ConfigError) else
                               f"providers file {settings.providers_file}: {exc}") from exc
    for provider in providers:
        if provider.key is not None:
            register_secret(provider.key.get_secret_value())
        if provider.proxy_auth is not None:
            register_secret(provider.proxy_auth.get_secret_value())
            register_secret(provider.proxy_auth.get_secret_value().partition(":")[2])
        if provider.missing_key:
            log.warning("provider disabled until its key is there", provider=provider.spec.name,
                        reason=provider.missing_key)
    log.info("providers", providers={p.spec.name: sorted(p.spec.models) for p in providers},
             file=str(settings.providers_file))
    return file, providers


def load_adapter(settings: CloudSettings) -> CloudAdapter:
    """Validate the providers file and build the adapter."""
    return CloudAdapter(settings, *read_providers(settings))


def watched(settings: CloudSettings, adapter: CloudAdapter, text: str | None) -> list[Path]:
    """The files whose change means reading the providers file again: it (first), the running providers' key
    files, and those the file (its ``text`` as last read) names now (a file refused for a key file not there
    yet applies once it is)."""
    specs = [u.provider.spec for u in adapter.upstreams.values()]
    if text is not None:
        with contextlib.suppress(config.ConfigError):
            specs += config.parse(text).providers
    keys = {path for spec in specs for path in (spec.api_key_file, spec.proxy_auth_file) if path}
    return [settings.providers_file, *sorted(keys - {settings.providers_file})]


def read_text(path: Path) -> str | None:
    """A file's text; ``""`` when it is absent, ``None`` when it cannot be read."""
    try:
        return path.read_text() if path.is_file() else ""
    except (OSError, UnicodeDecodeError):
        return None


def stamp(paths: list[Path]) -> tuple[tuple[int, int, int] | None, ...]:
    """What says one of ``paths`` changed: each one's inode, size and modification time (``None``: absent).
    A Kubernetes ConfigMap or Secret update swaps a symlink: a new inode."""
    stamps: list[tuple[int, int, int] | None] = []
    for path in paths:
        try:
            st = path.stat()
        except OSError:
            stamps.append(None)
            continue
        stamps.append((st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(stamps)


async def reload_providers(adapter: CloudAdapter, settings: CloudSettings, text: str | None = None) -> bool:
    """Read the providers file again (or take its ``text``, read once by the caller) and apply it; an invalid
    one is refused, the running one kept. So is an absent or empty file (at start it means no providers; here
    it is more likely a file being written, or removed by mistake: to take every provider out, write
    ``providers: []``)."""
    try:
        if text is None:
            text = settings.providers_file.read_text() if settings.providers_file.is_file() else ""
        if not text.strip():
            raise BadConfiguration(f"providers file {settings.providers_file} is absent or empty (write "
                                   "`providers: []` to take every provider out)")
        file, providers = read_providers(settings, text)
    except (BadConfiguration, OSError, UnicodeDecodeError) as exc:
        metrics.PROVIDERS_RELOADS.labels("refused").inc()
        log.error("providers file not applied: the running providers stay", error=str(exc),
                  file=str(settings.providers_file))
        return False
    retired = await adapter.reconfigure(file, providers)
    for upstream in retired:
        adapter.retire(upstream)
    metrics.PROVIDERS_RELOADS.labels("applied").inc()
    log.info("providers file applied", replaced=sorted(u.name for u in retired), file=str(settings.providers_file))
    if adapter.nc is not None:
        with contextlib.suppress(Exception):  # the next beat says it anyway
            await announce(adapter.nc, settings.site, adapter.heartbeat())
    return True


async def keep_configured(adapter: CloudAdapter, settings: CloudSettings) -> None:
    """Apply the providers file again on SIGHUP, or when it or one of its key files changed (checked every
    ``LW_CLOUD_PROVIDERS_CHECK_S``)."""
    hangup = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGHUP, hangup.set)
    try:
        paths = watched(settings, adapter, read_text(settings.providers_file))
        seen = stamp(paths)
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(settings.providers_check_s or None):
                    await hangup.wait()
            now = stamp(paths)
            if hangup.is_set() or now != seen:
                hangup.clear()
                # The file is stamped before it is read, and read once: a change while it is applied is seen
                # at the next check, and the check for emptiness, the providers applied and the key files
                # watched all come from the same text. Its key files are stamped before they are read too: a
                # key file being written (truncated, then written) may be read empty, and its write must
                # still count as a change.
                before = stamp(paths[:1])
                text = read_text(settings.providers_file)
                keys = watched(settings, adapter, text)[1:]
                read_keys = dict(zip(keys, stamp(keys), strict=True))
                try:
                    await reload_providers(adapter, settings, text)
                except Exception:  # a bug must not stop the next reloads: said, and the next change is read
                    metrics.PROVIDERS_RELOADS.labels("refused").inc()
                    log.exception("providers file not applied: the running providers stay")
                paths = watched(settings, adapter, text)
                seen = before + tuple(read_keys.get(path, now) for path, now in
                                      zip(paths[1:], stamp(paths[1:]), strict=True))
    finally:
        loop.remove_signal_handler(signal.SIGHUP)


async def quiesce(intakes: list[Intake[Any]], broker: NatsBroker, adapter: CloudAdapter, grace_s: float) -> None:
    """Shutdown, first step: stop taking work, then let admitted answers finish."""
    for intake in intakes:
        await intake.stop()
    for sub in broker.subscribers:
        with contextlib.suppress(Exception):
            await sub.stop()
    await adapter.wait_for_answers(grace_s)


async def main(settings: CloudSettings, readiness: Readiness, stack: AsyncExitStack) -> None:
    """Load providers, open their sessions and the JetStream state, then take work from NATS."""
    adapter = load_adapter(settings)
    await adapter.open_upstreams()
    stack.push_async_callback(adapter.close_upstreams)
    broker = build_broker(settings, adapter)
    await attach_broker(broker, settings, SERVICE, readiness, stack)
    nc = broker.connection
    state = CloudState(nc, settings, adapter.ledger)
    adapter.nc, adapter.state = nc, state
    stack.push_async_callback(state.close, adapter.budget_alert)
    state.spawn(state.open())
    state.spawn(state.health_loop(adapter.healths, adapter.health_changed, adapter.resume_breaker))
    state.spawn(state.budget_loop(adapter.budget_alert, adapter.budget_metrics))
    state.spawn(state.rates_loop(adapter.rate_tallies, adapter.peers))
    state.spawn(announce_every(nc, settings.site, adapter.heartbeat, settings.heartbeat_s))
    state.spawn(keep_configured(adapter, settings))
    state.spawn(every(settings.keepalive_s / 5, adapter.keep_callers))
    state.spawn(hub_usage.keep_joined(nc, settings.site, settings.usage_hub_check_s,
                                      collected=(hub_usage.USAGE, hub_usage.BUDGETS)))
    readiness.add("jetstream", state.problem)
    sites = sites_of(settings)
    intakes: list[Intake[Any]] = [
        Intake(nc, subject=subjects.cloud_chat(sites), queue=subjects.CLOUD_QUEUE, model=ChatCompletionRequest,
               handler=chat_handler(adapter), site=settings.site, service=SERVICE),
        Intake(nc, subject=subjects.cloud_embeddings(sites), queue=subjects.CLOUD_QUEUE, model=EmbeddingRequest,
               handler=embeddings_handler(adapter), site=settings.site, service=SERVICE),
    ]
    for intake in intakes:
        await intake.start()
    stack.push_async_callback(quiesce, intakes, broker, adapter, settings.nats_drain_timeout_s)
