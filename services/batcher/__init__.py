"""batcher: sits between router and local-inference workers.

It keeps a bounded queue per model, cuts batches by size and by waiting time (per-model options that
workers announce from the model registry), and hands each batch to an idle worker, which decodes it in
one static-batch generator (or encodes it in one go, for embeddings) and answers every caller directly.
It drops requests whose deadline passes while they wait, answers 429 with Retry-After when a queue is
full, drops cancelled requests, and watches the workers holding its rows so that callers of a worker
that dies get an error at once. Deferrable cloud work (provider batch jobs) is not handled yet.
"""
