"""Token revocations every replica shares: `registry-gateway token revoke USER` records the moment
in a Redis hash (user -> epoch seconds) and announces it; every gateway process applies the
announcement at once and reads the whole hash whenever it reaches Redis (again), so that a
revocation made while one could not reach Redis takes effect there when it returns. The
`token_revocations` file, when set too, is honoured beside it (gateway.tokens.revocations)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path

from yarl import URL

from gateway.shared.link import CHANNEL, OPERATION_TIMEOUT, PREFIX, RedisLink, read_password
from gateway.tokens.revocations import merged

log = logging.getLogger("gateway.shared")

HASH = PREFIX + "revocations"

# Keep the latest moment per user, and announce it: "revoked MOMENT USER".
_REVOKE = """
local current = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
local moment = tonumber(ARGV[2])
if moment > current then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end
redis.call('PUBLISH', ARGV[3], 'revoked ' .. ARGV[2] .. ' ' .. ARGV[1])
return 1
"""


def revoke(url: URL, password_file: Path | None, ca_file: Path | None, user: str, moment: float) -> None:
    """Record in Redis that tokens issued to `user` until `moment` are void (for the command
    line; raises redis.RedisError or OSError when Redis cannot be reached)."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    options: dict[str, object] = {
        "socket_timeout": OPERATION_TIMEOUT * 4,
        "socket_connect_timeout": OPERATION_TIMEOUT * 4,
        "retry": Retry(NoBackoff(), 0),
    }
    if password_file is not None:
        options["password"] = read_password(password_file)
    if ca_file is not None:
        options["ssl_ca_certs"] = str(ca_file)
    client = redis.Redis.from_url(str(url), **options)
    try:
        client.register_script(_REVOKE)(keys=[HASH], args=[user, f"{moment:.3f}", CHANNEL])
    finally:
        client.close()


class SharedRevocations:
    """Keeps `apply` (a token authority's set_shared_revocations) fed with Redis's revocations."""

    def __init__(self, link: RedisLink, apply: Callable[[Mapping[str, float]], None]) -> None:
        self.link = link
        self.apply = apply
        self.known: dict[str, float] = {}
        link.on_up(self._read_all)
        link.on_message(self._on_message)

    async def _read_all(self) -> None:
        """Redis reached (again): take what it holds, and give it back what it lacks. A Redis
        started again without its data (no persistence, a failover to an empty replica) would
        otherwise undo every revocation; any gateway that knew one writes it back."""
        entries = await self.link.client.hgetall(HASH)
        stored: dict[str, float] = {}
        for user, when in entries.items():
            try:
                name = user.decode("utf-8") if isinstance(user, bytes) else str(user)
                stored[name] = float(when)
            except (UnicodeDecodeError, ValueError):
                continue
        missing = {user: when for user, when in self.known.items() if stored.get(user, 0.0) < when}
        if missing:
            script = self.link.client.register_script(_REVOKE)
            for name, moment in missing.items():
                await script(keys=[HASH], args=[name, f"{moment:.3f}", CHANNEL])
            log.warning("Redis lacked %d token revocation(s) this gateway knew: written back", len(missing))
        known = merged(self.known, stored)
        if known != self.known:
            self.known = known
            self.apply(known)

    def _on_message(self, data: bytes) -> None:
        kind, _, rest = data.partition(b" ")
        if kind != b"revoked":
            return
        moment_text, _, user_bytes = rest.partition(b" ")
        try:
            moment, user = float(moment_text), user_bytes.decode("utf-8")
        except (UnicodeDecodeError, ValueError):
            return
        if moment > self.known.get(user, 0.0):
            self.known = {**self.known, user: moment}
            self.apply(self.known)
            log.info("tokens issued to %r until %.3f are revoked (announced through Redis)", user, moment)
