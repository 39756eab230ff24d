"""The server runtime: one gateway process from its settings to its shutdown.

`run_server` builds the application, opens its listeners (the main one, /metrics, the HTTP to
HTTPS redirect), then handles the signals (SIGTERM/SIGINT stop after the transfers in flight,
SIGHUP reloads users, rules, the audit log, the certificate and the token key) and watches the
certificate. `run_event_loop` runs it on uvloop when installed; `configure_logging` sets up the
diagnostic log. One process or each worker of `gateway.supervisor` runs this; the command line
(`gateway.cli`) only parses arguments and chooses.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import ipaddress
import json
import logging
import signal
import ssl
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web
from yarl import URL

from gateway import __version__, config
from gateway.app import (
    AUDIT_KEY,
    AUTHENTICATOR_KEY,
    AUTHORITY_KEY,
    GATEWAY_KEY,
    METRICS_KEY,
    SESSION_KEY,
    create_app,
)
from gateway.audit import AuditLogError
from gateway.http.server import ListenerRunner, listener_runner
from gateway.lockout import Lockout
from gateway.metrics import ScrapeToken, metrics_app, probe_registry
from gateway.redirect import redirect_app
from gateway.state import AccessStore
from gateway.tls import TlsContext
from gateway.tokens.keys import KeyError_
from gateway.tokens.revocations import RevocationsError

if TYPE_CHECKING:
    from gateway.acme.manager import CertificateManager

log = logging.getLogger("gateway")


class JsonFormatter(logging.Formatter):
    """The diagnostic log as one JSON object a line, for log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(level: str, log_format: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler])


class StartupError(Exception):
    """The gateway cannot start as configured; the message names the setting and what is wrong."""


class ListenError(StartupError):
    """An address the gateway is configured to listen on cannot be bound."""


async def start_site(runner: web.BaseRunner, key: str, host: str, port: int, **options: Any) -> None:
    """Listen on host:port with `runner` (set up); `key` names the setting in the error."""
    try:
        await web.TCPSite(runner, host, port, **options).start()
    except OSError as exc:
        hint = " (choose another address or stop what uses it)" if exc.errno == errno.EADDRINUSE else ""
        raise ListenError(f"{key}: cannot listen on {host}:{port}: {exc.strerror or exc}{hint}") from None


def run_each(steps: Sequence[tuple[str, Callable[[], object]]]) -> None:
    """Run every step, whatever the others do: one that raises is logged, and the rest still run."""
    for name, step in steps:
        try:
            step()
        except Exception:
            log.exception("%s failed; the other steps went on", name)


