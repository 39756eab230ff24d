"""`registry-gateway` command line: serve, check-config, demo."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import gc
import ipaddress
import json
import logging
import multiprocessing
import os
import signal
import ssl
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from aiohttp import web

from gateway import __version__, admin_cli, config, docker_auth, policyfile
from gateway.errors import error_response
from gateway.forwarding import valid_host
from gateway.lockout import Lockout
from gateway.state import AccessStore, StateError

log = logging.getLogger("gateway")

SETTING_FLAGS: tuple[tuple[str, str], ...] = (
    ("listen", "HOST:PORT to listen on (default 0.0.0.0:8080)"),
    ("upstream", "registry URL (default http://registry:5000)"),
    ("htpasswd", "Apache htpasswd file with the users"),
    ("policy", "policy file with ACL rules, labels and static users (default: admin-prefix policy)"),
    ("admin_prefix", "users whose name starts with this may push and delete (default admin)"),
    ("realm", "realm of the Basic challenge"),
    ("workers", "worker processes sharing the port (default 1)"),
    ("audit_log", "audit log file, one JSON object a line ('-' for stdout)"),
    ("metrics_listen", "HOST:PORT for /metrics, /healthz and /readyz"),
    ("tls_cert", "TLS certificate chain file (PEM); with --tls-key, serve HTTPS"),
    ("tls_key", "TLS private key file (PEM)"),
)


def _add_config_flags(parser: argparse.ArgumentParser, *, serve: bool) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help=f"YAML settings file (or ${config.ENV_PREFIX}CONFIG)",
    )
    if serve:
        for key, help_text in SETTING_FLAGS:
            parser.add_argument(f"--{key.replace('_', '-')}", dest=key, default=None, help=help_text)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="registry-gateway",
        description="Authenticating, authorizing, streaming proxy for a Docker/OCI registry.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the gateway")
    _add_config_flags(serve, serve=True)
    check = commands.add_parser("check-config", help="validate the settings and exit")
    _add_config_flags(check, serve=True)
    token = commands.add_parser("token", help="token signing keys")
    token_commands = token.add_subparsers(dest="token_command", required=True)
    keygen = token_commands.add_parser(
        "keygen",
        help="write a signing key (mode 0600; 0640 if it was) and a self-signed certificate for the registry",
    )
    keygen.add_argument("--key", type=Path, required=True, help="private key file to write (PEM)")
    keygen.add_argument("--cert", type=Path, default=None, help="certificate file (default: KEY with .crt)")
    keygen.add_argument("--rsa", action="store_true", help="RSA 3072 instead of EC P-256")
    keygen.add_argument("--name", default="registry-gateway token signer", help="certificate common name")
    replacing = keygen.add_mutually_exclusive_group()  # one says "drop the key", the other "keep it"
    replacing.add_argument("--force", action="store_true", help="replace existing files")
    replacing.add_argument(
        "--rotate",
        action="store_true",
        help="a new signing key in front of KEY's current one, which stays accepted (refresh tokens"
        " it signed keep working); older previous keys are dropped; the certificate is replaced",
    )
    revoke = token_commands.add_parser(
        "revoke", help="void every token issued to USER until now (refresh tokens included)"
    )
    revoke.add_argument("user")
    revoke.add_argument(
        "--file", type=Path, default=None, help="revocations file (default: token_revocations)"
    )
    _add_config_flags(revoke, serve=False)
    health = commands.add_parser(
        "healthcheck", help="exit 0 if the gateway of these settings serves (the image's HEALTHCHECK)"
    )
    _add_config_flags(health, serve=False)
    admin_cli.add_parsers(commands)
    demo = commands.add_parser(
        "demo", help="run a local registry (Debian's docker-registry) and the gateway with demo users"
    )
    demo.add_argument("--data", type=Path, default=Path(".demo"), help="where the demo keeps its files")
    demo.add_argument("--listen", default="127.0.0.1:8080", help="gateway address (default 127.0.0.1:8080)")
    demo.add_argument(
        "--registry-listen", default="127.0.0.1:5000", help="registry address (default 127.0.0.1:5000)"
    )
    demo.add_argument("--registry-bin", default="/usr/bin/docker-registry", help="registry binary")
    return parser


def _config_file(args: argparse.Namespace) -> Path | None:
    config_file: Path | None = getattr(args, "config", None)
    if config_file is None and os.environ.get(config.ENV_PREFIX + "CONFIG"):
        config_file = Path(os.environ[config.ENV_PREFIX + "CONFIG"])
    return config_file


def _settings(args: argparse.Namespace) -> config.Settings:
    flags: dict[str, Any] = {key: getattr(args, key, None) for key, _ in SETTING_FLAGS}
    return config.load(_config_file(args), os.environ, flags)


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


CANNOT_START = 3  # a worker's exit status when it could not start serving


class StartupError(Exception):
    """The gateway cannot start as configured; the message names the setting and what is wrong."""


class ListenError(StartupError):
    """An address the gateway is configured to listen on cannot be bound."""


async def _start_site(runner: web.BaseRunner, key: str, host: str, port: int, **options: Any) -> None:
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
) -> None:
    """Serve until SIGTERM or SIGINT; `on_serving` is called once the listeners answer; `lockout`
    is the table of failed logins when the workers share one. Raises StartupError (ListenError
    when an address is taken), after cleaning up, when it cannot start."""
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
    from gateway.metrics import ScrapeToken, metrics_app
    from gateway.server import ListenerRunner, listener_runner
    from gateway.tls import TlsContext
    from gateway.tokens.keys import KeyError_
    from gateway.tokens.revocations import RevocationsError

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
    try:
        if settings.tls_cert and settings.tls_key:
            tls = TlsContext(settings.tls_cert, settings.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise StartupError(f"{where('tls_cert')}: cannot load with tls_key: {exc}") from None
    # Every listener is built by listener_runner: the same limits, error handling and headers.
    runner = listener_runner(app, settings)
    await runner.setup()
    listeners: list[ListenerRunner] = [runner]

    async def open_extra(key: str, extra: ListenerRunner, address: tuple[str, int]) -> None:
        await extra.setup()
        listeners.append(extra)
        await _start_site(extra, key, *address)

    try:
        if settings.metrics_listen is not None:
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
            )
            await open_extra("metrics_listen", listener_runner(metrics, settings), settings.metrics_listen)
        if settings.redirect_listen is not None:
            https_port = settings.redirect_to_port or settings.listen_port
            redirect = listener_runner(_redirect_app(https_port), settings)
            await open_extra("redirect_listen", redirect, settings.redirect_listen)
        # The main listener last: once it answers (what start-up checks and healthchecks wait
        # for), the metrics and redirect listeners answer too.
        await _start_site(
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
    try:
        await stop.wait()
    finally:
        log.info("shutting down: finishing transfers in flight (up to %s s)", settings.shutdown_grace)
        watcher.cancel()
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


def _loopback(host: str) -> bool:
    """Whether a listen address is reachable from this host (or container) only."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _redirect_app(https_port: int) -> web.Application:
    """Plain HTTP that sends every request to the same path over HTTPS."""

    async def redirect(request: web.Request) -> web.StreamResponse:
        # Only a path reaches here (gateway.server refuses other request targets).
        if not valid_host(request.host):
            return error_response(400, "UNSUPPORTED", "invalid Host header")
        host = request.host.rsplit(":", 1)[0] if not request.host.endswith("]") else request.host
        port = "" if https_port == 443 else f":{https_port}"
        raise web.HTTPMovedPermanently(f"https://{host}{port}{request.raw_path}")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", redirect)
    return app


