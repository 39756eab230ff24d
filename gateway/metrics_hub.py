"""The metrics process of a gateway with `workers` above 1: it listens on `metrics_listen` and
answers for the whole gateway, asking every worker over its own Unix socket (in a directory only
the gateway's user can enter, made by gateway.supervisor).

- `/metrics`: the workers' metrics added up (gateway.metrics_merge), behind `metrics_token_file`
  as with one process, plus `registry_gateway_workers_reporting`.
- `/healthz`: 200 while at least one worker answers (a worker being replaced is the supervisor's
  business, not a reason to restart the whole gateway).
- `/readyz`: a ready worker's answer (they share the registry and Redis), with what each worker
  said; 503 when none is ready.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
from collections.abc import Callable
from pathlib import Path

import aiohttp
from aiohttp import web

from gateway import config
from gateway.http.server import listener_runner
from gateway.lockout import Lockout
from gateway.metrics import CONTENT_TYPE, ScrapeToken, check_scraper
from gateway.metrics_merge import merge
from gateway.runtime import StartupError, start_site
from gateway.shared.lockout import SharedLockout

log = logging.getLogger("gateway.metrics")

ASK_TIMEOUT = 3.0  # seconds a worker may take to answer the hub's /metrics and /readyz
# Seconds a worker may take to answer the hub's /healthz (which does no I/O): well under a
# liveness probe's own timeout (deploy/kubernetes: 3 s), so that one hung worker makes the answer
# "1 of 2 answer", not a probe timeout that restarts the whole gateway. (/readyz keeps
# ASK_TIMEOUT: a worker's own asks the registry, for up to 3 s.)
HEALTH_ASK_TIMEOUT = 1.0


def worker_socket(directory: Path, index: int) -> Path:
    """Where worker `index` serves its own metrics, health and readiness."""
    return directory / f"worker-{index}.sock"


class Hub:
    def __init__(self, directory: Path, workers: int) -> None:
        self.sockets = [worker_socket(directory, index) for index in range(workers)]

    async def ask(self, path: str, within: float = ASK_TIMEOUT) -> list[tuple[int, bytes] | None]:
        """Every worker's answer to GET `path` (None for one that does not answer within
        `within` seconds)."""
        return list(await asyncio.gather(*(self._ask_one(socket, path, within) for socket in self.sockets)))

    async def _ask_one(self, socket: Path, path: str, within: float) -> tuple[int, bytes] | None:
        try:
            connector = aiohttp.UnixConnector(path=str(socket))
            timeout = aiohttp.ClientTimeout(total=within)
            async with (
                aiohttp.ClientSession(connector=connector, timeout=timeout) as session,
                session.get(f"http://worker{path}") as response,
            ):
                return response.status, await response.read()
        except (OSError, TimeoutError, aiohttp.ClientError):
            return None


def hub_app(hub: Hub, scrape_token: ScrapeToken | None, lockout: SharedLockout | None) -> web.Application:
    async def metrics_page(request: web.Request) -> web.Response:
        if scrape_token is not None:
            refused = await check_scraper(scrape_token, lockout, request)
            if refused is not None:
                return refused
        answers = await hub.ask("/metrics")
        texts = [
            answer[1].decode("utf-8", "replace")
            for answer in answers
            if answer is not None and answer[0] == 200
        ]
        reporting = (
            "# HELP registry_gateway_workers_reporting Workers whose metrics this scrape adds up\n"
            "# TYPE registry_gateway_workers_reporting gauge\n"
            f"registry_gateway_workers_reporting {len(texts)}.0\n"
        )
        return web.Response(body=(merge(texts) + reporting).encode(), headers={"Content-Type": CONTENT_TYPE})

    async def healthz(_request: web.Request) -> web.Response:
        answers = await hub.ask("/healthz", HEALTH_ASK_TIMEOUT)
        serving = sum(1 for answer in answers if answer is not None and answer[0] == 200)
        body = {
            "status": "ok" if serving else "unavailable",
            "workers": f"{serving} of {len(answers)} answer",
        }
        return web.json_response(body, status=200 if serving else 503)

    async def readyz(_request: web.Request) -> web.Response:
        answers = await hub.ask("/readyz")
        said: dict[str, str] = {}
        chosen: tuple[int, dict[str, object]] | None = None
        for index, answer in enumerate(answers):
            if answer is None:
                said[str(index)] = "no answer"
                continue
            status, body = answer
            try:
                parsed = json.loads(body)
            except ValueError:
                parsed = {"status": "unavailable"}
            said[str(index)] = str(parsed.get("status", "unavailable"))
            if chosen is None or (status == 200 and chosen[0] != 200):
                chosen = (status, parsed)
        if chosen is None:
            return web.json_response({"status": "unavailable", "workers": said}, status=503)
        status, parsed = chosen
        # A worker a refused reload left behind is worth saying even if another one is current.
        for answer in answers:
            try:
                other = json.loads(answer[1]) if answer is not None else {}
            except ValueError:
                other = {}
            if str(other.get("configuration", "")).startswith("stale"):
                parsed = {**parsed, "configuration": other["configuration"]}
                break
        return web.json_response({**parsed, "workers": said}, status=200 if status == 200 else 503)

    async def status_page(request: web.Request) -> web.Response:
        """The first answering worker's /status, with each worker's configuration state (a worker
        can be the one a refused reload left behind)."""
        if scrape_token is not None:
            refused = await check_scraper(scrape_token, lockout, request)
            if refused is not None:
                return refused
        answers = await hub.ask("/status")
        found: dict[str, object] | None = None
        workers: list[object] = []
        for answer in answers:
            try:
                parsed = json.loads(answer[1]) if answer is not None and answer[0] == 200 else None
            except ValueError:
                parsed = None
            workers.append(parsed.get("configuration", "?") if isinstance(parsed, dict) else "no answer")
            if found is None and isinstance(parsed, dict):
                found = parsed
        if found is None:
            return web.json_response({"status": "unavailable", "workers": workers}, status=503)
        return web.json_response({**found, "workers": workers})

    app = web.Application()
    app.router.add_get("/metrics", metrics_page)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/status", status_page)
    return app


async def run_hub(
    settings: config.Settings, directory: Path, lockout: Lockout, on_serving: Callable[[], None]
) -> None:
    """Serve the whole gateway's metrics on metrics_listen until SIGTERM or SIGINT. Raises
    StartupError (ListenError when the address is taken) when it cannot start."""
    assert settings.metrics_listen is not None
    scrape_token = None
    if settings.metrics_token_file is not None:
        try:
            scrape_token = ScrapeToken(settings.metrics_token_file)
        except ValueError as exc:
            raise StartupError(f"metrics_token_file: {exc}") from None
    runner = listener_runner(
        hub_app(Hub(directory, settings.workers), scrape_token, SharedLockout(lockout)), settings
    )
    await runner.setup()
    try:
        await start_site(runner, "metrics_listen", *settings.metrics_listen)
    except StartupError:
        await runner.cleanup()
        raise
    log.info("metrics of %d workers on %s:%d", settings.workers, *settings.metrics_listen)
    on_serving()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: None)  # the workers reload; nothing to do here
    await stop.wait()
    await runner.cleanup()
