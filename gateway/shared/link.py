"""One gateway process's link to Redis: the client, whether Redis answers, and its messages.

redis-py's asyncio client (the `redis` package, maintained by Redis itself) talks to Redis; it is
configured here so that no call waits long: a short timeout and no retries inside a call, since a
login waiting on a dead Redis would stall every login. A call that fails marks the link down at
once, and later calls do not try Redis until `run`, the link's one background task, has reached
it again: meanwhile every guard counts on this host (gateway.shared.lockout), and the log,
`/readyz` and `registry_gateway_redis_up` say so. When Redis answers again, `run` subscribes to
the gateway's channel and calls every `on_up` callback (what was counted meanwhile is sent, the
revocations are read again) before the link counts as up.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import datetime as dt
import ipaddress
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from yarl import URL

from gateway.files import describe_read_error

if TYPE_CHECKING:
    import redis.asyncio as redis

log = logging.getLogger("gateway.shared")

OPERATION_TIMEOUT = 0.5  # seconds a Redis call may take before Redis counts as unreachable
RECONNECT_INTERVAL = 0.5  # seconds between attempts to reach Redis again
PING_INTERVAL = 2.0  # seconds between checks that a quiet Redis still answers
PREFIX = "registry-gateway:"  # every key and channel; share one Redis database per gateway fleet
CHANNEL = PREFIX + "events"

T = TypeVar("T")


def read_password(path: Path) -> str:
    """Redis's password from its file (the first line). Raises ValueError saying what is wrong."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(describe_read_error(path, exc)) from None
    lines = text.splitlines()
    password = lines[0].strip() if lines else ""
    if not password:
        raise ValueError(f"{path} is empty: write Redis's password on its first line")
    return password


def describe(url: URL) -> str:
    """The URL as logs show it: no user name, and never a password."""
    return str(url.with_user(None))


