"""Message contracts of leafwire: pydantic models of every message on NATS and over HTTP.

``python -m schemas.export`` writes their JSON Schema to ``schemas/json/``; a test fails when it is stale.
"""
