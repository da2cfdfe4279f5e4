"""retrieval (not built yet): knowledge bases on LanceDB.

It will ingest, chunk and embed documents, answer hybrid search (vector + full text, fused with RRF)
with a score threshold, and publish knowledge-base snapshots to the object store for edge sync. Today
it starts, connects to NATS, and serves /healthz, /readyz and /metrics.
"""
