"""cloud-adapter (not built yet): leafwire's outbound path to cloud LLM providers.

It will call OpenAI-compatible and Anthropic APIs over one pooled aiohttp session per provider, retry
with backoff, full jitter and Retry-After, keep a circuit breaker per provider (state in NATS KV),
serve an exact-match cache from NATS KV, and keep the cost and budget ledger per tenant. Today it
starts, connects to NATS, and serves /healthz, /readyz and /metrics.
"""
