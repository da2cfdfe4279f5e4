"""gateway: the OpenAI-compatible HTTP API (aiohttp) in front of the NATS services.

It authenticates, validates, and turns each HTTP request into a NATS request to the site's router; the
answer streams straight from the worker to the gateway's reply subject and out as JSON or SSE.
"""
