"""Every NATS subject and stream name leafwire uses. Nothing else in the project spells a subject.

Layout: ``lw.v1.<site>.<what>``. ``<site>`` is an edge site id (``[a-z0-9_-]``, also its JetStream domain)
or ``hub`` for cloud-wide work. Work that may run on the hub when the site has no worker for it is
subscribed by edge workers on their own site and by hub workers on every site (``*``) in the same queue
group: NATS prefers the local member, so the edge answers first and the hub takes over when the edge has
none.
"""

from __future__ import annotations

import hashlib
import re

PREFIX = "lw.v1"
HUB = "hub"
ANY_SITE = "*"

_SITE_RE = re.compile(r"^[a-z0-9_-]{1,64}$")
_TOKEN_UNSAFE = re.compile(r"[^A-Za-z0-9_{}-]")  # {braces} only appear in documented templates
_KV_SAFE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def check_site(site: str) -> str:
    """Return ``site`` if it is a valid site id (also used as a JetStream domain), else raise ValueError."""
    if not _SITE_RE.fullmatch(site):
        raise ValueError(f"site id {site!r} must match [a-z0-9_-]{{1,64}}")
    return site


def token(name: str) -> str:
    """Make ``name`` safe as one subject token: ``.`` ``*`` ``>`` and spaces become ``_``."""
    return _TOKEN_UNSAFE.sub("_", name)


def chat(site: str) -> str:
    """Chat requests entering a site (the router listens, queue ``router``)."""
    return f"{PREFIX}.{site}.chat"


def models(site: str) -> str:
    """Request/reply: the models a site can serve, with where they run."""
    return f"{PREFIX}.{site}.models"


def cancel(site: str) -> str:
    """Broadcast: stop generating for a request id (every worker on the site listens)."""
    return f"{PREFIX}.{site}.cancel"


def infer_chat(site: str, model: str) -> str:
    """Chat work for one local model (local-inference workers, queue ``infer.<model>``)."""
    return f"{PREFIX}.{site}.infer.{token(model)}.chat"


def infer_embeddings(site: str, model: str) -> str:
    """Embeddings work for one local model when no batcher runs (workers, queue ``infer.<model>``)."""
    return f"{PREFIX}.{site}.infer.{token(model)}.embeddings"


def embeddings(site: str) -> str:
    """Embeddings requests entering a site (the router listens, queue ``router``)."""
    return f"{PREFIX}.{site}.embeddings"


def batch(site: str, model: str, kind: str) -> str:
    """Work of one kind (``chat``, ``embeddings``) for one model, handed by the router to the site's batcher."""
    return f"{PREFIX}.{site}.batch.{token(model)}.{kind}"


def batch_any(site: str, kind: str) -> str:
    """Every model's work of one kind on a site (the batcher listens, queue ``batcher``)."""
    return f"{PREFIX}.{site}.batch.*.{kind}"


BATCHER_QUEUE = "batcher"


def worker_batch(site: str, worker_id: str, kind: str) -> str:
    """A batch handed to one worker by a batcher (request/reply: admitted, or busy)."""
    return f"{PREFIX}.{site}.workers.{token(worker_id)}.batch.{kind}"


def worker_status(site: str, worker_id: str) -> str:
    """Request/reply: the requests one worker is still answering; no responders = the worker is gone."""
    return f"{PREFIX}.{site}.workers.{token(worker_id)}.status"


def infer_queue(model: str) -> str:
    """The queue group shared by every worker, edge or hub, that serves ``model``."""
    return f"infer.{token(model)}"


def cloud_chat(site: str) -> str:
    """Chat work for cloud models ``<provider>/<model>`` (cloud-adapters, queue ``cloud-adapter``)."""
    return f"{PREFIX}.{site}.cloud.chat"


def cloud_embeddings(site: str) -> str:
    """Embeddings work for cloud models ``<provider>/<model>`` (cloud-adapters, queue ``cloud-adapter``)."""
    return f"{PREFIX}.{site}.cloud.embeddings"


CLOUD_QUEUE = "cloud-adapter"


def usage(site: str) -> str:
    """One ``UsageEvent`` per cloud call (kept by the site's ``USAGE`` stream)."""
    return f"{PREFIX}.{site}.usage.events"


def budget_alerts(site: str) -> str:
    """A ``BudgetStatus`` each time a budget crosses its warning level or is spent (``USAGE`` stream)."""
    return f"{PREFIX}.{site}.usage.budget"


def usage_filter(site: str) -> str:
    """Everything the site's ``USAGE`` stream keeps."""
    return f"{PREFIX}.{site}.usage.>"


def heartbeat(site: str) -> str:
    """Workers announce themselves, their models and their load here every few seconds."""
    return f"{PREFIX}.{site}.workers.heartbeat"


def roll_call(site: str) -> str:
    """Broadcast asking every worker to announce itself at once (sent by a router when it starts)."""
    return f"{PREFIX}.{site}.workers.roll_call"


