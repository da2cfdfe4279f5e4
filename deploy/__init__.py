"""Deployment: NATS configs and templates, the local stack launcher (supervisord), model builds."""
