"""The worker supervisor (`workers` > 1): worker processes sharing the port with SO_REUSEPORT.

`supervise` forks the workers (each runs `gateway.runtime.run_server`), passes SIGTERM, SIGINT
and SIGHUP on, starts a worker again when one dies, and stops them all when one of the first
cannot start. The lockout table is made here, before any fork, so that every worker maps the same
shared memory.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

from gateway import config
from gateway.lockout import Lockout
from gateway.metrics_hub import run_hub, worker_socket
from gateway.runtime import StartupError, run_event_loop, run_server
from gateway.state import AccessStore, StateError

log = logging.getLogger("gateway")

CANNOT_START = 3  # a worker's exit status when it could not start serving

SUPERVISED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def _worker_main(
    settings: config.Settings, report: Connection, lockout: Lockout, metrics_socket: Path | None
) -> None:
    """One worker: tells the supervisor through `report` that it serves (None) or why it could not
    start (the message), then serves."""
    for signum in SUPERVISED_SIGNALS:
        signal.signal(signum, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, SUPERVISED_SIGNALS)  # blocked by supervise's start
    try:
        store = AccessStore(
            settings.htpasswd,
            settings.policy,
            docker_auth_service=settings.token_service,
            robots_path=settings.robots,
        )
        if metrics_socket is not None:
            metrics_socket.unlink(missing_ok=True)  # a socket left by the worker it replaces
        serving = run_server(
            settings,
            store,
            on_serving=lambda: report.send(None),
            lockout=lockout,
            metrics_socket=metrics_socket,
        )
        run_event_loop(serving)
    except StartupError as exc:
        report.send(str(exc))
        sys.exit(CANNOT_START)
    except StateError as exc:
        # The files changed since the supervisor read them (it refuses bad ones at start-up).
        report.send("cannot load users and rules: " + "; ".join(exc.problems))
        sys.exit(CANNOT_START)


def _hub_main(settings: config.Settings, report: Connection, lockout: Lockout, directory: Path) -> None:
    """The metrics process (gateway.metrics_hub), reporting as a worker does."""
    for signum in SUPERVISED_SIGNALS:
        signal.signal(signum, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, SUPERVISED_SIGNALS)
    try:
        run_event_loop(run_hub(settings, directory, lockout, on_serving=lambda: report.send(None)))
    except StartupError as exc:
        report.send(str(exc))
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
KILL_AFTER_GRACE = 5.0  # seconds past shutdown_grace before a process that ignores SIGTERM is killed


def supervise(settings: config.Settings) -> int:
    """Run `settings.workers` processes sharing the port (SO_REUSEPORT), so every core serves.

    Each worker loads users and rules itself and keeps its own credential cache. SIGTERM/SIGINT
    stop them all (each finishes its transfers in flight); SIGHUP is passed on; a worker that dies
    is started again; one of the first that cannot start stops them all (exit 2), a replacement
    that cannot start is tried again with a growing delay while the others serve.
    """
    # Made before any worker, so every worker (and every replacement) maps the same table.
    lockout = Lockout(settings.lockout_attempts, settings.lockout_window)
    # With metrics_listen, one more process answers there for all: each worker serves its own
    # metrics on a Unix socket in a directory only this user may enter.
    sockets = Path(tempfile.mkdtemp(prefix="registry-gateway-")) if settings.metrics_listen else None
    try:
        return _supervise(settings, lockout, sockets)
    finally:
        if sockets is not None:
            shutil.rmtree(sockets, ignore_errors=True)


def _supervise(settings: config.Settings, lockout: Lockout, sockets: Path | None) -> int:
    context = multiprocessing.get_context("fork")
    processes = settings.workers + (1 if sockets is not None else 0)  # the last: the metrics process
    workers: list[_Worker] = []
    stopping = False

    def start(index: int | None = None) -> None:
        """A new worker, at `index` of `workers` (or appended). The signals the supervisor handles
        wait meanwhile: a SIGTERM must find the new worker in the list, and a SIGHUP must not reach
        the child before it has put the default handlers back (_worker_main unblocks them)."""
        reports, report = context.Pipe(duplex=False)
        position = len(workers) if index is None else index
        if sockets is not None and position == settings.workers:
            process = context.Process(
                target=_hub_main, args=(settings, report, lockout, sockets), name="registry-gateway-metrics"
            )
        else:
            own_socket = worker_socket(sockets, position) if sockets is not None else None
            process = context.Process(
                target=_worker_main,
                args=(settings, report, lockout, own_socket),
                name="registry-gateway-worker",
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

    stop_deadline = 0.0  # after it, a process still alive is killed

    def on_stop(signum: int, _frame: object) -> None:
        nonlocal stopping, stop_deadline
        if not stopping:
            stop_deadline = time.monotonic() + settings.shutdown_grace + KILL_AFTER_GRACE
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
    for _ in range(processes):
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
            log.error(
                "%s %d exited with %s; starting another",
                "the metrics process" if sockets is not None and index == settings.workers else "worker",
                worker.process.pid,
                exitcode,
            )
            retry_at[index] = time.monotonic() + MIN_RESTART_SECONDS
        if not up and all(worker.serving for worker in workers):
            up = True
        if stopping and not any(worker.process.is_alive() for worker in workers):
            return 0
        if stopping and time.monotonic() > stop_deadline:
            # A worker that has not ended within shutdown_grace is hung (stopped, deadlocked):
            # waiting on it would keep the whole gateway from stopping.
            for worker in workers:
                if worker.process.pid is not None and worker.process.is_alive():
                    log.error(
                        "%d still runs %gs after SIGTERM: killed", worker.process.pid, settings.shutdown_grace
                    )
                    os.kill(worker.process.pid, signal.SIGKILL)
            stop_deadline = float("inf")
