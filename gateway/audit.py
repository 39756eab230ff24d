"""The audit log: one JSON object a line for every request under /v2/, to a file or stdout.

Separate from the diagnostic log. It records who did what to which repository and how it ended;
it never holds a password, an Authorization header or a query string (upload state, tokens).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TextIO

from gateway.files import describe_write_error
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


def new_record(client: str, method: str, raw_path: str) -> AuditRecord:
    # The time is formatted only if the record is written (most gateways write none).
    return AuditRecord(time.time(), client, method, raw_path.partition("?")[0][:1024])


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
    # Rounded here, not per request (round() is a few thousand instructions; most records are
    # never written).
    entry["duration_ms"] = round(record.duration_ms, 3)
    return entry


class AuditLogError(Exception):
    """The audit log cannot be opened; the message says why, in words an operator can act on."""


class AuditLog:
    """Appends records to a file (reopened on SIGHUP, for logrotate) or to stdout. A file that
    cannot be opened at start-up is an AuditLogError."""

    def __init__(self, target: str | None) -> None:
        self.target = target
        self._stream: TextIO | None = None
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

    def reopen(self) -> None:
        if self.target is None or self.target == "-":
            return
        if self._stream is not None:
            self._stream.close()
        self._stream = self._open(Path(self.target))

    def write(self, record: AuditRecord) -> None:
        if self._stream is None:
            return
        try:
            self._stream.write(json.dumps(record_entry(record), separators=(",", ":")) + "\n")
        except OSError as exc:
            log.error("audit log write failed: %s", exc)

    def close(self) -> None:
        if self._stream is not None and self._stream is not sys.stdout:
            self._stream.close()
        self._stream = None
