"""Settings: parsed once from defaults, a YAML file, the environment and flags, into a frozen dataclass.

Precedence is flag > environment > file > default. Every key has one environment variable,
`GATEWAY_` + the key in upper case (the way the registry maps `REGISTRY_*`); lists are
comma-separated there. Unknown keys are errors, and every problem is reported at once, each named
by its key and where it came from.

Each setting is defined once, as a `Setting` record in SETTINGS (its type in words, default,
parser, description, and what a running gateway re-reads without a restart); the loader,
check-config's listing, docs/configuration.md and config/gateway.yml all follow from that table.
"""

from __future__ import annotations

import argparse
import math
import os
import ssl
import sys
import textwrap
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml
from yarl import URL

from gateway import state, tls, yaml_files
from gateway.addresses import IPNetwork, parse_network
from gateway.files import append_problem, describe_read_error

ENV_PREFIX = "GATEWAY_"


@dataclass(frozen=True)
class Settings:
    listen_host: str
    listen_port: int
    upstream: URL
    htpasswd: Path
    policy: Path | None
    robots: Path | None
    robots_last_used: Path | None
    ui: bool
    admin_prefix: str
    realm: str
    trusted_proxies: tuple[IPNetwork, ...]
    block_old_clients: bool
    connect_timeout: float
    read_timeout: float
    upstream_connections: int
    cache_ttl: float
    cache_size: int
    reload_interval: float
    max_header_size: int
    log_level: str
    workers: int
    audit_log: str | None
    metrics_listen: tuple[str, int] | None
    lockout_attempts: int
    lockout_window: float
    tls_cert: Path | None
    tls_key: Path | None
    hsts_max_age: int
    redirect_listen: tuple[str, int] | None
    max_connections: int
    header_timeout: float
    log_format: str
    shutdown_grace: float
    body_timeout: float
    keepalive_timeout: float
    max_head_size: int
    redirect_to_port: int | None
    challenge: str
    token_key: Path | None
    token_cert: Path | None
    token_issuer: str
    token_service: str
    token_lifetime: int
    token_realm: str | None
    refresh_token_lifetime: int
    token_revocations: Path | None
    fast_path: bool = True
    # A file holding the token /metrics asks for (Bearer, or Basic's password); None: open.
    metrics_token_file: Path | None = None
    # Shared state of replicas and workers (gateway.shared): None keeps it on this host.
    redis_url: URL | None = None
    redis_password_file: Path | None = None
    redis_ca_file: Path | None = None
    # Automatic HTTPS (gateway.acme): with acme_directory, tls_cert/tls_key are acme_storage's pair.
    acme_directory: URL | None = None
    acme_names: tuple[str, ...] = ()
    acme_email: str | None = None
    acme_storage: Path = Path("/var/lib/registry-gateway/acme")
    acme_challenges: tuple[str, ...] = ("http-01", "tls-alpn-01")
    acme_ca_file: Path | None = None
    # Where each key's value came from: default, file, env or flag (what check-config prints).
    origins: Mapping[str, str] = field(default_factory=dict, compare=False)


class ConfigError(Exception):
    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


LOG_LEVELS = ("debug", "info", "warning", "error")


def env_name(key: str) -> str:
    return ENV_PREFIX + key.upper()


def where(key: str, origin: str) -> str:
    """A key as an operator set it: its environment variable or flag, else its name."""
    if origin == "env":
        return f"{key} ({env_name(key)})"
    if origin == "flag":
        return f"{key} (--{key.replace('_', '-')})"
    return key


def _host_port(value: Any) -> tuple[str, int]:
    if not isinstance(value, str):
        raise ValueError("expected HOST:PORT")
    host, sep, port_text = value.rpartition(":")
    if not sep or not port_text.isdigit():
        raise ValueError("expected HOST:PORT")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    port = int(port_text)
    if not 0 < port < 65536:
        raise ValueError("port must be between 1 and 65535")
    if not host:
        raise ValueError("expected HOST:PORT")
    return host, port


def _upstream(value: Any) -> URL:
    if not isinstance(value, str):
        raise ValueError("expected a URL such as http://registry:5000")
    url = URL(value)
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError("expected an http:// or https:// URL with a host")
    if url.user or url.password:
        raise ValueError("must not carry credentials")
    if url.path not in ("", "/") or url.query_string or url.fragment:
        raise ValueError("must be scheme://host[:port] with no path, query or fragment")
    return url.with_path("")


def _redis_url(value: Any) -> URL | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ValueError("expected a URL such as redis://redis:6379/0")
    url = URL(value)
    if url.scheme not in ("redis", "rediss") or not url.host:
        raise ValueError("expected a redis:// or rediss:// (TLS) URL with a host")
    if url.password:
        raise ValueError("must not carry the password: put it in redis_password_file")
    if url.path not in ("", "/") and not url.path.lstrip("/").isdigit():
        raise ValueError("the path is the database number: redis://host:6379/0")
    if url.query_string or url.fragment:
        raise ValueError("must be scheme://[user@]host[:port][/db] with no query or fragment")
    return url


def _acme_directory(value: Any) -> URL | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ValueError(
            "expected the CA's directory URL, such as https://acme-v02.api.letsencrypt.org/directory"
        )
    url = URL(value)
    if url.scheme != "https" or not url.host:
        raise ValueError("expected an https:// URL (the CA's directory)")
    return url


