"""batcher (not built yet): sits between router and local-inference.

It will keep a bounded queue per model, form batches by max size and max wait, hand each batch to a
local-inference worker that decodes it in one static-batch generator, drop requests whose deadline
passed, answer 429 with Retry-After when a queue is full, batch embeddings requests, and gather
deferrable cloud work into provider batch jobs. Today it starts, connects to NATS, and serves
/healthz, /readyz and /metrics.
"""
