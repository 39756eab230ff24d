"""The lockout every login path consults: this host's table (gateway.lockout), and with
`redis_url` the count every replica shares.

Every failure is counted in both: the host's table (shared by its workers) and Redis (shared by
every replica), each atomically (a record lock; a Lua script), so that guesses spread over the
replicas get `lockout_attempts` password checks in all. While Redis cannot be reached the host's
table still counts (the guard neither fails open, letting guessers in, nor closed, locking
everyone out), and what it counted meanwhile is sent to Redis when it returns.

A pair that Redis locks is announced on the gateway's channel, and every worker of every replica
notes it: the request path's check (`locked`, before any cached login is used) stays a read of
memory, and a locked pair gets 429 on every replica whatever it sends, so a replica holding the
real user's cached login is no oracle for a guesser locked out on another one.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time

from gateway.lockout import REPEAT_WINDOW, Lockout, Reserved, pair_name
from gateway.shared.link import CHANNEL, PREFIX, RedisLink

log = logging.getLogger("gateway.shared")

PENDING_LIMIT = 10_000  # pairs counted while Redis was away, kept to send when it returns
REMOTE_LIMIT = 100_000  # pairs locked elsewhere, noted here (each a few dozen bytes)
SECRET_KEY = PREFIX + "lockout-secret"
PAIR_PREFIX = PREFIX + "lockout:"
# Every locked pair's key, scored by when its lock ends (Redis's clock): what a gateway that
# missed the announcements (it could not reach Redis then, or subscribed after another's
# catch-up announced them) reads when it reaches Redis, or a cached login there would answer
# 200 for the right password and 429 for a wrong one: an oracle.
LOCKS_KEY = PREFIX + "lockout-locks"

# One failure more for a pair unless it is locked (or the same guess again), on Redis's own clock.
# Answers [code, seconds]: 0 locked (seconds left, nothing counted), 1 counted, 2 the same guess
# again, 3 counted and now locked (announced on the channel). The last wrong secret's fingerprint
# is a key of its own that lives REPEAT_WINDOW seconds: what a reader of Redis could test
# password guesses against exists for seconds, not for the lockout's window.
_COUNT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local window, attempts = tonumber(ARGV[1]), tonumber(ARGV[2])
local attempt, repeat_window = ARGV[3], tonumber(ARGV[4])
local attempt_key = KEYS[1] .. ':attempt'
local h = redis.call('HMGET', KEYS[1], 'started', 'failures')
local started, failures = tonumber(h[1]), tonumber(h[2]) or 0
if started == nil or now >= started + window then
  started, failures = now, 0
  redis.call('DEL', attempt_key)
end
if failures >= attempts then return {0, tostring(started + window - now)} end
if attempt ~= '' and redis.call('GET', attempt_key) == attempt then return {2, '0'} end
failures = failures + 1
redis.call('HSET', KEYS[1], 'started', tostring(started), 'failures', failures)
redis.call('PEXPIREAT', KEYS[1], math.ceil((started + window) * 1000))
if attempt ~= '' then
  redis.call('SET', attempt_key, attempt, 'PX', math.ceil(repeat_window * 1000))
else
  redis.call('DEL', attempt_key)
end
if failures >= attempts then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  redis.call('ZADD', KEYS[2], started + window, KEYS[1])
  redis.call('PUBLISH', ARGV[5], 'lock ' .. KEYS[1] .. ' ' .. tostring(started + window - now))
  return {3, tostring(started + window - now)}
end
return {1, '0'}
"""

# Seconds the pair must wait, or '' when it may try.
_WAIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local h = redis.call('HMGET', KEYS[1], 'started', 'failures')
local started, failures = tonumber(h[1]), tonumber(h[2]) or 0
if started == nil or failures < tonumber(ARGV[2]) or now >= started + tonumber(ARGV[1]) then return '' end
return tostring(started + tonumber(ARGV[1]) - now)
"""

# Take back one failure (a check that could not decide); a lock it ends is announced.
_RELEASE = """
local failures = tonumber(redis.call('HGET', KEYS[1], 'failures') or '0')
if failures <= 0 then return 0 end
redis.call('HSET', KEYS[1], 'failures', failures - 1)
redis.call('DEL', KEYS[1] .. ':attempt')
if failures == tonumber(ARGV[1]) then
  redis.call('ZREM', KEYS[2], KEYS[1])
  redis.call('PUBLISH', ARGV[2], 'unlock ' .. KEYS[1])
