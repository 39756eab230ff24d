"""Probes run from the command line: `healthcheck` (the container's HEALTHCHECK) and the registry
check of `check-config`. Blocking I/O with short timeouts: never used on the request path."""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request

from yarl import URL

from gateway.config import Settings
from gateway.errors import API_VERSION_HEADER
from gateway.identity.ldap import LdapSettings
from gateway.shared.link import describe, read_password

TIMEOUT = 4.0


def _local(host: str) -> str:
    """The address to reach a listener on from the same host (or container)."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def _get(url: str) -> int:
    """The HTTP status of a GET; certificates are not checked (a probe of our own listener)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    request = urllib.request.Request(url, headers={"User-Agent": "registry-gateway-probe"})  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT, context=context) as response:  # noqa: S310
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def healthcheck(settings: Settings) -> tuple[bool, str]:
    """Whether this gateway serves: /healthz on metrics_listen if set, else any HTTP answer below
    500 on the listener itself (a 401 challenge is an answer)."""
    on_metrics = settings.metrics_listen is not None
    if settings.metrics_listen is not None:
        host, port = settings.metrics_listen
        url = f"http://{_local(host)}:{port}/healthz"
    else:
        scheme = "https" if settings.tls_cert else "http"
        url = f"{scheme}://{_local(settings.listen_host)}:{settings.listen_port}/v2/"
    try:
        status = _get(url)
    except (OSError, ValueError) as exc:
        return False, f"{url}: {getattr(exc, 'reason', exc)}"
    healthy = status == 200 if on_metrics else status < 500
    return healthy, f"{url}: HTTP {status}"


def registry_problem(upstream: URL) -> str | None:
    """Why the registry at `upstream` does not answer like a registry, or None when it does."""
    url = f"{upstream}/v2/"
    request = urllib.request.Request(url, headers={"User-Agent": "registry-gateway-probe"})  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:  # noqa: S310
            headers = response.headers
    except urllib.error.HTTPError as exc:
        headers = exc.headers
    except (OSError, ValueError) as exc:
        return f"{url} does not answer: {getattr(exc, 'reason', exc)}"
    if headers.get(API_VERSION_HEADER) is None:
        return f"{url} answers, but not as a registry (no {API_VERSION_HEADER} header)"
    return None


def acme_problem(settings: Settings) -> tuple[str, bool] | None:
    """What is wrong with the ACME CA `acme_directory` names, and whether it is the settings' fault
    (it answers, but not with an ACME directory: True) or maybe passing (unreachable: False)."""
    if settings.acme_directory is None:
        return None
    url = str(settings.acme_directory)
    context = ssl.create_default_context(cafile=str(settings.acme_ca_file) if settings.acme_ca_file else None)
    request = urllib.request.Request(url, headers={"User-Agent": "registry-gateway-probe"})  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT, context=context) as response:  # noqa: S310
            body = response.read(1 << 20)
    except urllib.error.HTTPError as exc:
        exc.close()
        return f"acme_directory: {url} answers HTTP {exc.code}, not an ACME directory", True
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return (
            f"acme_directory: the CA at {url} does not answer ({reason}); the gateway will keep trying",
            False,
        )
    try:
        directory = json.loads(body)
    except ValueError:
        directory = None
    if not isinstance(directory, dict) or "newOrder" not in directory:
        return f"acme_directory: {url} answers, but not with an ACME directory (no newOrder)", True
    return None


def redis_problem(settings: Settings) -> tuple[str, bool] | None:
    """What is wrong with the Redis `redis_url` names, and whether it is the settings' fault (a
    refused password: True) or maybe passing (unreachable: False); None when it answers."""
    if settings.redis_url is None:
        return None
    import redis  # only with redis_url (see gateway.shared.link)
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    where = describe(settings.redis_url)
    options: dict[str, object] = {
        "socket_timeout": TIMEOUT,
        "socket_connect_timeout": TIMEOUT,
        "retry": Retry(NoBackoff(), 0),
    }
    try:
        if settings.redis_password_file is not None:
            options["password"] = read_password(settings.redis_password_file)
        if settings.redis_ca_file is not None:
            options["ssl_ca_certs"] = str(settings.redis_ca_file)
        client = redis.Redis.from_url(str(settings.redis_url), **options)
        try:
            client.ping()
        finally:
            client.close()
    except redis.AuthenticationError as exc:
        return f"redis_url: Redis at {where} refused the credentials (redis_password_file): {exc}", True
    except redis.ResponseError as exc:  # NOAUTH, WRONGPASS and the like
        return f"redis_url: Redis at {where} refused the connection: {exc}", True
    except (redis.RedisError, OSError, ValueError) as exc:
        return (
            f"Redis at {where} does not answer ({exc}): until it does, gateways count failed logins "
            "on their own host",
            False,
        )
    return None


def directory_problem(settings: LdapSettings) -> tuple[str, bool] | None:
    """Why the directory does not take a bind as the service account (anonymous with no bind_dn
    or with initial_bind_as_user), naming the key to change, and whether the configuration is the
    cause (True) rather than a directory that does not answer (False); None when it binds."""
    import asyncio
    import dataclasses

    from gateway.identity.ldap import LdapSource

    async def attempt(settings: LdapSettings) -> tuple[str, bool] | None:
        source = LdapSource(settings)
        try:
            problem = await source.check()
        finally:
            await source.close()
        return None if problem is None else (str(problem), problem.misconfigured)

    problem = asyncio.run(attempt(settings))
    if problem is None or problem[1] or settings.tls != "always":
        return problem
    # LDAPS failed: does the port speak plain LDAP (docker_auth's reading of a missing tls, off
    # port 636)? Asked anonymously, so that no password crosses the network unencrypted.
    plain = dataclasses.replace(settings, tls="never", bind_dn=None, bind_password=None)
    answer = asyncio.run(attempt(plain))
    if answer is None or answer[1]:
        return (
            f"ldap_auth.tls: always (LDAPS), but {settings.addr} speaks plain LDAP: set tls: starttls "
            "(or never, on a trusted network)",
            True,
        )
    return problem
