"""registry-gateway: an authenticating, authorizing, streaming proxy for a Docker/OCI registry."""

__version__ = "0.1.0"
