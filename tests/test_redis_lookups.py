"""A Redis whose name does not resolve (its container stopped: Docker's DNS then takes seconds to
say so) must not starve the event loop's shared thread pool, which the registry's own name
lookups use: found by the compose test as 504s from every gateway while Redis was stopped. The
resolver's slowness is simulated in process (there is no slow DNS on loopback); the link, its
retries and redis-py are the real ones."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from typing import Any

import pytest
from yarl import URL

from gateway.shared.link import RedisLink

SLOW_NAME = "redis.stopped.test"
RESOLVER_TAKES = 4.0  # seconds, as Docker's DNS takes for a stopped container's name


async def test_an_unresolvable_redis_name_leaves_the_shared_thread_pool_free(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = socket.getaddrinfo
    lookups: list[float] = []
    release = threading.Event()

    def slow_getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host == SLOW_NAME:
            lookups.append(time.monotonic())
            release.wait(RESOLVER_TAKES)
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", slow_getaddrinfo)
    loop = asyncio.get_running_loop()
    link = RedisLink(URL(f"redis://{SLOW_NAME}:6379/0"))
    link.start()
    try:
        # Through two of the resolver's slow answers, the shared pool (what aiohttp resolves the
        # registry's name on) answers at once every time.
        deadline = time.monotonic() + 2 * RESOLVER_TAKES + 1
        while time.monotonic() < deadline:
            started = time.monotonic()
            await asyncio.wait_for(loop.run_in_executor(None, lambda: None), 2.0)
            assert time.monotonic() - started < 0.5
            await asyncio.sleep(0.25)
        # One lookup at a time: one per slow answer, not one per reconnect attempt (which, each
        # left running in the shared pool, would fill it as the resolver's delay grows).
        assert 2 <= len(lookups) <= 4, lookups
        assert not link.up
        assert "name resolution" in (link.problem or "")
        assert link.status().startswith("unreachable since")
    finally:
        release.set()
        await link.stop()