def run_event_loop(main: Coroutine[Any, Any, None]) -> None:
    """Run on uvloop when it is installed (the `speed` extra), else on asyncio's own loop."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
    else:
        uvloop.run(main)


def _serve(args: argparse.Namespace) -> int:
    try:
        settings = _settings(args)
    except config.ConfigError as exc:
        print("registry-gateway: invalid configuration:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    try:
        store = AccessStore(settings.htpasswd, settings.policy)
    except StateError as exc:
        print("registry-gateway: cannot load users and rules:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return 2
    try:
        settings = docker_auth.apply(settings, store.snapshot.policy)
    except docker_auth.DockerAuthError as exc:
        print(f"registry-gateway: invalid configuration:\n  {exc}", file=sys.stderr)
        return 2
    for note in docker_auth.not_applied(settings, store.snapshot.policy):
        log.warning("policy file %s: %s", settings.policy, note)
    store.use_docker_auth_service(settings.token_service)
    if settings.workers > 1:
        return supervise(settings)
    try:
        run_event_loop(run_server(settings, store))
    except StartupError as exc:
        log.error("%s", exc)
        return 2
    return 0


SUPERVISED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def _worker_main(settings: config.Settings, report: Connection, lockout: Lockout) -> None:
    """One worker: tells the supervisor through `report` that it serves (None) or why it could not
    start (the message), then serves."""
    for signum in SUPERVISED_SIGNALS:
        signal.signal(signum, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, SUPERVISED_SIGNALS)  # blocked by supervise's start
    try:
        store = AccessStore(settings.htpasswd, settings.policy, docker_auth_service=settings.token_service)
        run_event_loop(run_server(settings, store, on_serving=lambda: report.send(None), lockout=lockout))
    except StartupError as exc:
        report.send(str(exc))
        sys.exit(CANNOT_START)
    except StateError as exc:
        # The files changed since the supervisor read them (it refuses bad ones at start-up).
        report.send("cannot load users and rules: " + "; ".join(exc.problems))
        sys.exit(CANNOT_START)


@dataclass
class _Worker:
    """A worker process, and the supervisor's end of the pipe on which it reports its start."""

    process: multiprocessing.process.BaseProcess
    reports: Connection
    serving: bool = False
    counted: bool = False  # its start has reset the supervisor's backoff
    failure: str | None = None  # why it could not start, as it said

    def read_reports(self) -> None:
        try:
            while self.reports.poll():
                message = self.reports.recv()
                if message is None:
                    self.serving = True
                else:
                    self.failure = str(message)
        except (EOFError, OSError):
            pass  # it has exited: all it sent has been read


