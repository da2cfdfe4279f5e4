"""Deployment: NATS configs and templates, the local stack launcher, model builds, compose/k8s/systemd."""
