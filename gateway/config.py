"""Settings: parsed once from defaults, a YAML file, the environment and flags, into a frozen dataclass.

Precedence is flag > environment > file > default. Every key has one environment variable,
`GATEWAY_` + the key in upper case (the way the registry maps `REGISTRY_*`); lists are
comma-separated there. Unknown keys are errors, and every problem is reported at once, each named
by its key and where it came from.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
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
    # Where each key's value came from: default, file, env or flag (what check-config prints).
    origins: Mapping[str, str] = field(default_factory=dict, compare=False)


class ConfigError(Exception):
    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


# key -> (default, description). The description is what `check-config` and the README show.
DEFAULTS: dict[str, Any] = {
    "listen": "0.0.0.0:8080",
    "upstream": "http://registry:5000",
    "htpasswd": "/etc/registry-gateway/htpasswd",
    "policy": None,
    "admin_prefix": "admin",
    "realm": "Registry realm",
    "trusted_proxies": [],
    "block_old_clients": False,
    "connect_timeout": 10.0,
    "read_timeout": 900.0,
    "upstream_connections": 256,
    "cache_ttl": 300.0,
    "cache_size": 10000,
    "reload_interval": 2.0,
    "max_header_size": 16384,
    "log_level": "info",
    "workers": 1,
    "audit_log": None,
    "metrics_listen": None,
    "lockout_attempts": 10,
    "lockout_window": 300.0,
    "tls_cert": None,
    "tls_key": None,
    "hsts_max_age": 0,
    "redirect_listen": None,
    "max_connections": 4096,
    "header_timeout": 30.0,
    "log_format": "text",
    "shutdown_grace": 30.0,
    "body_timeout": 60.0,
    "keepalive_timeout": 75.0,
    "max_head_size": 65536,
    "redirect_to_port": None,
    "challenge": "basic",
    "token_key": None,
    "token_cert": None,
    "token_issuer": "registry-gateway",
    "token_service": "registry-gateway",
    "token_lifetime": 300,
    "token_realm": None,
    "refresh_token_lifetime": 0,
    "token_revocations": None,
    "fast_path": True,
    "metrics_token_file": None,
}

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


PARSERS: dict[str, Callable[[Any], Any]] = {
    "listen": _host_port,
    "upstream": _upstream,
    "htpasswd": _path,
    "policy": _optional_path,
    "admin_prefix": _text,
    "realm": _realm,
    "trusted_proxies": _networks,
    "block_old_clients": _boolean,
    "connect_timeout": _positive_seconds,
    "read_timeout": _positive_seconds,
    "upstream_connections": _count(1),
    "cache_ttl": _seconds,
    "cache_size": _count(0),
    "reload_interval": _positive_seconds,
    "max_header_size": _count(1024),
    "log_level": _log_level,
    "workers": _count(1),
    "audit_log": _optional_text,
    "metrics_listen": _optional_host_port,
    "lockout_attempts": _count(0),
    "lockout_window": _lockout_window,
    "tls_cert": _optional_path,
    "tls_key": _optional_path,
    "hsts_max_age": _count(0),
    "redirect_listen": _optional_host_port,
    "max_connections": _count(0),
    "header_timeout": _seconds,
    "log_format": _log_format,
    "shutdown_grace": _seconds,
    "body_timeout": _positive_seconds,
    "keepalive_timeout": _positive_seconds,
    "max_head_size": _count(1024),
    "redirect_to_port": _optional_port,
    "challenge": _challenge,
    "token_key": _optional_path,
    "token_cert": _optional_path,
    "token_issuer": token_text,
    "token_service": token_text,
    "token_lifetime": _count(60),
    "token_realm": _optional_realm_url,
    "refresh_token_lifetime": _count(0),
    "token_revocations": _optional_path,
    "fast_path": _boolean,
    "metrics_token_file": _optional_path,
}


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
    if ("tls_cert" in values) and ("tls_key" in values):
        cert, key = values["tls_cert"], values["tls_key"]
        if (cert is None) != (key is None):
            problems.append("tls_cert, tls_key: give both or neither")
        elif cert is not None and check_files:
            problem = tls.check_pair(cert, key)
            if problem:
                problems.append(f"{where('tls_cert')}: cannot load with tls_key: {problem}")
        if cert is None and (values.get("hsts_max_age") or values.get("redirect_listen")):
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
    if values.get("workers", 1) > 1 and values.get("metrics_listen") is not None:
        problems.append("metrics_listen: not available with workers > 1 (each worker counts on its own)")
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
            state.build(values["htpasswd"], values["policy"])
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

    host, port = values.pop("listen")
    origins = {key: origin for key, (_, origin) in merged.items()}
    return Settings(listen_host=host, listen_port=port, origins=MappingProxyType(origins), **values)
