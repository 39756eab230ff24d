"""Requests the ACL does not decide, decided by a program: docker_auth's `ext_authz` section.

As docker_auth runs it: after the ACL, for a request no ACL entry matched. The program gets the
request as JSON on standard input (docker_auth's AuthRequestInfo: Account, Type, Name, Service,
IP, Actions, and Labels) and its exit status decides: 0 grants the actions asked for, 1 denies,
anything else is an error, which denies too (fail closed) and is logged and counted. Answers are
cached for `cache_ttl` per request description, so a pull does not fork a process per request.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import OrderedDict

from gateway import acl
from gateway.identity.external import ExternalSettings, ProgramFailed, run_program, shown_output

log = logging.getLogger(__name__)

GRANTED, DENIED = 0, 1


def request_document(request: acl.Request) -> bytes:
    """The JSON the program reads (docker_auth's field names). Pure."""
    return json.dumps(
        {
            "Account": request.account,
            "Type": request.type,
            "Name": request.name,
            "Email": "",
            "Service": request.service,
            "IP": request.ip,
            "Actions": sorted(request.actions),
            "Labels": {key: list(values) for key, values in sorted(request.labels.items())},
        },
        separators=(",", ":"),
    ).encode()


class ExternalAuthorizer:
    """One program's answers, cached (bounded, `ttl` seconds), at most 8 runs at a time."""

    def __init__(self, settings: ExternalSettings, ttl: float, max_entries: int = 10_000) -> None:
        self.settings = settings
        self._ttl = ttl
        self._max_entries = max_entries
        self._answers: OrderedDict[bytes, tuple[bool, float]] = OrderedDict()
        self._slots = asyncio.Semaphore(8)
        self.failures = 0

    async def authorize(self, request: acl.Request) -> bool | None:
        """True: granted; False: denied; None: the program failed (the caller denies)."""
        document = request_document(request)
        cached = self._answers.get(document)
        if cached is not None and cached[1] > time.monotonic():
            self._answers.move_to_end(document)
            return cached[0]
        async with self._slots:
            try:
                status, _, errors = await run_program(self.settings, document)
            except ProgramFailed as exc:
                self.failures += 1
                log.warning(
                    "ext_authz failed for %s %s: %s", request.account or "anonymous", request.name, exc
                )
                return None
        if status not in (GRANTED, DENIED):
            self.failures += 1
            stderr = shown_output(errors)
            log.warning(
                "ext_authz failed for %s %s: exited with %d: %s",
                request.account,
                request.name,
                status,
                stderr,
            )
            return None
        granted = status == GRANTED
        if self._ttl > 0:
            self._answers[document] = (granted, time.monotonic() + self._ttl)
            while len(self._answers) > self._max_entries:
                self._answers.popitem(last=False)
        return granted

    def clear(self) -> None:
        self._answers.clear()