MIN_RESTART_SECONDS, MAX_RESTART_SECONDS = 1.0, 30.0


def supervise(settings: config.Settings) -> int:
    """Run `settings.workers` processes sharing the port (SO_REUSEPORT), so every core serves.

    Each worker loads users and rules itself and keeps its own credential cache. SIGTERM/SIGINT
    stop them all (each finishes its transfers in flight); SIGHUP is passed on; a worker that dies
    is started again; one of the first that cannot start stops them all (exit 2), a replacement
    that cannot start is tried again with a growing delay while the others serve.
    """
    context = multiprocessing.get_context("fork")
    # Made before any worker, so every worker (and every replacement) maps the same table.
    lockout = Lockout(settings.lockout_attempts, settings.lockout_window)
    workers: list[_Worker] = []
    stopping = False

    def start(index: int | None = None) -> None:
        """A new worker, at `index` of `workers` (or appended). The signals the supervisor handles
        wait meanwhile: a SIGTERM must find the new worker in the list, and a SIGHUP must not reach
        the child before it has put the default handlers back (_worker_main unblocks them)."""
        reports, report = context.Pipe(duplex=False)
        process = context.Process(
            target=_worker_main, args=(settings, report, lockout), name="registry-gateway-worker"
        )
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, SUPERVISED_SIGNALS)
        try:
            process.start()
            worker = _Worker(process, reports)
            if index is None:
                workers.append(worker)
            else:
                workers[index] = worker
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        report.close()  # the worker's end: once it exits, reading finds the end of its reports

    def on_stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for worker in workers:
            if worker.process.pid is not None and worker.process.is_alive():
                os.kill(worker.process.pid, signal.SIGTERM)

    def on_hup(_signum: int, _frame: object) -> None:
        for worker in workers:
            if worker.process.pid is not None and worker.process.is_alive():
                os.kill(worker.process.pid, signal.SIGHUP)

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGHUP, on_hup)
    for _ in range(settings.workers):
        start()
    log.info("supervising %d workers on %s:%d", settings.workers, settings.listen_host, settings.listen_port)
    up = False  # every first worker has served once
    retry_at: dict[int, float] = {}  # index -> when to start a worker there again
    backoff = MIN_RESTART_SECONDS
    while True:
        for index, worker in enumerate(workers):
            if index in retry_at:
                if time.monotonic() < retry_at[index] or stopping:
                    time.sleep(0.2)
                    continue
                del retry_at[index]
                start(index)
                continue
            worker.process.join(timeout=0.2)
            worker.read_reports()
            if worker.serving and not worker.counted:
                worker.counted = True
                backoff = MIN_RESTART_SECONDS  # a worker started: the files are good again
            if worker.process.is_alive() or stopping:
                continue
            worker.read_reports()  # what it sent just before it exited
            worker.reports.close()
            exitcode = worker.process.exitcode
            failed_to_start = not worker.serving and exitcode is not None and exitcode >= 0
            why = worker.failure or (
                f"worker {worker.process.pid} exited with {exitcode} before it served"
                " (its error is logged above)"
            )
            if failed_to_start and not up:
                # At start-up, a worker that cannot start would fail the same way at every try:
                # what stopped it (an address taken, a file the settings name) is the machine and
                # the files as they are, and a new worker reads the same. As gunicorn does with a
                # worker that fails to boot, all stop (each finishing its transfers in flight) and
                # the supervisor exits 2 with the worker's message: what a single process does,
                # and what a process manager shows an operator.
                log.error("%s; a worker could not start: stopping all workers", why)
                on_stop(signal.SIGTERM, None)
                for other in workers:
                    other.process.join()
                return 2
            if failed_to_start:
                # Later, the others serve on the users and rules they loaded while a file is
                # broken (a reload keeps the last good ones): stopping them all would turn one
                # crashed worker and one bad edit into an outage. The replacement is tried again,
                # less and less often, until the files are fixed.
                log.error("%s; the other workers keep serving; another try in %gs", why, backoff)
                retry_at[index] = time.monotonic() + backoff
                backoff = min(backoff * 2, MAX_RESTART_SECONDS)
                continue
            log.error("worker %d exited with %s; starting another", worker.process.pid, exitcode)
            retry_at[index] = time.monotonic() + MIN_RESTART_SECONDS
        if not up and all(worker.serving for worker in workers):
            up = True
        if stopping and not any(worker.process.is_alive() for worker in workers):
            return 0


