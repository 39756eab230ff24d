"""Logins checked by an external program, configured as docker_auth's `ext_auth` section.

As docker_auth runs it: `command` with `args` (no shell; a bare name is looked up on PATH), the
user name and password on standard input as `USER PASSWORD` (one space, no newline), and the exit
status decides: 0 allowed (standard output may hold `{"labels": {"KEY": ["VALUE", ...]}}`), 1
denied, 2 no such user here (the login is then refused like any unknown name), anything else an
error. The password is never in argv or the environment; the program gets the gateway's
environment less its GATEWAY_* settings. It has `timeout` seconds (ours; 10) before it is killed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

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


def _redacted(text: bytes, password: str) -> str:
    shown = text[:300].decode("utf-8", "replace")
    return shown.replace(password, "***") if password else shown


class ProgramFailed(Exception):
    """The program could not be run, or did not finish in time."""


async def run_program(settings: ExternalSettings, data: bytes) -> tuple[int, bytes, bytes]:
    """Run the program with `data` on standard input: (exit status, stdout, stderr). No shell; the
    gateway's environment less GATEWAY_*; killed after `timeout`. Raises ProgramFailed."""
    environment = {key: value for key, value in os.environ.items() if not key.startswith("GATEWAY_")}
    try:
        process = await asyncio.create_subprocess_exec(
            settings.command,
            *settings.args,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=environment,
        )
    except OSError as exc:
        raise ProgramFailed(f"cannot run {settings.command}: {exc.strerror or exc}") from None
    try:
        async with asyncio.timeout(settings.timeout):
            output, errors = await process.communicate(data)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise ProgramFailed(f"{settings.command} did not finish in {settings.timeout:g} s") from None
    return process.returncode if process.returncode is not None else -1, output, errors


class ExternalSource:
    """Runs the program once per login (logins are cached), at most 8 at a time."""

    name = "ext_auth"

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
        return self._unavailable(
            f"{settings.command} exited with {status}: {_redacted(errors, password).strip()}"
        )

    def _unavailable(self, problem: str) -> Unavailable:
        self.last_problem = problem
        return Unavailable(problem)
