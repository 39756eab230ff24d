"""Logins checked by an external program, configured as docker_auth's `ext_auth` section.

As docker_auth runs it: `command` with `args` (no shell; a bare name is looked up on PATH), the
user name and password on standard input as `USER PASSWORD` (one space, no newline), and the exit
status decides: 0 allowed (standard output may hold `{"labels": {"KEY": ["VALUE", ...]}}`), 1
denied, 2 no such user here (the login is then refused like any unknown name), anything else an
error. The password is never in argv or the environment; the program gets the gateway's
environment less its GATEWAY_* settings. It has `timeout` seconds (ours; 10) before it is killed,
with whatever it started; what it leaves running when it exits is ended too (its process group).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, cast

from gateway.identity import Labels, Rejected, Unavailable, Unknown, Verdict, Verified

log = logging.getLogger(__name__)

SECTION_KEYS = ("command", "args", "timeout")
ALLOWED, DENIED, NO_MATCH = 0, 1, 2
MAX_OUTPUT = 64 * 1024


@dataclass(frozen=True)
class ExternalSettings:
    command: str  # as resolved on PATH when the policy was loaded
    args: tuple[str, ...] = ()
    timeout: float = 10.0


def parse_section(c: Any, raw: Mapping[str, Any], path: str = "ext_auth") -> ExternalSettings | None:
    """Validate an `ext_auth` (or `ext_authz`: the same keys) mapping; unknown keys were reported
    by the caller."""
    before = len(c.problems)
    command = raw.get("command")
    resolved = None
    if not isinstance(command, str) or not command:
        c.bad(f"{path}.command", "required: the program to run")
    else:
        resolved = shutil.which(command)
        if resolved is None:
            c.bad(f"{path}.command", f"{command}: not found, or not executable")
    args = raw.get("args", [])
    if not isinstance(args, list) or not all(isinstance(arg, str) for arg in args):
        c.bad(f"{path}.args", "expected a list of strings")
        args = []
    timeout = raw.get("timeout", 10)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout <= 300:
        c.bad(f"{path}.timeout", "expected seconds, more than 0 and at most 300")
        timeout = 10
    if len(c.problems) != before or resolved is None:
        return None
    return ExternalSettings(resolved, tuple(args), float(timeout))


def parse_labels(output: bytes) -> Labels:
    """The labels a program printed (docker_auth's `{"labels": {...}}`); ValueError when malformed."""
    if not output.strip():
        return MappingProxyType({})
    document = json.loads(output)
    raw = document.get("labels", {}) if isinstance(document, dict) else None
    if not isinstance(raw, dict):
        raise ValueError('expected {"labels": {"KEY": ["VALUE", ...]}}')
    labels: dict[str, tuple[str, ...]] = {}
    for key, values in raw.items():
        if isinstance(values, str):
            values = [values]
        if not isinstance(values, list) or not all(isinstance(value, str) for value in values):
            raise ValueError(f"label {key!r}: expected a list of strings")
        labels[str(key)] = tuple(values)
    return MappingProxyType(labels)


def shown_output(text: bytes, password: str = "") -> str:
    """What a program wrote, for a log line: its password masked (before cutting, so that no part
    of it shows at the cut), its lines joined with "; " (so it cannot start log lines of its own),
    the first 300 characters. A program may also echo the password quoted or escaped (`set -x`
    writes it shell-quoted, Python's repr and JSON escape it): output holding any four
    characters of the password in a row is not shown at all."""
    shown = text.decode("utf-8", "replace")
    if password:
        shown = shown.replace(password, "***")
        if any(password[start : start + 4] in shown for start in range(len(password) - 3)):
            return "(not shown: it may hold the password; run the program by hand to see it)"
    return "; ".join(line.strip() for line in shown.splitlines() if line.strip())[:300]


class ProgramFailed(Exception):
    """The program could not be run, or did not finish in time."""


# After the program exits, how long its output pipes may stay open: only a process that left the
# program's process group (setsid) can still hold them then, and its output is not waited for.
PIPES_GRACE = 0.5


class _Program(asyncio.SubprocessProtocol):
    """What one run of the program wrote (each stream bounded to MAX_OUTPUT + 1 bytes), and when
    it exited, known apart from when its pipes close: asyncio's Process.wait() waits for both, so
    a child that keeps the pipes open would hold it (CPython gh-119710)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.output = {1: bytearray(), 2: bytearray()}
        self.exited: asyncio.Future[None] = loop.create_future()
        self.pipes_closed: asyncio.Future[None] = loop.create_future()
        self._open_pipes = {1, 2}

    def pipe_data_received(self, fd: int, data: bytes) -> None:
        kept = self.output[fd]
        if len(kept) <= MAX_OUTPUT:
            kept += data[: MAX_OUTPUT + 1 - len(kept)]

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        self._open_pipes.discard(fd)
        if not self._open_pipes and not self.pipes_closed.done():
            self.pipes_closed.set_result(None)

    def process_exited(self) -> None:
        if not self.exited.done():
            self.exited.set_result(None)


def _end_group(group: int) -> None:
    """SIGKILL to the program's process group: whatever it started and left running goes with it.
    The group outlives its leader while members remain, so its ID is not reused while they do."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(group, signal.SIGKILL)


async def _settled(future: asyncio.Future[None], seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await asyncio.shield(future)


async def run_program(settings: ExternalSettings, data: bytes) -> tuple[int, bytes, bytes]:
    """Run the program with `data` on standard input: (exit status, stdout, stderr). No shell; the
    gateway's environment less GATEWAY_*; in a process group of its own, which is killed when the
    program exits or after `timeout`, so that no child it started (a `sleep`, a hung `curl`) holds
    the login, its slot or its pipes any longer. Raises ProgramFailed."""
    environment = {key: value for key, value in os.environ.items() if not key.startswith("GATEWAY_")}
    loop = asyncio.get_running_loop()
    try:
        transport, program = await loop.subprocess_exec(
            lambda: _Program(loop),
            settings.command,
            *settings.args,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=environment,
            start_new_session=True,  # its own session and process group, whose ID is its PID
        )
    except OSError as exc:
        raise ProgramFailed(f"cannot run {settings.command}: {exc.strerror or exc}") from None
    group = transport.get_pid()
    try:
        # A write transport (uvloop's does not derive from asyncio.WriteTransport: no isinstance).
        stdin = cast(asyncio.WriteTransport | None, transport.get_pipe_transport(0))
        if stdin is not None:
            # A program that exits without reading its input closes the pipe: nothing to report.
            with contextlib.suppress(OSError):
                stdin.write(data)
            stdin.close()
        try:
            async with asyncio.timeout(settings.timeout):
                await asyncio.shield(program.exited)
        except TimeoutError:
            raise ProgramFailed(f"{settings.command} did not finish in {settings.timeout:g} s") from None
        finally:
            _end_group(group)
        # What it wrote before it exited is in the pipes, which close now that the group is gone.
        await _settled(program.pipes_closed, PIPES_GRACE)
        status = transport.get_returncode()
        return status if status is not None else -1, bytes(program.output[1]), bytes(program.output[2])
    finally:
        if not program.exited.done():
            await _settled(program.exited, PIPES_GRACE)  # killed: reaped in a moment
        transport.close()


class ExternalSource:
    """Runs the program once per login (logins are cached), at most 8 at a time."""

    name = "ext_auth"
    lasting = False  # a program vouches for a login it verified, while it is cached

    def __init__(self, settings: ExternalSettings) -> None:
        self.settings = settings
        self._slots = asyncio.Semaphore(8)
        self.last_problem: str | None = None

    async def verify(self, user: str, password: str) -> Verdict:
        if not user or any(ch.isspace() for ch in user):
            # The program reads "USER PASSWORD": a space in the name would move the split.
            return Rejected()
        settings = self.settings
        async with self._slots:
            try:
                status, output, errors = await run_program(settings, f"{user} {password}".encode())
            except ProgramFailed as exc:
                return self._unavailable(str(exc))
        if status in (ALLOWED, DENIED, NO_MATCH) and errors.strip():
            # A decision with something on standard error is often a broken program deciding by
            # accident: docker_auth's example under dash denies everyone, saying only
            # "[: user: unexpected operator" there.
            log.warning(
                "ext_auth: %s exited with %d for %r and wrote on standard error: %s",
                settings.command,
                status,
                user,
                shown_output(errors, password),
            )
        if status == ALLOWED:
            try:
                labels = parse_labels(output[:MAX_OUTPUT])
            except ValueError as exc:
                return self._unavailable(f"{settings.command}: unreadable labels on standard output: {exc}")
            self.last_problem = None
            return Verified(user, labels, self.name)
        if status in (DENIED, NO_MATCH):
            self.last_problem = None
            return Rejected() if status == DENIED else Unknown()
        return self._unavailable(f"{settings.command} exited with {status}: {shown_output(errors, password)}")

    def _unavailable(self, problem: str) -> Unavailable:
        self.last_problem = problem
        return Unavailable(problem)
