"""A docker_auth `auth_config.yml` used as the policy file, unchanged: its `acl:` and `users:`
sections are the policy, and its `server:` and `token:` sections become the settings they stand
for, wherever the settings were left at their defaults (an explicit setting wins).
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from types import MappingProxyType

from gateway import config, policyfile, yaml_files
from gateway.config import Settings
from gateway.policyfile import Policy


class DockerAuthError(Exception):
    """A docker_auth section that cannot be used as it is; the message names the key."""


def _section_values(policy: Policy) -> list[tuple[str, str, object]]:
    """(docker_auth key, setting, value) for each setting the file's server: and token: sections
    stand for, in the order they are applied. The listen address is the setting `listen`, a
    (host, port) pair."""
    sections = policy.docker_auth
    if sections is None:
        return []
    values: list[tuple[str, str, object]] = []
    if sections.addr is not None:
        host, _, port = sections.addr.rpartition(":")
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise DockerAuthError(f"server.addr: expected [HOST]:PORT, not {sections.addr!r}")
        values.append(("server.addr", "listen", (host.strip("[]") or "0.0.0.0", int(port))))
    if sections.server_certificate and sections.server_key:
        values.append(("server.certificate", "tls_cert", Path(sections.server_certificate)))
        values.append(("server.key", "tls_key", Path(sections.server_key)))
    if sections.issuer is not None:
        try:  # what gateway.yml and the environment may say, the file may say: no more, no less
            config.token_text(sections.issuer)
        except ValueError as exc:
            raise DockerAuthError(f"token.issuer: {exc}") from None
        # docker_auth is a token server: so is the gateway with its token section.
        values.append(("token.issuer", "challenge", "bearer"))
        values.append(("token.issuer", "token_issuer", sections.issuer))
        if sections.expiration is not None:
            values.append(("token.expiration", "token_lifetime", sections.expiration))
        # As docker_auth does, the token key and certificate default to the server's.
        key = sections.token_key or sections.server_key
        certificate = sections.token_certificate or sections.server_certificate
        if key is not None:
            values.append(("token.key", "token_key", Path(key)))
            if certificate is not None:
                values.append(("token.certificate", "token_cert", Path(certificate)))
    return values


def _current(settings: Settings, setting: str) -> object:
    if setting == "listen":
        return (settings.listen_host, settings.listen_port)
    return getattr(settings, setting)


def apply(settings: Settings, policy: Policy | None, check_files: bool = True) -> Settings:
    if policy is None or policy.docker_auth is None:
        return settings
    defaults = {key for key, origin in settings.origins.items() if origin == "default"}
    changes: dict[str, object] = {}
    for _, setting, value in _section_values(policy):
        # The TLS pair goes together, and a token certificate only with the key it carries.
        decides = {"tls_key": "tls_cert", "token_cert": "token_key"}.get(setting, setting)
        if setting in defaults and decides in defaults:
            changes[setting] = value
    origins = dict(settings.origins)
    for setting in changes:
        origins[setting] = FROM_DOCKER_AUTH
    if "listen" in changes:
        changes["listen_host"], changes["listen_port"] = changes.pop("listen")  # type: ignore[misc]
    applied = dataclasses.replace(settings, origins=MappingProxyType(origins), **changes)  # type: ignore[arg-type]
    # The settings as they now stand are checked together, as config.load checks its own (a token
    # section turns on bearer challenges, which need a key with several workers, for one).
    values = {field.name: getattr(applied, field.name) for field in dataclasses.fields(applied)}
    problems = config.combination_problems(
        values, check_files, lambda name: _where(name, origins.get(name, ""))
    )
    if problems:
        raise DockerAuthError("\n  ".join(problems))
    return applied


def apply_leniently(settings: Settings, path: Path) -> Settings:
    """For the healthcheck: the settings as the policy file's server: section leaves them (where
    the gateway listens, and whether with TLS), even when the file does not load as a whole, for
    the gateway serves on the last good one; the settings as they are when even that section
    cannot be read. Never raises."""
    with contextlib.suppress(Exception):  # any failure of the file: its server: section alone
        return apply(settings, policyfile.load(path), check_files=False)
    try:
        data = yaml_files.load(path.read_text(encoding="utf-8"), str(path))
        server = data.get("server") if isinstance(data, dict) else None
        if not isinstance(server, dict):
            return settings
        return apply(settings, policyfile.parse({"server": server, "acl": []}, str(path)), check_files=False)
    except Exception:  # the settings' own address is probed then
        return settings


def not_applied(applied: Settings, policy: Policy | None) -> list[str]:
    """What the file's server: and token: sections say that the settings (after `apply`) do not,
    because the setting was set elsewhere: an explicit setting wins, but not in silence (the
    example config spells out defaults, and a token issuer the registry does not expect would
    fail every token). And the one token setting such a file cannot say: the service."""
    if policy is None:
        return []
    notes = []
    for source, setting, value in _section_values(policy):
        current = _current(applied, setting)
        if current != value:
            where = config.where(setting, applied.origins.get(setting, "default"))
            notes.append(f"{source} ({_shown(value)}) not applied: {where} is set to {_shown(current)}")
    sections = policy.docker_auth
    issues_tokens = sections is not None and (sections.issuer is not None or applied.challenge == "bearer")
    if issues_tokens and applied.origins.get("token_service", "default") == "default":
        # docker_auth takes each token's audience from the request's `service`; the gateway
        # from token_service, and a registry whose service differs refuses every token (a
        # 400 to clients, which skopeo shows as a bare "invalid status code").
        notes.append(
            f"token: has no service key (docker_auth takes it from each request); set token_service "
            f"(or {config.env_name('token_service')}) to the registry's auth.token.service: tokens are "
            f"issued for the default, {applied.token_service!r}"
        )
    return notes


def _shown(value: object) -> str:
    if isinstance(value, tuple):
        return ":".join(str(part) for part in value)
    return str(value)


FROM_DOCKER_AUTH = "docker_auth section of the policy file"


def _where(name: str, origin: str) -> str:
    if origin == FROM_DOCKER_AUTH:
        return f"{name} (from the {FROM_DOCKER_AUTH})"
    return config.where(name, origin)
