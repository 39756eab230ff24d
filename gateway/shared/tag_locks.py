"""Immutable tags' lock across workers and replicas, in Redis, one per repository: a manifest
PUT to a covered tag and a delete by digest hold it from the look at the registry to the
registry's answer (gateway.app._guarded; the manifest is read before), so that two first pushes
of one tag through different gateway processes cannot both pass, nor a delete slip in beside one.

`SET key token NX PX` takes it, a compare-and-delete script gives it back (never another
holder's, if ours expired), and it expires by itself after LOCK_MS should its holder die. With
Redis unreachable, each process has its own lock only (app.KeyedLocks), as without Redis: the
push goes on, and the log and /readyz say Redis is down.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import secrets
import time
from collections.abc import AsyncIterator

from gateway.shared.link import RedisLink

LOCK_MS = (
    120_000  # longer than the registry takes to answer (read_timeout); a dead holder's lock ends with it
)
WAIT_SECONDS = 30.0  # for another process's PUT of the same tag
POLL_SECONDS = 0.05
KEY_PREFIX = "registry-gateway:tag-lock:"
_TAKE = "if redis.call('set', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 else return 0 end"
_GIVE_BACK = (
    "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"
)


class TagBusy(Exception):
    """Another process held the tag's lock for longer than WAIT_SECONDS."""


class SharedTagLocks:
    def __init__(self, link: RedisLink | None) -> None:
        self.link = link

    @contextlib.asynccontextmanager
    async def holding(self, repository: str) -> AsyncIterator[None]:
        link = self.link
        if link is None:
            yield
            return
        key = KEY_PREFIX + hashlib.sha256(repository.encode()).hexdigest()
        token = secrets.token_hex(16)
        take = link.client.register_script(_TAKE)
        deadline = time.monotonic() + WAIT_SECONDS
        taken = False
        while True:
            answer = await link.call(lambda: take(keys=[key], args=[token, LOCK_MS]))
            if answer is None:
                break  # Redis unreachable: this process's own lock only
            if answer == 1:
                taken = True
                break
            if time.monotonic() > deadline:
                raise TagBusy(f"another change in {repository} has been in flight for {WAIT_SECONDS:.0f} s")
            await asyncio.sleep(POLL_SECONDS)
        try:
            yield
        finally:
            if taken:
                give_back = link.client.register_script(_GIVE_BACK)
                await link.call(lambda: give_back(keys=[key], args=[token]))