async def run_server(
    settings: config.Settings,
    store: AccessStore,
    on_serving: Callable[[], None] | None = None,
    lockout: Lockout | None = None,
    metrics_socket: Path | None = None,
) -> None:
    """Serve until SIGTERM or SIGINT; `on_serving` is called once the listeners answer; `lockout`
    is the table of failed logins when the workers share one; `metrics_socket` is where a worker
    serves its metrics to the metrics process (gateway.metrics_hub) instead of metrics_listen.
    Raises StartupError (ListenError when an address is taken), after cleaning up, when it cannot
    start."""

    def where(key: str) -> str:
        return config.where(key, settings.origins.get(key, "default"))

    # Checked at start-up, but a worker started later (with workers > 1) reads the files as they
    # are then: what went wrong since is said in a line naming the setting, not a traceback.
    try:
        app = create_app(settings, store, lockout=lockout)
    except AuditLogError as exc:
        raise StartupError(f"{where('audit_log')}: {exc}") from None
    except KeyError_ as exc:
        raise StartupError(f"{where('token_key')}: {exc}") from None
    except RevocationsError as exc:
        raise StartupError(f"{where('token_revocations')}: {exc}") from None
    tls = None
    certificates: CertificateManager | None = None  # with acme_directory
    acme_routes: list[web.RouteDef] = []
    try:
        if settings.acme_directory is not None and settings.tls_cert and settings.tls_key:
            # Imported only here: the ACME client (certbot's library, requests) weighs megabytes.
            from gateway.acme.challenges import AlpnChallenges, http01_answer
            from gateway.acme.manager import CertificateManager
            from gateway.acme.ordering import Order
            from gateway.acme.storage import Storage

            storage = Storage(settings.acme_storage)
            storage.prepare()
            tls = TlsContext(
                settings.tls_cert, settings.tls_key, managed=True, challenges=AlpnChallenges(storage)
            )
            order = Order(
                str(settings.acme_directory),
                settings.acme_names,
                settings.acme_email,
                # HTTP-01 is answered on the redirect listener only.
                [kind for kind in settings.acme_challenges if kind != "http-01" or settings.redirect_listen],
                settings.acme_ca_file,
            )
            certificates = CertificateManager(order, storage, on_new=tls.reload_if_changed)
            app[METRICS_KEY].certificates = certificates
            acme_routes.append(http01_answer(storage))
        elif settings.tls_cert and settings.tls_key:
            tls = TlsContext(settings.tls_cert, settings.tls_key)
    except (OSError, ssl.SSLError) as exc:
        key = "acme_storage" if settings.acme_directory is not None else "tls_cert"
        raise StartupError(f"{where(key)}: cannot load: {exc}") from None
    # Every listener is built by listener_runner: the same limits, error handling and headers.
    runner = listener_runner(app, settings)
    await runner.setup()
    listeners: list[ListenerRunner] = [runner]

    async def open_extra(key: str, extra: ListenerRunner, address: tuple[str, int]) -> None:
        await extra.setup()
        listeners.append(extra)
        await start_site(extra, key, *address)

    try:
        if metrics_socket is not None:
            # Only the metrics process reaches it (the directory is the gateway user's alone),
            # and it asks for the metrics token itself.
            own = metrics_app(
                app[METRICS_KEY],
                app[SESSION_KEY],
                settings.upstream,
                app[GATEWAY_KEY].directory_status,
                status=app[GATEWAY_KEY].status,
            )
            worker_metrics = listener_runner(own, settings)
            await worker_metrics.setup()
            listeners.append(worker_metrics)
            await web.UnixSite(worker_metrics, str(metrics_socket)).start()
        elif settings.metrics_listen is not None:
            scrape_token = None
            if settings.metrics_token_file is not None:
                try:
                    scrape_token = ScrapeToken(settings.metrics_token_file)
                except ValueError as exc:  # checked at start-up; a worker started later reads it anew
                    raise StartupError(f"{where('metrics_token_file')}: {exc}") from None
            if scrape_token is None and not _loopback(settings.metrics_listen[0]):
                log.warning(
                    "%s: /metrics is open to everyone who reaches %s:%d; set metrics_token_file",
                    where("metrics_listen"),
                    *settings.metrics_listen,
                )
            metrics = metrics_app(
                app[METRICS_KEY],
                app[SESSION_KEY],
                settings.upstream,
                app[GATEWAY_KEY].directory_status,
                scrape_token,
                app[GATEWAY_KEY].lockout,
                app[GATEWAY_KEY].status,
            )
            await open_extra("metrics_listen", listener_runner(metrics, settings), settings.metrics_listen)
        if settings.redirect_listen is not None:
            https_port = settings.redirect_to_port or settings.listen_port
            redirect = listener_runner(redirect_app(https_port, acme_routes), settings)
            await open_extra("redirect_listen", redirect, settings.redirect_listen)
        # The main listener last: once it answers (what start-up checks and healthchecks wait
        # for), the metrics and redirect listeners answer too.
        await start_site(
            runner,
            "listen",
            settings.listen_host,
            settings.listen_port,
            backlog=1024,
            reuse_port=settings.workers > 1,
            ssl_context=tls.context if tls else None,
        )
    except ListenError:
        for extra in reversed(listeners):  # the main runner last, as at shutdown
            await extra.cleanup()
        app[AUDIT_KEY].close()
        raise
    # What exists now (modules, settings, users, rules) lives as long as the process: moved out of
    # the collector's sight, so that its full collections, triggered by the garbage requests leave,
    # stop walking all of it (about a tenth of the CPU of a small request, measured).
    gc.freeze()
    log.info(
        "registry-gateway %s listening on %s://%s:%d, upstream %s",
        __version__,
        "https" if tls else "http",
        settings.listen_host,
        settings.listen_port,
        settings.upstream,
    )
    log.info("loaded %s", store.summary())
    authority = app.get(AUTHORITY_KEY)
    if authority is not None:
        log.info("token keys (signing first): %s", ", ".join(authority.key_ids()))
    if on_serving is not None:
        on_serving()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)

    reloads: set[asyncio.Task[bool]] = set()

    def reload_users() -> None:
        task = asyncio.create_task(app[AUTHENTICATOR_KEY].reload_if_changed(True))
        reloads.add(task)  # keep a reference until it is done
        task.add_done_callback(reloads.discard)

    def on_hup() -> None:
        # Independent reloads: one that fails must not keep a renewed certificate or token key
        # from being taken.
        steps: list[tuple[str, Callable[[], object]]] = [
            ("SIGHUP: reloading users and rules", reload_users),
            ("SIGHUP: reopening the audit log", app[AUDIT_KEY].reopen),
        ]
        if tls is not None:
            steps.append(("SIGHUP: reloading the TLS certificate", tls.reload_if_changed))
        authority = app.get(AUTHORITY_KEY)
        if authority is not None:
            steps.append(("SIGHUP: reloading the token key", authority.reload_if_changed))
        run_each(steps)

    loop.add_signal_handler(signal.SIGHUP, on_hup)

    async def watch_tls() -> None:
        while tls is not None:
            await asyncio.sleep(settings.reload_interval)
            tls.reload_if_changed()

    watcher = asyncio.create_task(watch_tls())
    registry_watch = asyncio.create_task(_say_when_the_registry_answers(app[SESSION_KEY], settings.upstream))
    if certificates is not None:
        certificates.start()  # once the listeners answer the CA's challenges
    try:
        await stop.wait()
    finally:
        log.info("shutting down: finishing transfers in flight (up to %s s)", settings.shutdown_grace)
        watcher.cancel()
        registry_watch.cancel()
        if certificates is not None:
            await certificates.stop()
        for extra in listeners[1:]:
            await extra.cleanup()
        started = time.monotonic()
        await runner.cleanup()
        # A finished response may still sit in a transport's write buffer: connections count as
        # closed only once it is flushed (connection_lost), so wait for them before the loop ends.
        for listener in listeners:
            if listener.limits.open > 0:
                remaining = max(0.0, settings.shutdown_grace - (time.monotonic() - started))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(listener.limits.idle.wait(), remaining)
        app[AUDIT_KEY].close()
        log.info("stopped after %.1f s of shutdown", time.monotonic() - started)


async def _say_when_the_registry_answers(session: aiohttp.ClientSession, upstream: URL) -> None:
    """At start, as check-config does: a registry that does not answer is worth a warning (every
    request gets 502 until it does), and the moment it starts answering a line of its own."""
    answers, detail = await probe_registry(session, upstream)
    if answers:
        return
    log.warning("the registry at %s does not answer (%s): requests get 502 until it does", upstream, detail)
    while not answers:
        await asyncio.sleep(REGISTRY_CHECK_SECONDS)
        answers, detail = await probe_registry(session, upstream)
    log.info("the registry at %s answers now (%s)", upstream, detail)


REGISTRY_CHECK_SECONDS = 2.0


def _loopback(host: str) -> bool:
    """Whether a listen address is reachable from this host (or container) only."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def run_event_loop(main: Coroutine[Any, Any, None]) -> None:
    """Run on uvloop when it is installed (the `speed` extra), else on asyncio's own loop."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
    else:
        uvloop.run(main)