def _dns_names(value: Any) -> tuple[str, ...]:
    names = []
    for item in _listify(value):
        name = str(item).strip().lower().rstrip(".")
        labels = name.split(".")
        if (
            not name
            or len(name) > 253
            or not all(
                label
                and len(label) <= 63
                and label.replace("-", "").isalnum()
                and label.isascii()
                and not label.startswith("-")
                and not label.endswith("-")
                for label in labels
            )
        ):
            raise ValueError(f"{item!r} is not a DNS name the gateway can answer for")
        if labels[-1].isdigit():  # RFC 1123: a top-level label is never all digits
            raise ValueError(
                f"{item!r}: its last label is all digits, as an IP address's; the gateway gets "
                "certificates for DNS names"
            )
        names.append(name)
    return tuple(dict.fromkeys(names))


def _acme_challenges(value: Any) -> tuple[str, ...]:
    kinds = tuple(str(item).strip().lower() for item in _listify(value))
    unknown = [kind for kind in kinds if kind not in ACME_CHALLENGES]
    if unknown or not kinds:
        raise ValueError(f"expected some of {', '.join(ACME_CHALLENGES)}")
    return tuple(dict.fromkeys(kinds))


def _path(value: Any) -> Path:
    if not isinstance(value, str) or not value:
        raise ValueError("expected a file path")
    return Path(value)


def _optional_path(value: Any) -> Path | None:
    if value is None or value == "":
        return None
    return _path(value)


def _optional_host_port(value: Any) -> tuple[str, int] | None:
    if value is None or value == "":
        return None
    return _host_port(value)


def _optional_port(value: Any) -> int | None:
    if value is None or value == "":
        return None
    port = _count(1)(value)
    if port > 65535:
        raise ValueError("must be between 1 and 65535")
    return port


def _optional_text(value: Any) -> str | None:
    if value is None or value == "":
        return None
    return _text(value)


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("expected a string")
    return value


def _realm(value: Any) -> str:
    text = _text(value)
    if not text or any(ch in text for ch in '"\\') or not text.isprintable():
        raise ValueError("must be non-empty printable text without quotes or backslashes")
    return text


def _listify(value: Any) -> list[Any]:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    if isinstance(value, list):
        return value
    raise ValueError("expected a list")


def _networks(value: Any) -> tuple[IPNetwork, ...]:
    networks = []
    for item in _listify(value):
        try:
            networks.append(parse_network(str(item)))
        except ValueError:
            raise ValueError(f"{item!r} is not an IP address or CIDR") from None
    return tuple(networks)


def _boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on"):
        return True
    if isinstance(value, str) and value.lower() in ("false", "no", "0", "off"):
        return False
    raise ValueError("expected true or false")


