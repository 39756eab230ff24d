"""Prometheus metrics, and the health endpoints, served on their own address.

Labels stay low-cardinality: operation, status and decision, never user or repository names.
Each app gets its own registry, so several gateways in one process (the tests) do not collide.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import datetime as dt
import hmac
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from yarl import URL

from gateway import files
from gateway.addresses import canonical_ip
from gateway.authn import CredentialCache
from gateway.errors import error_response
from gateway.login import Locked, locked_response
from gateway.shared.link import RedisLink
from gateway.shared.lockout import SharedLockout
from gateway.state import AccessStore

if TYPE_CHECKING:
    from gateway.acme.manager import CertificateManager

log = logging.getLogger("gateway.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_BUCKET_LABELS = (*(repr(float(bound)) for bound in LATENCY_BUCKETS), "+Inf")  # as Prometheus writes `le`


def _cumulative(counts: list[float]) -> list[tuple[str, float]]:
    """Bucket counts (each bucket's own, then +Inf's, then the sum) as Prometheus's cumulative
    `le` buckets."""
    buckets = []
    total = 0.0
    for label, count in zip(_BUCKET_LABELS, counts[:-1], strict=True):
        total += count
        buckets.append((label, total))
    return buckets


class _StateCollector(Collector):
    def __init__(self, cache: CredentialCache, store: AccessStore, metrics: Metrics) -> None:
        self.cache = cache
        self.store = store
        self.metrics = metrics

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily | HistogramMetricFamily]:
        yield GaugeMetricFamily(
            "registry_gateway_in_flight_requests", "Requests being handled", value=self.metrics.in_flight
        )
        directory = self.metrics.directory_state
        if directory is not None:
            problem = directory()
            yield GaugeMetricFamily(
                "registry_gateway_directory_up",
                "1 when the last exchange with the LDAP directory succeeded, 0 when it failed",
                value=0 if problem else 1,
            )
        certificates = self.metrics.certificates
        if certificates is not None:
            days = certificates.days_left()
            yield GaugeMetricFamily(
                "registry_gateway_certificate_days_left",
                "Days until the ACME certificate served expires (negative: expired; absent: none yet)",
                value=days if days is not None else float("nan"),
            )
        shared = self.metrics.shared_state
        if shared is not None:
            yield GaugeMetricFamily(
                "registry_gateway_redis_up",
                "1 while Redis (redis_url) answers, 0 while failed logins are counted on this host only",
                value=1 if shared.up else 0,
            )
        audit_lost = self.metrics.audit_records_lost
        if audit_lost is not None:
            yield CounterMetricFamily(
                "registry_gateway_audit_records_lost",
                "Audit records that could not be written to the audit log",
                value=audit_lost(),
            )
        cache = CounterMetricFamily(
            "registry_gateway_credential_cache", "Verified-credential cache lookups", labels=["result"]
        )
        cache.add_metric(["hit"], self.cache.hits)
        cache.add_metric(["miss"], self.cache.misses)
        yield cache
        checks = CounterMetricFamily(
            "registry_gateway_password_checks", "Password hash verifications (bcrypt and the like) run"
        )
        checks.add_metric([], self.cache.verifications)
        yield checks
        reloads = CounterMetricFamily(
            "registry_gateway_reloads", "Reloads of the htpasswd and policy files", labels=["result"]
        )
        reloads.add_metric(["success"], self.store.reloads_ok)
        reloads.add_metric(["failure"], self.store.reloads_failed)
        yield reloads
        yield GaugeMetricFamily(
            "registry_gateway_config_up",
            "1 while the running users, rules and robots are what their files say; 0 after a "
            "refused reload, while the last good ones run (see /readyz and /status)",
            value=1 if self.store.stale_since is None else 0,
        )
        yield GaugeMetricFamily(
            "registry_gateway_config_loaded_timestamp_seconds",
            "When the running users, rules and robots were loaded (Unix time)",
            value=self.store.loaded_at,
        )
        requests = CounterMetricFamily(
            "registry_gateway_requests", "Requests under /v2/", labels=["operation", "status", "decision"]
        )
        for (operation, status, decision), count in list(self.metrics.requests.items()):
            requests.add_metric([operation, str(status), decision], count)
        yield requests
        latency = HistogramMetricFamily(
            "registry_gateway_upstream_latency_seconds",
            "Time until the registry's response headers",
            labels=["operation"],
        )
        for operation, counts in list(self.metrics.upstream_latency.items()):
            latency.add_metric([operation], _cumulative(counts), sum_value=counts[-1])
        yield latency
        fast = CounterMetricFamily(
            "registry_gateway_fast_path",
            "Requests served on the fast path (and of them: heads whose header section was taken over"
            " from an earlier head of the same client, answers whose head the registry had sent"
            " before); connections it handed to the full path, and took back",
            labels=["outcome"],
        )
        fast.add_metric(["served"], self.metrics.fast_served)
        fast.add_metric(["handed_off"], self.metrics.fast_handed_off)
        fast.add_metric(["taken_back"], self.metrics.fast_taken_back)
        fast.add_metric(["section_reused"], self.metrics.fast_section_reused)
        fast.add_metric(["answer_reused"], self.metrics.fast_answer_reused)
        yield fast


class Metrics:
    def __init__(self, cache: CredentialCache, store: AccessStore) -> None:
        self.store = store  # what runs: /readyz says whether it is what the files say
        self.registry = CollectorRegistry()
        self.auth_failures = Counter(
            "registry_gateway_auth_failures", "Failed authentications", ["reason"], registry=self.registry
        )
        self.bytes = Counter(
            "registry_gateway_bytes", "Body bytes moved", ["direction"], registry=self.registry
        )
        self.tokens = Counter(
            "registry_gateway_tokens",
            "Tokens issued, and tokens refused by reason",
            ["result", "reason"],
            registry=self.registry,
        )
        # A plain count read at scrape time: a Gauge takes a lock twice a request.
        self.in_flight = 0
        self.fast_served = 0  # plain counts too, read at scrape time (gateway.http.fastpath)
        self.fast_handed_off = 0
        self.fast_taken_back = 0
        self.fast_section_reused = 0  # heads served with a kept header section (fastpath.Sections)
        self.fast_answer_reused = 0  # answers made from a head read before (upstream.KnownHead)
        # The directory's last problem (None: fine), when logins go to one.
        self.directory_state: Callable[[], str | None] | None = None
        # Audit records that could not be written so far, when there is an audit log.
        self.audit_records_lost: Callable[[], int] | None = None
        self.shared_state: RedisLink | None = None  # Redis, with redis_url
        self.certificates: CertificateManager | None = None  # with acme_directory
        self.registry.register(_StateCollector(cache, store, self))
        # Every request is counted and (when forwarded) timed: plain counts, read at scrape time.
        # prometheus_client's Counter and Histogram take a lock per update and its Histogram a
        # Python loop over the buckets; together they were 3.4% of the instructions per proxied
        # HEAD (callgrind).
        self.requests: dict[tuple[str, int, str], int] = {}  # (operation, status, decision)
        self.upstream_latency: dict[str, list[float]] = {}  # per operation: bucket counts, then the sum
        self.bytes_in = self.bytes.labels("in")
        self.bytes_out = self.bytes.labels("out")

    def count_request(self, operation: str, status: int, decision: str) -> None:
        key = (operation, status, decision)
        self.requests[key] = self.requests.get(key, 0) + 1

    def observe_upstream(self, operation: str, seconds: float) -> None:
        counts = self.upstream_latency.get(operation)
        if counts is None:
            counts = self.upstream_latency[operation] = [0.0] * (len(LATENCY_BUCKETS) + 2)
        counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1  # the first bucket it is within
        counts[-1] += seconds

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


MIN_TOKEN_LENGTH = 16


def read_scrape_token(path: Path) -> bytes:
    """The token in a metrics_token_file: one line of at least MIN_TOKEN_LENGTH visible ASCII
    characters. Raises ValueError saying what is wrong, never quoting the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(files.describe_read_error(path, exc)) from None
    token = text.strip()
    if not token:
        raise ValueError(f"{path} is empty; put a token in it (for example: openssl rand -hex 32)")
    if not all("!" <= ch <= "~" for ch in token):
        raise ValueError(f"{path}: the token must be one line of visible ASCII without spaces")
    if len(token) < MIN_TOKEN_LENGTH:
        raise ValueError(f"{path}: the token must be at least {MIN_TOKEN_LENGTH} characters long")
    return token.encode()


