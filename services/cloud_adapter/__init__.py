"""cloud-adapter: leafwire's outbound path to cloud LLM providers.

It takes chat work for ``<provider>/<model>`` on ``lw.v1.<site>.cloud.chat`` and calls the provider named
in the providers file (OpenAI-compatible APIs and Anthropic Messages, translated both ways) over one
pooled aiohttp session per provider; retries with exponential backoff, full jitter and the provider's
Retry-After / rate-limit reset hints, but never after the first byte; keeps a circuit breaker per provider
(published to the ``provider-health`` KV bucket); answers repeated deterministic requests from an
exact-match cache in NATS KV; and keeps the cost and budget ledger per tenant and globally (``budgets``
KV bucket, ``USAGE`` stream). See docs/cloud.md.

Modules: ``config`` (the providers file), ``dialect`` / ``openai_compat`` / ``anthropic`` / ``sse``
(translation, no I/O), ``retry`` / ``breaker`` / ``cache`` / ``budget`` (policies, no I/O), ``guard``
(private destinations refused at connect time), ``upstream`` (HTTP), ``state`` (JetStream),
``adapter`` (one request end to end), ``app`` (the NATS handlers).
"""