def _origin(settings: config.Settings, key: str) -> str:
    origin = settings.origins.get(key, "default")
    if origin == "env":
        return f"environment {config.env_name(key)}"
    if origin == "flag":
        return f"flag --{key.replace('_', '-')}"
    return origin


def _check_config(args: argparse.Namespace) -> int:
    from gateway.probes import directory_problem, registry_problem

    try:
        settings = _settings(args)
    except config.ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        print(f"configuration invalid: {len(exc.problems)} problem(s)", file=sys.stderr)
        return 1
    if settings.policy is not None:
        try:
            policy = policyfile.load(settings.policy)
            settings = docker_auth.apply(settings, policy)
        except (policyfile.PolicyError, docker_auth.DockerAuthError) as exc:
            print(exc, file=sys.stderr)
            return 1
        for note in [*policy.warnings, *docker_auth.not_applied(settings, policy)]:
            print(f"warning: policy file {settings.policy}: {note}", file=sys.stderr)
        if policy.ldap is not None:
            # The directory as logins will use it: a refused service account or the wrong tls
            # would otherwise show only as every directory login refused.
            directory = directory_problem(policy.ldap)
            if directory is not None and directory[1]:
                print(f"policy file {settings.policy}: {directory[0]}", file=sys.stderr)
                return 1
            if directory is not None:
                print(f"warning: the directory: {directory[0]}", file=sys.stderr)
            else:
                print(f"the directory at {policy.ldap.addr} takes the service account's bind")
    print("configuration OK; effective settings:")
    for key in config.DEFAULTS:
        value: object = (
            f"{settings.listen_host}:{settings.listen_port}" if key == "listen" else getattr(settings, key)
        )
        if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], int):
            value = f"{value[0]}:{value[1]}"
        shown = "(none)" if value is None or value == () else str(value)
        print(f"  {key:<22} {shown}  [{_origin(settings, key)}]")
    unreachable = registry_problem(settings.upstream)
    if unreachable is not None:
        print(f"warning: the registry: {unreachable}", file=sys.stderr)
    else:
        print(f"the registry at {settings.upstream} answers")
    return 0


