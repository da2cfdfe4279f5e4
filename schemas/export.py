"""Write the JSON Schema of every message to a folder: ``python -m schemas.export schemas/json``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pydantic import BaseModel

from schemas.batch import BatchAnswer, ChatBatch, EmbeddingsBatch, WorkerStatus
from schemas.chat import ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, StreamEnd
from schemas.cloud import BudgetStatus, ProviderHealth, ProviderRate, UsageEvent
from schemas.control import Admitted, Cancel, ModelList, RouteDecision, WorkerHeartbeat
from schemas.embeddings import EmbeddingRequest, EmbeddingResponse
from schemas.errors import ErrorResponse

MESSAGES: list[type[BaseModel]] = [
    ChatCompletionRequest, ChatCompletionChunk, ChatCompletion, StreamEnd, ErrorResponse,
    EmbeddingRequest, EmbeddingResponse,
    Admitted, Cancel, WorkerHeartbeat, ModelList, RouteDecision, ProviderHealth, ProviderRate, BudgetStatus,
    UsageEvent,
    ChatBatch, EmbeddingsBatch, BatchAnswer, WorkerStatus,
]


def schemas() -> dict[str, str]:
    """File name -> JSON Schema text, for every message."""
    return {f"{m.__name__}.json": json.dumps(m.model_json_schema(), indent=2, sort_keys=True) + "\n"
            for m in MESSAGES}


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, text in schemas().items():
        (out / name).write_text(text)
    print(f"wrote {len(MESSAGES)} schemas to {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "schemas/json"))