class ScrapeToken:
    """The token /metrics asks for, from metrics_token_file: Prometheus sends it as a bearer token
    (authorization.credentials_file) or as the password of Basic credentials, whatever the user
    name (basic_auth.password_file). The file is looked at on every scrape and re-read when it
    changed, so a new token needs no restart; while it cannot be read, the last good one holds."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._signature = files.signature(path)
        self._token = read_scrape_token(path)  # checked at start-up (config): no reason to fail here

    def _current(self) -> bytes:
        signature = files.signature(self.path)
        if signature != self._signature:
            self._signature = signature
            try:
                self._token = read_scrape_token(self.path)
            except ValueError as exc:
                log.warning("metrics_token_file: %s; keeping the last good token", exc)
        return self._token

    def allows(self, authorization: str | None) -> bool:
        if not authorization:
            return False
        scheme, _, credentials = authorization.strip().partition(" ")
        offered = credentials.strip().encode("utf-8", "replace")
        if scheme.lower() == "basic":
            try:
                decoded = base64.b64decode(offered, validate=True)
            except (binascii.Error, ValueError):
                return False
            offered = decoded.partition(b":")[2]
        elif scheme.lower() != "bearer":
            return False
        # Constant time: a scraper's wrong guesses learn nothing from how long a refusal takes.
        return hmac.compare_digest(offered, self._current())


# The name the metrics token's failures are counted under: no account has it (htpasswd and
# Basic credentials cannot hold a colon in a user name).
SCRAPER = ":metrics"


async def check_scraper(
    token: ScrapeToken, lockout: SharedLockout | None, request: web.Request
) -> web.Response | None:
    """None when the scrape carries the token; else the answer (429 for a locked pair, 401)."""
    client = canonical_ip(request.remote or "")
    authorization = request.headers.get("Authorization")
    if lockout is not None:
        wait = await lockout.retry_after(client, SCRAPER, time.monotonic())
        if wait is not None:
            return locked_response(Locked(wait))
    if token.allows(authorization):
        if lockout is not None:
            await lockout.succeeded(client, SCRAPER)
        return None
    if lockout is not None and authorization:
        await lockout.failed(client, SCRAPER, time.monotonic(), authorization.encode())
    log.info("refused a /metrics scrape from %s without the metrics token", client)
    return error_response(
        401,
        "UNAUTHORIZED",
        "the metrics token is required",
        headers={"WWW-Authenticate": 'Bearer realm="registry-gateway metrics"'},
    )


def metrics_app(
    metrics: Metrics,
    session: aiohttp.ClientSession,
    upstream: URL,
    directory_status: Callable[[], Awaitable[str | None]] | None = None,
    scrape_token: ScrapeToken | None = None,
    lockout: SharedLockout | None = None,
    status: Callable[[], Mapping[str, object]] | None = None,
) -> web.Application:
    """/metrics (behind `scrape_token` when there is one), /healthz and /readyz (always open: the
    image's HEALTHCHECK and orchestrators' probes carry no credentials, and they say nothing but
    whether the gateway and its registry answer). The token is a secret like a password: the
    lockout is consulted before it is compared, and a wrong one counts as a failed login of
    the pair (client address, SCRAPER)."""

    async def metrics_page(request: web.Request) -> web.Response:
        if scrape_token is not None:
            refused = await check_scraper(scrape_token, lockout, request)
            if refused is not None:
                return refused
        return web.Response(body=metrics.exposition(), headers={"Content-Type": CONTENT_TYPE})

    async def healthz(_request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_request: web.Request) -> web.Response:
        # Ready when users and rules are loaded (they are, or we would not run) and the registry
        # answers its base endpoint with anything but a server error.
        ok, detail = await probe_registry(session, upstream)
        answer = {"status": "ok" if ok else "unavailable", "detail": detail}
        # Reported, not failed on: the last good users and rules serve well enough, and every
        # replica reading the same broken file would turn unready at once.
        answer["configuration"] = configuration_state(metrics.store)
        if metrics.certificates is not None:
            # Not ready while there is no valid certificate: HTTPS serves nothing then.
            answer["certificate"] = metrics.certificates.status()
            if not metrics.certificates.ready():
                ok = False
                answer["status"] = "unavailable"
        if metrics.shared_state is not None:
            # Reported, not failed on: every replica would turn unready at once when Redis goes,
            # an outage of the whole registry for the loss of a guard that still counts locally.
            answer["redis"] = metrics.shared_state.status()
        directory = await directory_status() if directory_status is not None else None
        if directory is not None:
            # Reported, not failed on: users with a cached login keep working without it.
            answer["directory"] = directory
        return web.json_response(answer, status=200 if ok else 503)

    async def status_page(request: web.Request) -> web.Response:
        # Behind the metrics token: no secret is in it, but file paths and key ids are not for everyone.
        if scrape_token is not None:
            refused = await check_scraper(scrape_token, lockout, request)
            if refused is not None:
                return refused
        ok, detail = await probe_registry(session, upstream)
        answer: dict[str, object] = dict(status()) if status is not None else {}
        answer["registry"] = {"url": str(upstream), "answers": ok, "detail": detail}
        directory = await directory_status() if directory_status is not None else None
        if directory is not None:
            answer["directory"] = directory
        return web.json_response(answer)

    app = web.Application()
    app.router.add_get("/metrics", metrics_page)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/status", status_page)
    return app


async def probe_registry(session: aiohttp.ClientSession, upstream: URL) -> tuple[bool, str]:
    """Whether the registry answers its base endpoint with anything but a server error."""
    try:
        async with session.get(
            URL(f"{upstream}/v2/", encoded=True), timeout=aiohttp.ClientTimeout(total=3)
        ) as response:
            return response.status < 500, f"registry answered {response.status}"
    except (TimeoutError, aiohttp.ClientError) as exc:
        return False, f"registry unreachable: {type(exc).__name__}"


def configuration_state(store: AccessStore) -> str:
    """For /readyz, which is open to all: whether what runs is what the files say, and since
    when it is not. Why is for /status (behind the metrics token): a parser's message can name
    users, robots and rules."""
    if store.stale_since is None:
        return f"current, loaded at {_iso(store.loaded_at)}"
    return (
        f"stale since {_iso(store.stale_since)}: the files did not load, the last good ones run (see /status)"
    )


def _iso(moment: float) -> str:
    return dt.datetime.fromtimestamp(moment, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
