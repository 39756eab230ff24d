"""The audit log: one JSON object a line for every request under /v2/, to a file or stdout.

Separate from the diagnostic log. It records who did what to which repository and how it ended;
it never holds a password, an Authorization header or a query string (upload state, tokens).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TextIO

from gateway.addresses import canonical_peer
from gateway.files import describe_write_error
from gateway.robots import robot_name
from gateway.routes import DELETE, PUSH, Operation, Route

log = logging.getLogger(__name__)


@dataclass(slots=True)
class AuditRecord:
    """Filled in as the request goes; written once it has finished."""

    started: float  # seconds since the epoch; written as `time`, in ISO 8601
    client: str
    method: str
    path: str
    user: str | None = None
    operation: str | None = None
    repository: str | None = None
    reference: str | None = None
    digest: str | None = None
    status: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    duration_ms: float = 0.0
    decision: str = "error"
    rule: int | None = None
    scopes_requested: list[str] | None = None  # token requests only
    scopes_granted: list[str] | None = None
    client_id: str | None = None


def operation_name(operation: Operation) -> str:
    if operation.route is Route.BASE:
        return "login"
    if operation.route is Route.CATALOG:
        return "catalog"
    if DELETE in operation.actions:
        return "delete"
    if PUSH in operation.actions:
        return "push"
    return "pull"


def loggable_target(target: str) -> str:
    """A request target as any log may hold it: the one redaction of what a client sends. No
    query (upload state, tokens, passwords in a form sent in the URL), no fragment, and no
    userinfo: `http://bob:PW@host/v2/` (absolute form) and `//bob:PW@host/v2/` (which aiohttp
    reads as a path) keep their host and path, never the password, and so does the authority
    form (`bob:PW@host:443`); at most 1024 characters."""
    path = target.partition("?")[0]
    if "#" in path:
        path = path.partition("#")[0]
    if path[:1] != "/" or path[1:2] == "/":
        # An authority follows "scheme://" or "//" and ends at the next "/"; without "//" the
        # whole target is one (CONNECT's form). Its userinfo ends at its last "@", as URL
        # parsers read it.
        scheme, sep, rest = path.partition("//") if "//" in path else ("", "", path)
        authority, slash, after = rest.partition("/")
        if "@" in authority:
            path = f"{scheme}{sep}***@{authority.rpartition('@')[2]}{slash}{after}"
    return path[:1024]


def new_record(client: str, method: str, raw_path: str) -> AuditRecord:
    # The time is formatted only if the record is written (most gateways write none).
    return AuditRecord(time.time(), canonical_peer(client), method, loggable_target(raw_path))


_FIELDS = tuple(field.name for field in fields(AuditRecord) if field.name != "started")
_TOKEN_ONLY = frozenset({"scopes_requested", "scopes_granted", "client_id"})


def record_entry(record: AuditRecord) -> dict[str, object]:
    """The record as its JSON line holds it."""
    started = dt.datetime.fromtimestamp(record.started, dt.UTC)
    entry: dict[str, object] = {"time": started.isoformat(timespec="milliseconds").replace("+00:00", "Z")}
    for name in _FIELDS:
        value = getattr(record, name)
        if value is None and name in _TOKEN_ONLY:
            continue  # token requests only
        entry[name] = value
    robot = robot_name(record.user) if record.user is not None else None
    if robot is not None and record.decision in ("allow", "deny"):
        entry["robot"] = robot  # a robot's verified credentials (a failed login only claimed it)
    # Rounded here, not per request (round() is a few thousand instructions; most records are
    # never written).
    entry["duration_ms"] = round(record.duration_ms, 3)
    return entry


class AuditLogError(Exception):
    """The audit log cannot be opened; the message says why, in words an operator can act on."""


class AuditLog:
    """Appends records to a file (reopened on SIGHUP, for logrotate) or to stdout.

    A file that cannot be opened at start-up is an AuditLogError. Once serving, no audit failure
    stops a request: a reopen that fails keeps the stream in use, and a write that fails is logged
    (once until writes succeed again) and counted in `lost`.
    """

    def __init__(self, target: str | None) -> None:
        self.target = target
        self._stream: TextIO | None = None
        self.lost = 0  # records that could not be written
        self._failing = False  # a write failed and none has succeeded since: logged already
        if target == "-":
            self._stream = sys.stdout
        elif target is not None:
            try:
                self._stream = self._open(Path(target))
            except OSError as exc:
                raise AuditLogError(describe_write_error(Path(target), exc)) from None

    @staticmethod
    def _open(path: Path) -> TextIO:
        # Kept open for the life of the process (line-buffered: each record reaches the file whole).
        return path.open("a", encoding="utf-8", buffering=1)

    def reopen(self) -> bool:
        """Open the file anew (logrotate has moved the old one away); False when it cannot be
        opened, and the records go on to the file open until now."""
        if self.target is None or self.target == "-":
            return False
        path = Path(self.target)
        # Opened before the current stream is closed: on failure (the directory moved, a full
        # disk, permissions) the current one keeps taking records; none is lost to a closed file.
        try:
            fresh = self._open(path)
        except OSError as exc:
            log.error(
                "audit log %s not reopened, records still go to the file open until now: %s",
                path,
                describe_write_error(path, exc),
            )
            return False
        previous, self._stream = self._stream, fresh
        if previous is not None:
            # Line-buffered, so nothing is pending: a file that fails as it closes must not keep
            # the fresh one from taking records.
            with contextlib.suppress(OSError, ValueError):
                previous.close()
        return True

    def write(self, record: AuditRecord) -> None:
        if self._stream is None:
            return
        line = json.dumps(record_entry(record), separators=(",", ":")) + "\n"
        try:
            self._stream.write(line)
        except (OSError, ValueError) as exc:  # ValueError: the stream was closed
            # Written as the request finishes: raising here would turn its answer into a 500.
            # Logged once a run of failures, not for every request (a full disk would flood the
            # diagnostic log), and counted, so that what is missing is known.
            self.lost += 1
            if not self._failing:
                self._failing = True
                log.error(
                    "audit log write failed, records are lost until writes succeed again (counted in"
                    " registry_gateway_audit_records_lost_total): %s: %s",
                    self.target,
                    exc,
                )
            return
        if self._failing:
            self._failing = False
            log.warning("audit log writes succeed again; %d record(s) lost so far", self.lost)

    def close(self) -> None:
        if self._stream is not None and self._stream is not sys.stdout:
            self._stream.close()
        self._stream = None