end
return 1
"""

# Forget the pair (a right password); a lock it ends is announced.
_FORGET = """
redis.call('ZREM', KEYS[2], KEYS[1])
redis.call('DEL', KEYS[1] .. ':attempt')
if redis.call('DEL', KEYS[1]) == 1 then redis.call('PUBLISH', ARGV[1], 'unlock ' .. KEYS[1]) end
return 1
"""

# The pairs locked now, at most ARGV[1] of them: [key, seconds left, key, seconds left...].
_LOCKED = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local found = redis.call('ZRANGEBYSCORE', KEYS[1], now, '+inf', 'WITHSCORES', 'LIMIT', 0, tonumber(ARGV[1]))
local answer = {}
for i = 1, #found, 2 do
  answer[#answer + 1] = found[i]
  answer[#answer + 1] = tostring(tonumber(found[i + 1]) - now)
end
return answer
"""


class SharedLockout:
    """The lockout's contract for every login path: `locked` (a read of memory, for the request
    path's every login), then for a login that checks a secret `reserve` before and `succeeded`
    or `release` after; `retry_after` and `failed` where a secret is checked first and counted
    after (a refresh token, the metrics token)."""

    def __init__(self, local: Lockout, link: RedisLink | None = None) -> None:
        self.local = local
        self.link = link
        self.attempts = local.attempts
        self.window = local.window
        self.enabled = local.enabled
        self._secret: bytes | None = None  # the keying every replica shares, read from Redis
        self._remote: dict[str, float] = {}  # pairs Redis locked -> until (time.monotonic())
        self._remote_latest = 0.0
        self._pending: dict[bytes, int] = {}  # pair -> failures counted while Redis was away (0: forget)
        if link is not None and self.enabled:
            link.on_message(self._on_message)
            link.on_up(self._catch_up)

    # The request path's check: no await, no lock unless some pair is locked.
    def locked(self, address: str, user: str, now: float) -> float | None:
        wait = self.local.locked(address, user, now)
        if wait is None and now < self._remote_latest:  # one comparison while nothing is locked
            return self._locked_elsewhere(address, user, now)
        return wait

    def _locked_elsewhere(self, address: str, user: str, now: float) -> float | None:
        """Seconds left of a lock Redis announced for the pair, or None."""
        if now >= self._remote_latest or self._secret is None:
            return None
        until = self._remote.get(self._key(pair_name(address, user)))
        return None if until is None or now >= until else until - now

    async def retry_after(self, address: str, user: str, now: float) -> float | None:
        if not self.enabled:
            return None
        wait = self.local.retry_after(address, user, now) or self.locked(address, user, now)
        if wait is not None:
            return wait
        key = self._shared_key(address, user)
        if key is None:
            return None
        assert self.link is not None
        script = self.link.client.register_script(_WAIT)
        answer = await self.link.call(lambda: script(keys=[key], args=[self.window, self.attempts]))
        if not answer:
            return None
        return self._note_lock(key, float(answer))

    async def reserve(self, address: str, user: str, now: float, secret: bytes) -> Reserved:
        reserved = self.local.reserve(address, user, now, secret)
        if reserved.wait is not None or not self.enabled:
            return reserved
        wait = self._locked_elsewhere(address, user, now)
        if wait is not None:
            if reserved.counted:
                self.local.release(address, user, now)
            return Reserved(wait, counted=False)
        code, seconds = await self._count(address, user, secret, reserved.counted)
        if code == 0:
            if reserved.counted:
                self.local.release(address, user, now)
            return Reserved(seconds, counted=False)
        return Reserved(None, counted=reserved.counted or code in (1, 3))

    async def failed(self, address: str, user: str, now: float, secret: bytes | None = None) -> None:
        if not self.enabled:
            return
        self.local.failed(address, user, now, secret)
        await self._count(address, user, secret, True)

    async def release(self, address: str, user: str, now: float) -> None:
        if not self.enabled:
            return
        self.local.release(address, user, now)
        pair = pair_name(address, user)
        if pair in self._pending:
            self._pending[pair] = max(0, self._pending[pair] - 1)
        key = self._shared_key(address, user)
        if key is not None and self.link is not None and self.link.up:
            script = self.link.client.register_script(_RELEASE)
            await self.link.call(lambda: script(keys=[key, LOCKS_KEY], args=[self.attempts, CHANNEL]))

    async def succeeded(self, address: str, user: str) -> None:
        if not self.enabled:
            return
        self.local.succeeded(address, user)
        if self.link is None:
            return
        key = self._shared_key(address, user)
        if key is not None and self.link.up:
            self._remote.pop(key, None)
            script = self.link.client.register_script(_FORGET)
            if await self.link.call(lambda: script(keys=[key, LOCKS_KEY], args=[CHANNEL])) is not None:
                return
        self._remember(pair_name(address, user), None)  # forgotten in Redis when it returns

    def count(self) -> int:
        return self.local.count()

    async def _count(
        self, address: str, user: str, secret: bytes | None, counted_here: bool
    ) -> tuple[int, float]:
        """Count one failure in Redis: the script's code and seconds (see _COUNT); (1, 0) when
        Redis is away (then the failure is kept, if this host counted it, to send later)."""
        if self.link is None:
            return 1, 0.0
        key = self._shared_key(address, user)
        if key is None or not self.link.up:
            if counted_here:
                self._remember(pair_name(address, user), 1)
            return 1, 0.0
        attempt = "" if secret is None else self._fingerprint(secret)
        script = self.link.client.register_script(_COUNT)
        answer = await self.link.call(
            lambda: script(
                keys=[key, LOCKS_KEY], args=[self.window, self.attempts, attempt, REPEAT_WINDOW, CHANNEL]
            )
        )
        if answer is None:
            if counted_here:
                self._remember(pair_name(address, user), 1)
            return 1, 0.0
        code, seconds = int(answer[0]), float(answer[1])
        if code in (0, 3):
            self._note_lock(key, seconds)
        return code, seconds

    def _remember(self, pair: bytes, failures: int | None) -> None:
        """Keep what Redis must learn when it returns: `failures` more, or None: forget the pair."""
        if failures is None:
            self._pending[pair] = 0
        elif pair in self._pending or len(self._pending) < PENDING_LIMIT:
            self._pending[pair] = min(self._pending.get(pair, 0) + failures, self.attempts)

    async def _catch_up(self) -> None:
        """Redis is reached (again): read the shared keying, then send what was counted meanwhile."""
        assert self.link is not None
        client = self.link.client
        await client.set(SECRET_KEY, os.urandom(32).hex(), nx=True)
        secret = await client.get(SECRET_KEY)
        if not isinstance(secret, bytes) or len(secret) < 32:
            raise ConnectionError("the lockout's shared secret in Redis is unreadable")
        if secret != self._secret:
            self._remote = {}  # keyed with a secret Redis no longer has (it started again empty)
        self._secret = secret
        pending, self._pending = self._pending, {}
        sending = len(pending)
        counting = client.register_script(_COUNT)
        forgetting = client.register_script(_FORGET)
        try:
            while pending:
                pair, failures = next(iter(pending.items()))
                key = self._key(pair)
                if failures == 0:
                    await forgetting(keys=[key, LOCKS_KEY], args=[CHANNEL])
                for _ in range(failures):
                    await counting(
                        keys=[key, LOCKS_KEY], args=[self.window, self.attempts, "", REPEAT_WINDOW, CHANNEL]
                    )
                    pending[pair] = failures = failures - 1
                del pending[pair]
        finally:
            # Redis lost again midway: what was not sent is sent at the next catch-up.
            for pair, failures in pending.items():
                self._remember(pair, None if failures == 0 else failures)
        if sending:
            log.info("sent the failed logins of %d pairs counted while Redis was away", sending)
        # The locks announced while this process was not listening (subscribed before this
        # read: any later one arrives as a message).
        locked = await client.register_script(_LOCKED)(keys=[LOCKS_KEY], args=[REMOTE_LIMIT])
        for index in range(0, len(locked) - 1, 2):  # bytes: the client does not decode
            self._note_lock(locked[index].decode("ascii", "replace"), float(locked[index + 1]))

    def _on_message(self, data: bytes) -> None:
        parts = data.decode("ascii", "replace").split(" ")
        if len(parts) == 3 and parts[0] == "lock":
            try:
                self._note_lock(parts[1], float(parts[2]))
            except ValueError:
                return
        elif len(parts) == 2 and parts[0] == "unlock":
            self._remote.pop(parts[1], None)

    def _note_lock(self, key: str, seconds: float) -> float:
        now = time.monotonic()
        until = now + seconds
        if len(self._remote) >= REMOTE_LIMIT:
            self._remote = {k: v for k, v in self._remote.items() if v > now}
            if len(self._remote) >= REMOTE_LIMIT:
                return seconds  # counted in Redis, which still refuses it at the next check
        self._remote[key] = max(until, self._remote.get(key, 0.0))
        self._remote_latest = max(self._remote_latest, until)
        return seconds

    def _shared_key(self, address: str, user: str) -> str | None:
        if self._secret is None or self.link is None:
            return None
        return self._key(pair_name(address, user))

    def _key(self, pair: bytes) -> str:
        assert self._secret is not None
        return PAIR_PREFIX + hashlib.blake2b(pair, key=self._secret[:64], digest_size=16).hexdigest()

    def _fingerprint(self, secret: bytes) -> str:
        # Four bytes: enough to tell one guess from the next, too few to say much about a wrong
        # password to whoever reads Redis.
        assert self._secret is not None
        return hashlib.blake2b(secret, key=self._secret[:64], digest_size=4, person=b"attempt").hexdigest()
