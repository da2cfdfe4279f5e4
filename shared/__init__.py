"""Code that two or more leafwire services use: settings, logging, metrics, NATS helpers, subject names."""