def _revoke(args: argparse.Namespace) -> int:
    from gateway.tokens import revocations

    path: Path | None = args.file
    if path is None:
        try:
            path = config.load(_config_file(args), os.environ, {}, check_files=False).token_revocations
        except config.ConfigError as exc:
            print("\n".join(exc.problems), file=sys.stderr)
            return 2
    if path is None:
        print(
            "no revocations file: pass --file or set token_revocations (GATEWAY_TOKEN_REVOCATIONS)",
            file=sys.stderr,
        )
        return 2
    if not path.parent.is_dir():
        print(f"{path.parent} does not exist", file=sys.stderr)
        return 2
    revocations.revoke(path, args.user)
    print(
        f"tokens issued to {args.user} until now are revoked ({path}); gateways notice within reload_interval"
    )
    return 0


def _keygen(args: argparse.Namespace) -> int:
    from gateway.tokens import keys

    key_path: Path = args.key
    cert_path: Path = args.cert or key_path.with_suffix(".crt")
    current: list[keys.SigningKey] = []
    if args.rotate:
        try:
            current = keys.load_all(key_path)
        except keys.KeyError_ as exc:
            print(f"cannot rotate: {exc}", file=sys.stderr)
            return 2
    for path in (key_path, cert_path):
        if path.exists() and not (args.force or args.rotate):
            print(f"{path} exists: --force replaces it, --rotate keeps the key accepted", file=sys.stderr)
            return 2
        if not path.parent.is_dir():
            print(f"{path.parent} does not exist", file=sys.stderr)
            return 2
    key = keys.generate("rsa" if args.rsa else "ec")
    # The certificate first: a gateway with token_cert reloads both when the key file changes.
    keys.write_certificate(key, args.name, cert_path)
    keys.write_private(key, key_path, *current[:1])
    mode = key_path.stat().st_mode & 0o777
    print(f"wrote {key_path} (mode {mode:04o}, {key.algorithm}, kid {key.kid}) and {cert_path}")
    if current:
        dropped = f"; {len(current) - 1} older key(s) dropped" if len(current) > 1 else ""
        print(f"kid {current[0].kid} stops signing and stays accepted while it is in {key_path}{dropped}")
    return 0


def _healthcheck(args: argparse.Namespace) -> int:
    from gateway.probes import healthcheck

    try:
        settings = config.load(_config_file(args), os.environ, {}, check_files=False)
    except config.ConfigError as exc:
        print("unhealthy: invalid configuration: " + "; ".join(exc.problems), file=sys.stderr)
        return 1
    if settings.policy is not None:
        # A docker_auth policy's server: section may say where the gateway listens; a policy
        # broken since start-up is no sign of ill health (the gateway serves on the last good one).
        settings = docker_auth.apply_leniently(settings, settings.policy)
    healthy, detail = healthcheck(settings)
    print(("healthy: " if healthy else "unhealthy: ") + detail, file=sys.stdout if healthy else sys.stderr)
    return 0 if healthy else 1


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    if args.command == "check-config":
        return _check_config(args)
    if args.command == "healthcheck":
        return _healthcheck(args)
    if args.command == "token":
        return _keygen(args) if args.token_command == "keygen" else _revoke(args)
    if args.command == "user":
        return admin_cli.run_user(args)
    if args.command == "policy":
        return admin_cli.run_policy(args)
    from gateway.demo import run_demo

    return run_demo(args.data, args.listen, args.registry_listen, args.registry_bin)
