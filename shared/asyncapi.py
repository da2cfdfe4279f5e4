"""The AsyncAPI document of leafwire's NATS API, generated from the FastStream apps.

    python -m shared.asyncapi docs/asyncapi.json

Subjects are shown with ``{site}`` and ``{model}`` placeholders. What FastStream cannot see is described
in ``docs/nats-api.md``: the reply stream (events on the caller's reply subject) and request/reply answers.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from faststream.specification import AsyncAPI

from services.batcher.app import build_broker as batcher_broker
from services.batcher.pool import WorkerPool
from services.batcher.scheduler import Batcher
from services.batcher.settings import BatcherSettings
from services.batcher.transport import NatsTransport
from services.cloud_adapter.adapter import CloudAdapter
from services.cloud_adapter.app import build_broker as cloud_broker
from services.cloud_adapter.app import document_intakes
from services.cloud_adapter.config import ProvidersFile
from services.cloud_adapter.settings import CloudSettings
from services.local_inference.app import Worker
from services.local_inference.app import build_broker as inference_broker
from services.local_inference.settings import InferenceSettings
from services.router.app import build_broker as router_broker
from services.router.catalog import Catalog
from services.router.masking import Masker
from services.router.policy import Policy
from services.router.settings import RouterSettings
from services.router.state import LiveState

TITLE = "leafwire NATS API"
VERSION = "v1"
DESCRIPTION = (
    "Subjects of leafwire. A chat request published on lw.v1.{site}.chat with a reply subject is answered "
    "on that reply subject by a stream of events named in the Lw-Event header: chunk (an OpenAI "
    "chat.completion.chunk), done (StreamEnd), result (an OpenAI chat.completion, for stream=false) or "
    "error (an OpenAI error object, status in Lw-Status). See docs/nats-api.md."
)


def document() -> str:
    """The AsyncAPI 3.0 document as JSON text."""
    router = RouterSettings.model_construct(site="{site}")
    inference = InferenceSettings.model_construct(site="{site}")
    cloud = CloudSettings.model_construct(site="{site}", serve_all_sites=False)
    batcher = BatcherSettings.model_construct(site="{site}")
    brokers = [
        router_broker(router, LiveState(Catalog("{site}"), Policy(), Masker(())), document_intakes=True),
        batcher_broker(batcher, Batcher(batcher, WorkerPool("{site}"), NatsTransport(batcher))),
        inference_broker(inference, Worker(inference, {}, worker_id="{worker_id}"), ["{model}"], ["{model}"]),
        cloud_broker(cloud, CloudAdapter(cloud, ProvidersFile(), [])),
    ]
    document_intakes(brokers[-1], cloud)
    spec = AsyncAPI(*brokers, title=TITLE, version=VERSION, description=DESCRIPTION).to_specification()
    return json.dumps(json.loads(spec.to_json()), indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/asyncapi.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(document())
    print(f"wrote {out}")