def _seconds(value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError("expected a number of seconds") from None
    if isinstance(value, bool) or not math.isfinite(number) or number < 0:
        raise ValueError("expected a non-negative number of seconds")
    return number


def _positive_seconds(value: Any) -> float:
    number = _seconds(value)
    if number == 0:
        raise ValueError("must be greater than zero")
    return number


def _lockout_window(value: Any) -> float:
    number = _seconds(value)
    if number == 0:  # it counted no failure at all, which turned the lockout off unsaid
        raise ValueError("must be greater than zero (lockout_attempts: 0 turns the lockout off)")
    return number


def _count(minimum: int) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        # YAML gives ints, floats (2.9, .inf) and text; the environment text. Only a whole number
        # is one: int() would cut 2.9 to 2 and raise OverflowError on .inf.
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError("expected a whole number")
        try:
            number = int(value)
        except (TypeError, ValueError, OverflowError):
            raise ValueError("expected a whole number") from None
        if number < minimum:
            raise ValueError(f"must be at least {minimum}")
        return number

    return parse


def _challenge(value: Any) -> str:
    text = _text(value).lower()
    if text not in ("basic", "bearer"):
        raise ValueError("expected basic or bearer")
    return text


def token_text(value: Any) -> str:
    """A token issuer or service: whatever a registry's auth.token.issuer or .service may be
    ("Docker registry" in distribution's own examples), so spaces, quotes and all; only text that
    cannot be compared as written (empty, control characters) is refused. The service is quoted
    in the challenge (app.py escapes it); the issuer only ever travels inside a JWT."""
    text = _text(value)
    if not text or not text.isprintable():
        raise ValueError(
            "must be non-empty printable text (no tabs, line breaks or other control characters)"
        )
    return text


def _optional_realm_url(value: Any) -> str | None:
    if value is None or value == "":
        return None
    url = URL(_text(value))
    if url.scheme not in ("http", "https") or not url.host or '"' in str(url):
        raise ValueError("expected an absolute http:// or https:// URL (clients need an absolute realm)")
    return str(url)


def _log_level(value: Any) -> str:
    text = _text(value).lower()
    if text not in LOG_LEVELS:
        raise ValueError(f"expected one of {', '.join(LOG_LEVELS)}")
    return text


def _log_format(value: Any) -> str:
    text = _text(value).lower()
    if text not in ("text", "json"):
        raise ValueError("expected text or json")
    return text


@dataclass(frozen=True)
class Setting:
    """One setting, defined here once: `DEFAULTS`, `PARSERS`, the environment names, check-config's
    listing, docs/configuration.md and config/gateway.yml all come from these records (the last
    two written by `python -m gateway.config`, and compared with the table by tests/test_docs.py).
    `Settings` keeps a typed field of the same name (`listen` is two: listen_host, listen_port)."""

    key: str
    kind: str  # what an operator writes, in words
    default: Any  # the raw value, as it would be written in the YAML file
    parse: Callable[[Any], Any]
    description: str  # Markdown, one paragraph; config/gateway.yml shows it without the backticks
    section: str
    # What a running gateway picks up without a restart, in words; "" when a change takes one.
    reload: str = ""
    flag: bool = False  # also a flag of `serve` and `check-config` (gateway.cli's SETTING_FLAGS)
    example: str | None = None  # a value to show, commented out, in config/gateway.yml (no default)

    @property
    def env(self) -> str:
        return env_name(self.key)

    @property
    def option(self) -> str:
        return "--" + self.key.replace("_", "-")


LISTENING = "Listening and the registry"
USERS = "Users, rules and logins"
TOKENS = "Tokens"
HTTPS = "HTTPS"
LIMITS = "Limits on clients"
LOGS = "Logs and metrics"
PROCESSES = "Processes"
SHARED = "Replicas and shared state"
ACME = "Automatic HTTPS (ACME)"
ACME_CHALLENGES = ("http-01", "tls-alpn-01")

_WATCHED = "within `reload_interval` of a change, and on SIGHUP"

SETTINGS: tuple[Setting, ...] = (
    Setting(
        "listen",
        "HOST:PORT",
        "0.0.0.0:8080",
        _host_port,
        "Address to listen on.",
        LISTENING,
        flag=True,
    ),
    Setting(
        "upstream",
        "URL",
        "http://registry:5000",
        _upstream,
        "The registry (distribution, `registry:2`): scheme, host and port only (no path, query or "
        "credentials).",
        LISTENING,
        flag=True,
    ),
    Setting(
        "trusted_proxies",
        "list of addresses or CIDRs",
        [],
        _networks,
        "Proxies whose `X-Forwarded-For`, `X-Forwarded-Proto` and `X-Forwarded-Host` are believed; "
        "from any other client those headers are dropped. Empty: none.",
        LISTENING,
    ),
    Setting(
        "connect_timeout",
        "seconds, more than 0",
        10.0,
        _positive_seconds,
        "Seconds to get a connection to the registry, a new one or a free one of the pool (then "
        "504; a registry that refuses connections: 502).",
        LISTENING,
    ),
    Setting(
        "read_timeout",
        "seconds, more than 0",
        900.0,
        _positive_seconds,
        "Seconds the registry may stay silent, before answering or between body bytes (then 504). "
        "There is no total limit: a big layer takes as long as it needs while bytes flow.",
        LISTENING,
    ),
    Setting(
        "upstream_connections",
        "whole number, at least 1",
        256,
        _count(1),
        "Keep-alive connections to the registry, at most (the pool).",
        LISTENING,
    ),
    Setting(
        "htpasswd",
        "file path",
        "/etc/registry-gateway/htpasswd",
        _path,
        "Apache htpasswd file with the users; it must exist and parse. bcrypt (`htpasswd -B -C 10`, "
        "or `registry-gateway user add`) is the format to use; `$apr1$`, `{SHA}`, `{SSHA}`, `$1$`, "
        "`$5$`, `$6$` and `{PLAIN}` are read too, with a warning for the weak ones.",
        USERS,
        reload=f"the file: {_WATCHED}; one that does not parse is logged and the last good users stay",
        flag=True,
    ),
    Setting(
        "policy",
        "file path, or none",
        None,
        _optional_path,
        "Policy file: per-repository rules (docker_auth's `acl:` format), static users, labels, "
        "groups and expiry dates, and docker_auth's `ldap_auth:`, `ext_auth:` and `ext_authz:` "
        "sections (docs/authentication.md). None: the `admin_prefix` policy.",
        USERS,
        reload=f"the file, and the files it names: {_WATCHED}, validated whole with the htpasswd file "
        "and swapped in at once; an invalid change is logged and the last good rules stay",
        flag=True,
        example="/etc/registry-gateway/policy.yml",
    ),
    Setting(
        "robots",
        "file path, or none",
        None,
        _optional_path,
        "Robot accounts' file, written by `registry-gateway robot` (create, rotate, revoke): machine "
        "credentials for CI that log in as `robot+NAME`, limited to their scopes and expiring "
        "(docs/robots.md). A file that does not exist yet holds no robots. None: no robots.",
        USERS,
        reload=f"the file: {_WATCHED}; one that does not parse is logged and the last good robots stay",
        flag=True,
        example="/etc/registry-gateway/robots.yml",
    ),
    Setting(
        "robots_last_used",
        "file path, or none",
        None,
        _optional_path,
        "Where the gateway records when each robot last logged in (at most once a minute), for "
        "`robot list`: a file in a folder the gateway may write that holds nothing else of value, "
        "not the robots file's (a symlink there is replaced, never followed). None: not recorded.",
        USERS,
        example="/var/lib/registry-gateway/robots-used.json",
    ),
    Setting(
        "admin_prefix",
        "text",
        "admin",
        _text,
        "Without a policy file: users whose name starts with this may use every method (push, "
        "delete); everyone else only `GET` and `HEAD`. An empty string makes nobody an admin.",
        USERS,
        flag=True,
    ),
    Setting(
        "realm",
        "printable text without quotes or backslashes",
        "Registry realm",
        _realm,
        "Realm of the `WWW-Authenticate: Basic` challenge.",
        USERS,
        flag=True,
    ),
    Setting(
        "reload_interval",
        "seconds, more than 0",
        2.0,
        _positive_seconds,
        "Seconds between checks of the files a running gateway follows (htpasswd, policy, TLS pair, "
        "token key and revocations) for changes.",
        USERS,
    ),
    Setting(
        "cache_ttl",
        "seconds",
        300.0,
        _seconds,
        "Seconds a verified login (password, directory or login program) is remembered (0: no "
        "cache); a change in a directory (a user leaving a group) takes effect within it.",
        USERS,
    ),
    Setting(
        "cache_size",
        "whole number",
        10000,
        _count(0),
        "Verified logins remembered at most.",
        USERS,
    ),
    Setting(
        "lockout_attempts",
        "whole number",
        10,
        _count(0),
        "Failed logins for one (client address, user) pair before it gets 429 (0: off); see "
        "docs/operations.md, 'Password guessing'.",
        USERS,
    ),
    Setting(
        "lockout_window",
        "seconds, more than 0",
        300.0,
        _lockout_window,
        "Seconds from the first failure that the count, and the lockout, last (`lockout_attempts: "
        "0` turns the lockout off).",
        USERS,
    ),
    Setting(
        "ui",
        "true or false",
        False,
        _boolean,
        "Serve the web page under /ui/ on the listener: the repositories a user may pull, their "
        "tags and manifests, what the user may do there and which rule says so, and deletes for "
        "those allowed (docs/ui.md). Logins as for the registry, with the lockout.",
        USERS,
    ),
    Setting(
        "block_old_clients",
        "true or false",
        False,
        _boolean,
        "Answer 404 to docker clients older than 1.6 (the nginx recipe's `User-Agent` filter).",
        USERS,
    ),
    Setting(
        "challenge",
        "basic or bearer",
        "basic",
        _challenge,
        "`basic`: the Basic challenge (curl, skopeo, podman, containerd, and docker after `docker "
        "login`). `bearer`: the gateway also issues and checks tokens at `/token` (the distribution "
        "token flow), which the docker CLI needs for anonymous pulls and which a registry in `auth: "
        "token` mode can trust; Basic credentials sent directly still work. See "
        "docs/authentication.md, 'Tokens'.",
        TOKENS,
    ),
    Setting(
        "token_key",
        "file path, or none",
        None,
        _optional_path,
        "PEM signing key (EC P-256 or RSA), then any previous keys still accepted; `registry-gateway "
        "token keygen --key FILE` writes one (mode 0600) and `FILE.crt` beside it. None: an "
        "ephemeral key, for one process only (so needed with `workers` above 1, and for refresh "
        "tokens).",
        TOKENS,
        reload=f"the file (with `token_cert`): {_WATCHED}; a key that fails to load is logged and the "
        "current one stays",
        example="/etc/registry-gateway/token.pem",
    ),
    Setting(
        "token_cert",
        "file path, or none",
        None,
        _optional_path,
        "The signing key's certificate chain, sent in each token's `x5c` header (distribution 3.x "
        "needs it; 2.8 is content with the `kid` every token carries); the registry's "
        "`auth.token.rootcertbundle` is this file. Needs `token_key`.",
        TOKENS,
        reload=f"the file (with `token_key`): {_WATCHED}",
        example="/etc/registry-gateway/token.crt",
    ),
    Setting(
        "token_issuer",
        "printable text",
        "registry-gateway",
        token_text,
        "The tokens' `iss`; a registry in token mode is configured with the same "
        "(`auth.token.issuer`). Any printable text, spaces and quotes included.",
        TOKENS,
    ),
    Setting(
        "token_service",
        "printable text",
        "registry-gateway",
        token_text,
        "The tokens' `aud`, and the service ACL entries match on unless the policy sets its own; a "
        "registry in token mode is configured with the same (`auth.token.service`). Any printable "
        "text, spaces and quotes included (`Docker registry`, as distribution's examples have it).",
        TOKENS,
    ),
    Setting(
        "token_lifetime",
        "whole number of seconds, at least 60",
        300,
        _count(60),
        "Seconds a token is valid (clients treat less than 60 as 60).",
        TOKENS,
    ),
    Setting(
        "token_realm",
        "absolute http:// or https:// URL, or none",
        None,
        _optional_realm_url,
        "The realm announced in challenges. None: built from how the client reached the gateway "
        "(scheme and host, behind `trusted_proxies` too) plus `/token`.",
        TOKENS,
        example="https://registry.example.com/token",
    ),
    Setting(
        "refresh_token_lifetime",
        "whole number of seconds",
        0,
        _count(0),
        "Seconds a refresh token (docker's identity token) is valid; 0: none are issued. Needs `token_key`.",
        TOKENS,
    ),
    Setting(
        "token_revocations",
        "file path, or none",
        None,
        _optional_path,
        "Where `registry-gateway token revoke USER` records revocations: tokens issued to USER "
        "before then are refused by every gateway that reads this file.",
        TOKENS,
        reload=f"the file: {_WATCHED}",
        example="/etc/registry-gateway/token-revocations",
    ),
    Setting(
        "tls_cert",
        "file path, or none",
        None,
        _optional_path,
        "PEM certificate chain; with `tls_key` the gateway serves HTTPS (TLS 1.2 and 1.3, Mozilla's "
        "intermediate ciphers). Give both or neither.",
        HTTPS,
        reload=f"the pair: {_WATCHED}, for new connections; a pair that fails to load is logged and "
        "the old one keeps serving",
        flag=True,
        example="/etc/registry-gateway/tls/fullchain.pem",
    ),
    Setting(
        "tls_key",
        "file path, or none",
        None,
        _optional_path,
        "PEM private key of `tls_cert`.",
        HTTPS,
        reload="with `tls_cert`",
        flag=True,
        example="/etc/registry-gateway/tls/privkey.pem",
    ),
    Setting(
        "hsts_max_age",
        "whole number of seconds",
        0,
        _count(0),
        "With TLS: send `Strict-Transport-Security: max-age=N` (0: not sent).",
        HTTPS,
    ),
    Setting(
        "redirect_listen",
        "HOST:PORT, or none",
        None,
        _optional_host_port,
        "With TLS: a plain-HTTP address answering 301 to HTTPS.",
        HTTPS,
        example="0.0.0.0:80",
    ),
    Setting(
        "redirect_to_port",
        "port, or none",
        None,
        _optional_port,
        "With `redirect_listen`: the HTTPS port redirects name, when a port mapping publishes HTTPS "
        "on another port than `listen`'s (`compose.tls.yml`: 8443 inside, 443 outside).",
        HTTPS,
        example="443",
    ),
    Setting(
        "max_connections",
        "whole number",
        4096,
        _count(0),
        "Client connections open at once; more are closed at once (0: no limit).",
        LIMITS,
    ),
    Setting(
        "header_timeout",
        "seconds",
        30.0,
        _seconds,
        "Seconds every request head has, from its first byte (from the connection's opening, for "
        "the first), to arrive whole (slowloris); 0: no limit.",
        LIMITS,
    ),
    Setting(
        "max_header_size",
        "bytes, at least 1024",
        16384,
        _count(1024),
        "Longest request line or header line, in bytes (longer: 400).",
        LIMITS,
    ),
    Setting(
        "max_head_size",
        "bytes, at least 1024",
        65536,
        _count(1024),
        "Bytes a request head may have in all, request line and headers (more: 431 and the "
        "connection closed); at least `max_header_size`.",
        LIMITS,
    ),
    Setting(
        "keepalive_timeout",
        "seconds, more than 0",
        75.0,
        _positive_seconds,
        "Seconds an idle kept-alive client connection stays open (aiohttp's own default is an hour).",
        LIMITS,
    ),
    Setting(
        "body_timeout",
        "seconds, more than 0",
        60.0,
        _positive_seconds,
        "Seconds a client may pause while sending a request body (then 408 and the upstream request "
        "is cut) or while taking a 256 KiB piece of a response (then the connection is cut); a "
        "request body must also bring 16 KiB in every such period. No total limit.",
        LIMITS,
    ),
    Setting(
        "log_level",
        "debug, info, warning or error",
        "info",
        _log_level,
        "How much the diagnostic log on stderr says.",
        LOGS,
    ),
    Setting(
        "log_format",
        "text or json",
        "text",
        _log_format,
        "The diagnostic log on stderr: `text`, or `json` (one object a line, for log shippers).",
        LOGS,
    ),
    Setting(
        "audit_log",
        "file path, `-`, or none",
        None,
        _optional_text,
        "Audit log: one JSON object a line per request (`-`: standard output). Its directory must "
        "exist and be writable by the gateway's user (checked at start-up and by `check-config`). "
        "See docs/operations.md, 'Audit log'.",
        LOGS,
        reload="reopened on SIGHUP (logrotate's `postrotate`); if that fails, records go on to the "
        "file open until then",
        flag=True,
        example="/var/log/registry-gateway/audit.jsonl",
    ),
    Setting(
        "metrics_listen",
        "HOST:PORT, or none",
        None,
        _optional_host_port,
        "An address of its own serving `/metrics` (Prometheus), `/healthz` and `/readyz`. With "
        "`workers` above 1, one more process answers there for the whole gateway, adding up every "
        "worker's metrics (docs/operations.md, 'Metrics').",
        LOGS,
        flag=True,
        example="127.0.0.1:9090",
    ),
    Setting(
        "metrics_token_file",
        "file path, or none",
        None,
        _optional_path,
        "A file holding a token (one line, at least 16 visible characters: `openssl rand -hex 32`) "
        "that `/metrics` then asks for: `Authorization: Bearer TOKEN` (Prometheus "
        "`authorization.credentials_file`) or Basic with any user name and TOKEN as password "
        "(`basic_auth.password_file`); compared in constant time, wrong ones counted by the "
        "lockout. `/healthz` and `/readyz` stay open for probes. None: `/metrics` is open to "
        "whoever reaches `metrics_listen` (a warning at start-up unless that is a loopback "
        "address). Needs `metrics_listen`.",
        LOGS,
        reload="the file: at the next scrape after it changes; while it cannot be read, the last "
        "good token holds",
        example="/etc/registry-gateway/metrics-token",
    ),
    Setting(
        "workers",
        "whole number, at least 1",
        1,
        _count(1),
        "Worker processes sharing the port (`SO_REUSEPORT`), so every core serves. Each keeps its "
        "own login cache; one that dies is replaced; one of the first that cannot start stops them "
        "all (exit 2), a later one is retried while the others serve. They share the lockout's "
        "table (shared memory) and, with `metrics_listen`, report as one.",
        PROCESSES,
        flag=True,
    ),
    Setting(
        "shutdown_grace",
        "seconds",
        30.0,
        _seconds,
        "Seconds transfers in flight, uploads included, may take to finish after SIGTERM or SIGINT.",
        PROCESSES,
    ),
    Setting(
        "redis_url",
        "URL, or none",
        None,
        _redis_url,
        "Redis shared by every replica (`redis://host:6379/0`, or `rediss://` for TLS; a user name "
        "may come before `@`, the password never: see `redis_password_file`). What replicas must "
        "agree on is kept there: the lockout's failed logins and the token revocations "
        "(docs/replicas.md). While Redis cannot be reached, each host counts on its own and says "
        "so in its log, `/readyz` and `registry_gateway_redis_up`; counting is shared again when "
        "it returns. None: workers of one gateway share the lockout on this host only.",
        SHARED,
        example="redis://redis:6379/0",
    ),
    Setting(
        "redis_password_file",
        "file path, or none",
        None,
        _optional_path,
        "A file holding Redis's password (one line; `requirepass`, or an ACL user's with a user "
        "name in `redis_url`). Needs `redis_url`.",
        SHARED,
        example="/etc/registry-gateway/redis-password",
    ),
    Setting(
        "redis_ca_file",
        "file path, or none",
        None,
        _optional_path,
        "PEM CA bundle that signs Redis's certificate, for `rediss://` with a private CA (else the "
        "system's). Needs a `rediss://` URL.",
        SHARED,
        example="/etc/registry-gateway/redis-ca.pem",
    ),
    Setting(
        "acme_directory",
        "URL, or none",
        None,
        _acme_directory,
        "An ACME CA's directory (Let's Encrypt: `https://acme-v02.api.letsencrypt.org/directory`): "
        "the gateway obtains a certificate for `acme_names` at start and renews it when a third "
        "of its lifetime is left, and serves HTTPS with it on `listen` (then leave `tls_cert` and "
        "`tls_key` unset). See docs/acme.md.",
        ACME,
        example="https://acme-v02.api.letsencrypt.org/directory",
    ),
    Setting(
        "acme_names",
        "list of DNS names",
        [],
        _dns_names,
        "The names the certificate is for; each must reach this gateway (the CA connects to it).",
        ACME,
        example="[registry.example.com]",
    ),
    Setting(
        "acme_email",
        "text, or none",
        None,
        _optional_text,
        "A contact for the ACME account (the CA's expiry notices).",
        ACME,
        example="ops@example.com",
    ),
    Setting(
        "acme_storage",
        "directory path",
        "/var/lib/registry-gateway/acme",
        _path,
        "Where the account key, the certificate and its key (0600) are kept, written atomically; "
        "gateways sharing it order one at a time (a lock) and share the certificate.",
        ACME,
    ),
    Setting(
        "acme_challenges",
        "list: http-01, tls-alpn-01",
        ["http-01", "tls-alpn-01"],
        _acme_challenges,
        "The challenges to answer, in order of preference: HTTP-01 on `redirect_listen` (port 80 "
        "as the CA sees it), TLS-ALPN-01 on `listen` (443), so that a gateway with only 443 open "
        "can still get a certificate. HTTP-01 is used only with `redirect_listen`.",
        ACME,
    ),
    Setting(
        "acme_ca_file",
        "file path, or none",
        None,
        _optional_path,
        "PEM CA bundle to trust for the ACME server's own HTTPS (a private CA); none: the system's.",
        ACME,
        example="/etc/registry-gateway/acme-ca.pem",
    ),
    Setting(
        "fast_path",
        "true or false",
        True,
        _boolean,
        "Serve plain, allowed GET and HEAD requests (cached login or valid token, no body) on the "
        "lean path (docs/performance.md, 'Where the time goes'); anything else takes the full path "
        "either way. `false`: every request takes the full path.",
        PROCESSES,
    ),
)

SETTING_BY_KEY: Mapping[str, Setting] = MappingProxyType({setting.key: setting for setting in SETTINGS})
# The views the loader and check-config read, derived from the table.
DEFAULTS: Mapping[str, Any] = MappingProxyType({setting.key: setting.default for setting in SETTINGS})
PARSERS: Mapping[str, Callable[[Any], Any]] = MappingProxyType(
    {setting.key: setting.parse for setting in SETTINGS}
)


def read_file(path: Path) -> tuple[dict[str, Any], list[str]]:
    """The mapping in a YAML config file, and the problems reading it."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return {}, [f"config file: {describe_read_error(path, exc)}"]
    try:
        data = yaml_files.load(text, str(path))
    except yaml.YAMLError as exc:
        return {}, [f"config file {path}: invalid YAML: {exc}"]
    if data is None:
        return {}, []
    if not isinstance(data, dict):
        return {}, [f"config file {path}: expected a mapping of settings"]
    return {str(k): v for k, v in data.items()}, []


def _same_socket(first: tuple[Any, Any], second: tuple[Any, Any]) -> bool:
    """Whether two listen addresses would take the same port: the same host, or a wildcard of
    the other's family ("" is both; asyncio binds "::" with IPV6_V6ONLY)."""
    if first[1] != second[1]:
        return False
    hosts = {str(first[0]).strip("[]"), str(second[0]).strip("[]")}
    if len(hosts) == 1 or "" in hosts:
        return True
    families = {":" in host for host in hosts}
    return len(families) == 1 and bool(hosts & {"0.0.0.0", "::"})


def _ca_bundle_problems(key: str, path: Path, where: Callable[[str], str]) -> list[str]:
    """Why a CA bundle setting's file cannot be trusted from, if it cannot."""
    try:
        ssl.create_default_context(cafile=str(path))
    except (OSError, ssl.SSLError) as exc:
        return [f"{where(key)}: no PEM certificate in {path}: {getattr(exc, 'strerror', None) or exc}"]
    return []


def _acme_problems(values: Mapping[str, Any], check_files: bool, where: Callable[[str], str]) -> list[str]:
    """With acme_directory: what the managed certificate needs (`load` then makes the TLS pair
    acme_storage's, so that everything that serves or checks TLS reads it as given)."""
    problems: list[str] = []
    storage = values.get("acme_storage")
    pair = (values.get("tls_cert"), values.get("tls_key"))
    # The pair `load` makes acme_storage's is no conflict: the settings are checked again once a
    # docker_auth file's server: and token: sections are applied to them.
    if pair != (None, None) and (storage is None or pair != (storage / "cert.pem", storage / "key.pem")):
        problems.append(
            f"{where('tls_cert')}: not with acme_directory (the gateway keeps its pair in acme_storage)"
        )
    if "acme_names" in values and not values["acme_names"]:  # not when it failed to parse
        problems.append(
            f"{where('acme_names')}: needed with acme_directory (the names to get a certificate for)"
        )
    challenges = values.get("acme_challenges", ())
    if values.get("redirect_listen") is None and tuple(challenges) == ("http-01",):
        problems.append(
            f"{where('acme_challenges')}: http-01 is answered on redirect_listen, which is not set "
            "(set it, or allow tls-alpn-01)"
        )
    storage = values.get("acme_storage")
    if check_files and isinstance(storage, Path):
        existing = storage
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            problems.append(f"{where('acme_storage')}: {existing} is not a directory this user can write to")
    if check_files and values.get("acme_ca_file") is not None:
        problems += _ca_bundle_problems("acme_ca_file", values["acme_ca_file"], where)
    return problems


def combination_problems(
    values: Mapping[str, Any], check_files: bool, where: Callable[[str], str]
) -> list[str]:
    """What is wrong with these settings together (each may be fine alone), and with the files
    they name when `check_files`; `where` names a key as its source set it. Run by `load`, and
    again once a docker_auth file has filled in settings (gateway.docker_auth)."""
    problems: list[str] = []
    listen = values.get("listen") or (values.get("listen_host"), values.get("listen_port"))
    for other in ("metrics_listen", "redirect_listen"):
        if values.get(other) is not None and _same_socket(listen, values[other]):
            problems.append(f"{where(other)}: the same address as listen; give it one of its own")
    acme = values.get("acme_directory") is not None
    if acme:
        problems += _acme_problems(values, check_files, where)
    if ("tls_cert" in values) and ("tls_key" in values):
        cert, key = values["tls_cert"], values["tls_key"]
        if (cert is None) != (key is None):
            problems.append("tls_cert, tls_key: give both or neither")
        elif cert is not None and check_files and not acme:
            problem = tls.check_pair(cert, key)
            if problem:
                problems.append(f"{where('tls_cert')}: cannot load with tls_key: {problem}")
        if cert is None and not acme and (values.get("hsts_max_age") or values.get("redirect_listen")):
            problems.append("hsts_max_age, redirect_listen: need tls_cert and tls_key")
        if values.get("redirect_to_port") and not values.get("redirect_listen"):
            problems.append("redirect_to_port: only used with redirect_listen")
    if values.get("max_head_size", 0) and values.get("max_head_size", 0) < values.get("max_header_size", 0):
        problems.append("max_head_size: must be at least max_header_size (one header line)")
    if (
        values.get("challenge") == "bearer"
        and values.get("workers", 1) > 1
        and values.get("token_key") is None
    ):
        problems.append(
            "token_key: needed with workers > 1 (each worker would sign with its own ephemeral key)"
        )
    if values.get("ui") and values.get("workers", 1) > 1 and values.get("token_key") is None:
        problems.append(
            "token_key: needed with ui and workers > 1 (the page's sessions are signed with a key "
            "derived from it, which every worker must share)"
        )
    if check_files and values.get("token_key") is not None:
        from gateway.tokens import keys

        try:
            signing_key = keys.load(values["token_key"])
            if values.get("token_cert") is not None:
                keys.certificate_chain(values["token_cert"], signing_key)
        except keys.KeyError_ as exc:
            problems.append(f"{where('token_key')}: {exc}")
    if values.get("token_cert") is not None and values.get("token_key") is None:
        problems.append("token_cert: needs token_key (the certificate is that key's)")
    if values.get("refresh_token_lifetime") and values.get("token_key") is None:
        problems.append("refresh_token_lifetime: needs token_key (refresh tokens must outlive the process)")
    redis_url = values.get("redis_url")
    if values.get("redis_password_file") is not None:
        if redis_url is None:
            problems.append(f"{where('redis_password_file')}: only used with redis_url")
        elif check_files:
            from gateway.shared.link import read_password

            try:
                read_password(values["redis_password_file"])
            except ValueError as exc:
                problems.append(f"{where('redis_password_file')}: {exc}")
    if redis_url is not None and redis_url.user and values.get("redis_password_file") is None:
        problems.append(
            f"{where('redis_password_file')}: needed when redis_url names a user ({redis_url.user})"
        )
    if values.get("redis_ca_file") is not None:
        if redis_url is None or redis_url.scheme != "rediss":
            problems.append(f"{where('redis_ca_file')}: only used with a rediss:// redis_url")
        elif check_files:
            problems += _ca_bundle_problems("redis_ca_file", values["redis_ca_file"], where)
    if values.get("metrics_token_file") is not None:
        if values.get("metrics_listen") is None:
            problems.append(f"{where('metrics_token_file')}: only used with metrics_listen")
        elif check_files:
            from gateway.metrics import read_scrape_token

            try:
                read_scrape_token(values["metrics_token_file"])
            except ValueError as exc:
                problems.append(f"{where('metrics_token_file')}: {exc}")

    return problems


def load(
    config_file: Path | None = None,
    environ: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
    *,
    check_files: bool = True,
) -> Settings:
    """Build Settings from every source, or raise ConfigError listing every problem."""
    environ = os.environ if environ is None else environ
    problems: list[str] = []
    merged: dict[str, tuple[Any, str]] = {k: (v, "default") for k, v in DEFAULTS.items()}

    if config_file is not None:
        file_values, file_problems = read_file(config_file)
        problems.extend(file_problems)
        for key, value in file_values.items():
            if key not in DEFAULTS:
                problems.append(
                    f"{key}: unknown key in {config_file}{yaml_files.did_you_mean(key, DEFAULTS)}"
                )
                continue
            merged[key] = (value, "file")

    known_env = {env_name(k) for k in DEFAULTS} | {ENV_PREFIX + "CONFIG"}
    for name in sorted(environ):
        if name.startswith(ENV_PREFIX) and name not in known_env:
            known_names = sorted(known_env)
            problems.append(
                f"{name}: unknown environment variable{yaml_files.did_you_mean(name, known_names)}"
            )
    for key in DEFAULTS:
        if env_name(key) in environ:
            merged[key] = (environ[env_name(key)], "env")

    for key, value in (flags or {}).items():
        if value is not None:
            merged[key] = (value, "flag")

    values: dict[str, Any] = {}
    for key, (raw, origin) in merged.items():
        try:
            values[key] = PARSERS[key](raw)
        except ValueError as exc:
            problems.append(f"{where(key, origin)}: {exc}")

    if check_files and "htpasswd" in values and "policy" in values:
        try:
            state.build(values["htpasswd"], values["policy"], values.get("robots"))
        except state.StateError as exc:
            problems.extend(f"{where(key, merged[key][1])}: {message}" for key, message in exc.by_key)

    if check_files and values.get("audit_log") not in (None, "-"):
        # With the other files: check-config reports it, and serve refuses it among every other
        # problem, before anything starts.
        problem = append_problem(Path(values["audit_log"]))
        if problem is not None:
            problems.append(f"{where('audit_log', merged['audit_log'][1])}: {problem}")

    problems += combination_problems(values, check_files, lambda key: where(key, merged[key][1]))

    if problems:
        raise ConfigError(problems)

    if values.get("acme_directory") is not None:
        values["tls_cert"] = values["acme_storage"] / "cert.pem"
        values["tls_key"] = values["acme_storage"] / "key.pem"
    host, port = values.pop("listen")
    origins = {key: origin for key, (_, origin) in merged.items()}
    return Settings(listen_host=host, listen_port=port, origins=MappingProxyType(origins), **values)


# docs/configuration.md and config/gateway.yml, written from SETTINGS by `python -m gateway.config`.

EXAMPLE_HEADER = """\
# registry-gateway settings: every key, with its default or (commented out) an example value.
# Written by `python -m gateway.config --example > config/gateway.yml` from the table in
# gateway/config.py; docs/configuration.md says the same at more length.
# Every key can also be set with an environment variable, GATEWAY_<KEY in upper case> (lists
# comma-separated), and some with a flag of `registry-gateway serve`.
# Precedence: flag > environment > this file > default. A changed setting takes a restart; the
# files some settings name are followed while running ("While running" below).
# Check a file with: registry-gateway check-config --config config/gateway.yml
"""

MARKDOWN_HEADER = """\
# Configuration

<!-- Written by `python -m gateway.config --markdown > docs/configuration.md` from the table in
gateway/config.py (SETTINGS). Edit the table, not this file: tests/test_docs.py fails when the
two differ. -->

Every setting comes from, in order of precedence: a flag of `serve` (and `check-config`), an
environment variable `GATEWAY_<KEY>` (the key in upper case; lists comma-separated), the YAML file
given by `--config` or `GATEWAY_CONFIG`, and the default. Unknown keys in the file and unknown
`GATEWAY_*` variables are errors. Every problem is reported at once, each named by its key and
where it came from (`listen (--listen): expected HOST:PORT`); `serve` then refuses to start (exit
2), `check-config` exits 1. `registry-gateway check-config` prints every effective setting and
where it came from (default, file, environment, flag). `config/gateway.yml` is a commented example
of every key, written from the same table as this page.

**While running.** The gateway reads its settings once, at start: a changed setting takes a
restart. What it follows while running are the files some settings name (each says so below): it
looks at them every `reload_interval` seconds, and SIGHUP re-reads the htpasswd and policy files,
the TLS pair and the token key and revocations at once and reopens the audit log, each on its own:
one that fails is logged and keeps its last good state, and the others still happen. With
`workers` above 1 the supervisor passes SIGHUP on to every worker.
"""


def _plain_value(value: Any) -> str:
    """A default as it is written in YAML: 10 for 10.0, true, [] ."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    dumped = str(yaml.safe_dump(value, default_flow_style=True, width=1000))
    return dumped.removesuffix("\n...\n").strip()  # the end-of-document mark of a lone scalar


def _unmarked(text: str) -> str:
    return text.replace("`", "")


def render_markdown() -> str:
    """docs/configuration.md."""
    out = [MARKDOWN_HEADER]
    section = ""
    for setting in SETTINGS:
        if setting.section != section:
            section = setting.section
            out.append(f"## {section}\n")
        default = "none" if setting.default is None else f"`{_plain_value(setting.default)}`"
        facts = [f"Type: {setting.kind}", f"default: {default}", f"environment: `{setting.env}`"]
        if setting.flag:
            facts.append(f"flag: `{setting.option}`")
        out.append(f"### `{setting.key}`\n")
        out.append(textwrap.fill(setting.description, 100, break_on_hyphens=False) + "\n")
        out.append(" · ".join(facts) + "\n")
        if setting.reload:
            line = f"While running: {setting.reload}."
            out.append(textwrap.fill(line, 100, break_on_hyphens=False) + "\n")
    return "\n".join(out)


def render_example() -> str:
    """config/gateway.yml."""
    out = [EXAMPLE_HEADER]
    section = ""
    for setting in SETTINGS:
        if setting.section != section:
            section = setting.section
            out.append(f"\n# ---- {section} ----\n")
        comment = _unmarked(setting.description)
        if setting.reload:
            comment += f" While running: {_unmarked(setting.reload)}."
        out.append("\n")
        for line in textwrap.wrap(comment, 98, break_on_hyphens=False):
            out.append(f"# {line}\n")
        if setting.default is None:
            out.append(f"# {setting.key}: {setting.example}\n")
        else:
            out.append(f"{setting.key}: {_plain_value(setting.default)}\n")
    return "".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gateway.config", description="Write the settings table as a document."
    )
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--markdown", action="store_true", help="docs/configuration.md")
    which.add_argument("--example", action="store_true", help="config/gateway.yml")
    args = parser.parse_args(argv)
    sys.stdout.write(render_markdown() if args.markdown else render_example())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
