"""A docker_auth `auth_config.yml` used as the policy file, unchanged: its `acl:` and `users:`
sections are the policy, and its `server:` and `token:` sections become the settings they stand
for, wherever the settings were left at their defaults (an explicit setting wins).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import MappingProxyType

from gateway import config
from gateway.config import Settings
from gateway.policyfile import Policy


class DockerAuthError(Exception):
    """A docker_auth section that cannot be used as it is; the message names the key."""


def apply(settings: Settings, policy: Policy | None) -> Settings:
    if policy is None or policy.docker_auth is None:
        return settings
    sections = policy.docker_auth
    defaults = {key for key, origin in settings.origins.items() if origin == "default"}
    changes: dict[str, object] = {}
    if sections.addr is not None and "listen" in defaults:
        host, _, port = sections.addr.rpartition(":")
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise DockerAuthError(f"server.addr: expected [HOST]:PORT, not {sections.addr!r}")
        changes["listen_host"], changes["listen_port"] = host.strip("[]") or "0.0.0.0", int(port)
    if sections.server_certificate and sections.server_key and "tls_cert" in defaults:
        changes["tls_cert"], changes["tls_key"] = Path(sections.server_certificate), Path(sections.server_key)
    if sections.issuer is not None:
        # docker_auth is a token server: so is the gateway with its token section.
        if "challenge" in defaults:
            changes["challenge"] = "bearer"
        if "token_issuer" in defaults:
            changes["token_issuer"] = sections.issuer
        if sections.expiration is not None and "token_lifetime" in defaults:
            changes["token_lifetime"] = sections.expiration
        # As docker_auth does, the token key and certificate default to the server's.
        key = sections.token_key or sections.server_key
        certificate = sections.token_certificate or sections.server_certificate
        if key is not None and "token_key" in defaults:
            changes["token_key"] = Path(key)
            if certificate is not None and "token_cert" in defaults:
                changes["token_cert"] = Path(certificate)
    origins = dict(settings.origins)
    for field_name in changes:
        origins["listen" if field_name.startswith("listen_") else field_name] = FROM_DOCKER_AUTH
    applied = dataclasses.replace(settings, origins=MappingProxyType(origins), **changes)  # type: ignore[arg-type]
    # The settings as they now stand are checked together, as config.load checks its own (a token
    # section turns on bearer challenges, which need a key with several workers, for one).
    values = {field.name: getattr(applied, field.name) for field in dataclasses.fields(applied)}
    problems = config.combination_problems(values, True, lambda name: _where(name, origins.get(name, "")))
    if problems:
        raise DockerAuthError("\n  ".join(problems))
    return applied


FROM_DOCKER_AUTH = "docker_auth section of the policy file"


def _where(name: str, origin: str) -> str:
    if origin == FROM_DOCKER_AUTH:
        return f"{name} (from the {FROM_DOCKER_AUTH})"
    return config.where(name, origin)
