"""gateway settings (environment variables ``LW_*``)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator

from schemas.embeddings import MAX_INPUTS
from shared.settings import ServiceSettings

ANSWERS_END_S = 3.0  # after the shutdown grace: how long handlers get to write their last error and cancel


class GatewaySettings(ServiceSettings):
    """Where the gateway listens, its limits, and who may call it."""

    host: str = Field(default="127.0.0.1", alias="LW_GATEWAY_HOST")
    port: int = Field(default=8080, ge=0, le=65535, alias="LW_GATEWAY_PORT")
    max_body_bytes: int = Field(default=8 * 1024 * 1024, ge=1024, alias="LW_GATEWAY_MAX_BODY_BYTES")
    body_timeout_s: float = Field(default=30.0, gt=0, alias="LW_GATEWAY_BODY_TIMEOUT_S",
                                  description="longest a client may take to send a request's body (then 408): a "
                                              "client sending slowly, or a chunked body whose framing broke, "
                                              "would otherwise hold its handler for ever")
    request_timeout_s: float = Field(default=300.0, gt=0, alias="LW_GATEWAY_REQUEST_TIMEOUT_S",
                                     description="deadline of a whole request")
    idle_timeout_s: float = Field(default=20.0, gt=0, alias="LW_GATEWAY_IDLE_TIMEOUT_S",
                                  description="a request nothing was heard of for this long (no piece of the "
                                              "answer, no progress event) gets a 504; the services holding a "
                                              "request say so every LW_KEEPALIVE_S (5 s): keep it 3 times that "
                                              "or more")
    shutdown_grace_s: float = Field(default=10.0, ge=0, alias="LW_GATEWAY_SHUTDOWN_GRACE_S",
                                    description="on SIGTERM, answers in flight get this long to finish; the rest "
                                                "end with a 503 (an error event in a stream) and are cancelled")
    models_timeout_s: float = Field(default=2.0, gt=0, alias="LW_GATEWAY_MODELS_TIMEOUT_S")
    embeddings_split: int = Field(default=256, ge=1, le=MAX_INPUTS, alias="LW_GATEWAY_EMBEDDINGS_SPLIT",
                                  description="an embeddings request of more inputs is sent to the site as "
                                              "requests (parts) of at most this many, merged into one answer: "
                                              "each answer must fit NATS's max_payload (256 float vectors of "
                                              "384 dimensions: ~2 MB); smaller parts let other requests in "
                                              "sooner but cost the big one more; 2048: never split")
    embeddings_split_float: int = Field(default=64, ge=1, le=MAX_INPUTS, alias="LW_GATEWAY_EMBEDDINGS_SPLIT_FLOAT",
                                        description="the same for float vectors (encoding_format float), whose JSON "
                                                    "takes ~20 bytes a number against base64's ~5.3: 64 vectors of "
                                                    "4096 dimensions are ~5 MB, so a large cloud model's float "
                                                    "answers fit too (the lower of the two applies)")
    embeddings_parallel: int = Field(default=2, ge=1, le=32, alias="LW_GATEWAY_EMBEDDINGS_PARALLEL",
                                     description="parts of one request out at the site at once: 2 keeps one "
                                                 "worker busy; more suits more workers")
    completions_parallel: int = Field(default=8, ge=1, le=128, alias="LW_GATEWAY_COMPLETIONS_PARALLEL",
                                      description="choices of one /v1/completions request (prompts × n) or of one "
                                                  "chat request with n > 1, each a chat request, out at the "
                                                  "site at once: 8 fills one batch of "
                                                  "a local model without flooding its queue at the batcher")
    api_keys: str = Field(default="", alias="LW_GATEWAY_API_KEYS",
                          description="comma-separated key:tenant pairs")
    api_keys_file: Path | None = Field(default=None, alias="LW_GATEWAY_API_KEYS_FILE",
                                       description="a file of key:tenant lines")
    metrics_need_key: bool = Field(default=False, alias="LW_GATEWAY_METRICS_NEED_KEY",
                                   description="/metrics answers only a caller with one of the API keys "
                                               "(it is on the API's port; off: open, as vLLM's and LiteLLM's)")

    @model_validator(mode="after")
    def _keys_outside_development(self) -> GatewaySettings:
        if self.env == "production" and not (self.api_keys or self.api_keys_file):
            raise ValueError("production needs API keys: set LW_GATEWAY_API_KEYS or LW_GATEWAY_API_KEYS_FILE")
        if self.metrics_need_key and not (self.api_keys or self.api_keys_file):
            raise ValueError("LW_GATEWAY_METRICS_NEED_KEY needs API keys: set LW_GATEWAY_API_KEYS or "
                             "LW_GATEWAY_API_KEYS_FILE")
        return self

    @property
    def stop_within_s(self) -> float:
        """The shutdown grace and the answers' ending come before the NATS drain."""
        return self.shutdown_grace_s + ANSWERS_END_S + super().stop_within_s

    def key_table(self) -> dict[str, str]:
        """API key -> tenant. Empty means no key is needed (development only)."""
        lines = [p for p in self.api_keys.split(",") if p.strip()]
        if self.api_keys_file is not None:
            lines += [ln for ln in self.api_keys_file.read_text().splitlines()
                      if ln.strip() and not ln.startswith("#")]
        table = {}
        for line in lines:
            key, sep, tenant = line.strip().partition(":")
            if not sep or not key or not tenant:  # the line is not quoted: it may hold a key
                raise ValueError("API keys must be written key:tenant (one without its tenant was found)")
            table[key] = tenant
        return table