def dead_letter(site: str, service: str) -> str:
    """Poisoned messages a service could not process, kept in the ``DEAD_LETTERS`` stream."""
    return f"{PREFIX}.{site}.dlq.{token(service)}"


def dead_letter_filter(site: str) -> str:
    """Every dead letter of a site."""
    return f"{PREFIX}.{site}.dlq.>"


READERS = "_INBOX.lw."
"""Reply subjects under here belong to leafwire's own reply readers (``shared.replies.ReplyReader``), which
skip ``progress`` events; a NATS client's own inbox (``nc.request``) never gets one."""


def reply_prefix(owner: str) -> str:
    """Inbox prefix for a process that reads reply streams (a gateway, a NATS client)."""
    return f"{READERS}{token(owner)}"


# Stream names, after what they hold.
DEAD_LETTERS = "DEAD_LETTERS"
USAGE = "USAGE"

# KV buckets (in the JetStream domain of the site whose cloud-adapter writes them).
PROVIDER_HEALTH = "provider-health"
"""key: the provider name; value: ``schemas.cloud.ProviderHealth``"""
PROVIDER_RATES = "provider-rates"
"""key: ``<provider>.<worker id>``; value: ``schemas.cloud.ProviderRate`` (one adapter's last minute of a provider
with ``rpm`` or ``tpm``, which the site's other adapters add to their own)"""
BUDGETS = "budgets"
"""key: ``budget_key(scope, period, site)``; value: ``schemas.cloud.BudgetStatus``. Each site's holds its own
spending; the hub's also holds every edge's (sourced), and each edge mirrors the hub's as ``HUB_BUDGETS``."""
HUB_BUDGETS = "HUB_BUDGETS"
"""An edge site's read-only mirror of the hub's ``budgets`` bucket stream: every site's spending, readable offline."""
HUB_PROVIDER_HEALTH = "HUB_PROVIDER_HEALTH"
"""An edge site's read-only mirror of the hub's ``provider-health`` bucket stream: the breakers of the hub's
cloud-adapters, which take the site's cloud requests where it has no adapter of its own (made by its router)."""
CLOUD_CACHE = "cloud-cache"
"""key: ``<tenant hash>.<request hash>`` (see services/cloud_adapter/cache.py); value: a cached answer"""

GLOBAL_SCOPE = "global"


def tenant_scope(tenant: str) -> str:
    """The budget scope of a tenant: ``tenant-<tenant>``, or ``tenant-sha-<hash>`` when the tenant name
    holds characters a KV key cannot (anything but ``[A-Za-z0-9_-]``, or longer than 64)."""
    if _KV_SAFE.fullmatch(tenant):
        return f"tenant-{tenant}"
    return f"tenant-sha-{hashlib.sha256(tenant.encode()).hexdigest()[:16]}"


def budget_key(scope: str, period: str, site: str) -> str:
    """The ``budgets`` KV key of what ``site`` spent in a scope (``global`` or ``tenant_scope(...)``) and period
    (daily, monthly)."""
    return f"{scope}.{period}.{site}"


def route_dry_run(site: str) -> str:
    """Request/reply: the routing decision for a chat request, without running it."""
    return f"{PREFIX}.{site}.route.dry_run"


def policy_events(site: str) -> str:
    """The router announces accepted and rejected policy reloads here."""
    return f"{PREFIX}.{site}.router.policy"


def js_api(domain: str) -> str:
    """The JetStream API of the domain ``domain`` (a site id, or ``hub``), reachable from any connected server."""
    return f"$JS.{domain}.API"


HUB_JS_API = js_api(HUB)
"""The hub's JetStream API seen from any site (a leaf maps it across the leaf connection)."""
HUB_JS_API_INFO = f"{HUB_JS_API}.INFO"  # answered by the hub's JetStream only while the uplink is up


def kv_stream(bucket: str) -> str:
    """The JetStream stream that holds a KV bucket."""
    return f"KV_{bucket}"


def kv_put_subject(bucket: str, key: str, *, via_hub: bool) -> str:
    """The subject a KV write of ``bucket``/``key`` is published on; ``via_hub`` reaches the hub's bucket from
    any server of the hub's JetStream domain or of a leaf site (nats-py's KV puts cannot: they publish on the
    bare ``$KV`` subject, which an edge does not forward to the hub)."""
    bare = f"$KV.{bucket}.{key}"
    return f"{HUB_JS_API}.{bare}" if via_hub else bare


# The config bucket: owned by the hub (JetStream domain ``hub``), mirrored into every edge site's domain
# (read-only there, readable offline). A standalone server without a JetStream domain keeps its own.
CONFIG_BUCKET = "config"
POLICY_KEY = "router.policy"
"""the routing policy of every site (YAML, see services/router/policy.py)"""
ROUTER_KEYS = "router.>"
"""every key of the config bucket a router reads"""


def site_policy_key(site: str) -> str:
    """The routing policy of one site, which overrides ``POLICY_KEY`` there."""
    return f"{POLICY_KEY}.{check_site(site)}"