class RedisLink:
    def __init__(self, url: URL, password_file: Path | None = None, ca_file: Path | None = None) -> None:
        # Imported here, not with the module: redis-py costs 9 MB and 0.1 s at start-up, which a
        # gateway without redis_url has no use for.
        import redis.asyncio as redis
        from redis.asyncio.retry import Retry  # not redis.retry's: the asyncio client warns at every start
        from redis.backoff import NoBackoff
        from redis.exceptions import RedisError

        self._failures: tuple[type[BaseException], ...] = (RedisError, OSError, TimeoutError)
        self.url = url
        self.where = describe(url)
        options: dict[str, Any] = {
            "socket_timeout": OPERATION_TIMEOUT,
            "socket_connect_timeout": OPERATION_TIMEOUT,
            "retry": Retry(NoBackoff(), 0),
            "decode_responses": False,
        }
        if password_file is not None:
            options["password"] = read_password(password_file)
        if ca_file is not None:
            options["ssl_ca_certs"] = str(ca_file)
        self.client: redis.Redis = redis.Redis.from_url(str(url), **options)
        self.up = False
        self.problem: str | None = "not reached yet"
        self.down_since: float | None = time.time()
        self._listeners: list[Callable[[bytes], None]] = []
        self._on_up: list[Callable[[], Awaitable[None]]] = []
        self._task: asyncio.Task[None] | None = None
        self._reached_once = False
        # Redis's name is looked up here first, one lookup at a time, on a thread of its own
        # (see _resolvable).
        self._resolver = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="redis-lookup")
        self._lookup: asyncio.Future[object] | None = None

    def on_message(self, listener: Callable[[bytes], None]) -> None:
        """Call `listener` with every message published on CHANNEL (by any gateway, this one too)."""
        self._listeners.append(listener)

    def on_up(self, callback: Callable[[], Awaitable[None]]) -> None:
        """Await `callback` each time Redis is reached (again), before calls go to it."""
        self._on_up.append(callback)

    async def call(self, operation: Callable[[], Awaitable[T]]) -> T | None:
        """`operation`'s result, or None when Redis is down or fails now (then marked down)."""
        if not self.up:
            return None
        try:
            return await operation()
        except self._failures as exc:
            self.went_down(exc)
            return None

    def went_down(self, exc: BaseException) -> None:
        reason = _reason(exc)
        serving = self.up and self.problem is None  # not while `_run` catches up (up, a problem)
        # Said when the link drops, and whenever the reason it cannot be reached changes: a
        # wrong password, user, database or CA at start-up is otherwise in /readyz alone. Not
        # at every retry.
        if serving or reason != self.problem:
            log.warning(
                "Redis at %s unreachable (%s): failed logins are counted on this host only, and "
                "revocations made meanwhile reach this gateway when Redis returns",
                self.where,
                reason,
            )
        if serving:
            self.down_since = time.time()
        self.up = False
        self.problem = reason

    def status(self) -> str:
        """For /readyz: "ok", or since when and why Redis is unreachable and what that means."""
        if self.up:
            return "ok"
        since = dt.datetime.fromtimestamp(self.down_since or time.time(), dt.UTC).strftime(
            "%Y-%m-%dT%H:%M:%SZ"
        )
        return f"unreachable since {since} ({self.problem}): failed logins counted on this host only"

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="redis-link")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.client.aclose()
        self._resolver.shutdown(wait=False, cancel_futures=True)

    async def _run(self) -> None:
        """Reach Redis, subscribe, catch up, then listen and check it answers; start again
        whenever anything fails."""
        while True:
            pubsub = self.client.pubsub(ignore_subscribe_messages=True)
            try:
                await self._resolvable()
                await self.client.ping()
                await pubsub.subscribe(CHANNEL)
                for callback in self._on_up:
                    self.up = True  # the callbacks' own calls go to Redis
                    await callback()
                if not self.up:  # a callback's call failed
                    raise ConnectionError(self.problem or "lost")
                self._came_up()
                await self._listen(pubsub)
            except self._failures as exc:
                self.went_down(exc)
            finally:
                with contextlib.suppress(*self._failures):
                    await pubsub.aclose()
            await asyncio.sleep(RECONNECT_INTERVAL)

    async def _resolvable(self) -> None:
        """Wait until Redis's name resolves (raises OSError when it does not). A name lookup cannot
        be cancelled: redis-py's, cut short by its connect timeout, goes on in the event loop's
        shared thread pool for as long as the resolver takes (10 s and more when a container's
        name has no address), and a new attempt every RECONNECT_INTERVAL would fill that pool
        and starve every other lookup, the registry's among them (504s). So an attempt starts
        only once this lookup, on a thread of its own and never abandoned, has answered."""
        host = self.url.host
        if host is None or _is_address(host):
            return
        if self._lookup is None or self._lookup.done():
            loop = asyncio.get_running_loop()
            port = self.url.port or 6379
            self._lookup = loop.run_in_executor(
                self._resolver, socket.getaddrinfo, host, port, 0, socket.SOCK_STREAM
            )
        await asyncio.shield(self._lookup)

    def _came_up(self) -> None:
        self.up = True
        self.problem = None
        if self._reached_once:
            log.warning(
                "Redis at %s answers again: failed logins are counted by every replica again", self.where
            )
        else:
            log.info("Redis at %s reached: failed logins and revocations are shared", self.where)
        self._reached_once = True
        self.down_since = None

    async def _listen(self, pubsub: Any) -> None:
        next_ping = time.monotonic() + PING_INTERVAL
        while self.up:
            message = await pubsub.get_message(timeout=min(PING_INTERVAL, 0.5))
            if message is not None and message.get("type") in (b"message", "message"):
                data = message.get("data")
                if isinstance(data, bytes):
                    for listener in self._listeners:
                        try:
                            listener(data)
                        except Exception:  # one listener's bug must not end the link
                            log.exception("handling a Redis message failed")
            if time.monotonic() >= next_ping:
                await self.client.ping()
                next_ping = time.monotonic() + PING_INTERVAL


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
