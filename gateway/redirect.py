"""The redirect listener (`redirect_listen`): plain HTTP that answers every request with a permanent
redirect to the same path on the gateway's HTTPS port. `gateway.runtime` opens it beside the main
listener, through the same `listener_runner` (limits, malformed requests, headers)."""

from __future__ import annotations

from aiohttp import web

from gateway.errors import error_response
from gateway.forwarding import valid_host


def redirect_app(https_port: int, before: list[web.RouteDef] | None = None) -> web.Application:
    """Plain HTTP that sends every request to the same path over HTTPS; the routes `before` (the
    ACME HTTP-01 answers) are answered first."""

    async def redirect(request: web.Request) -> web.StreamResponse:
        # Only a path reaches here (gateway.http.server refuses other request targets).
        if not valid_host(request.host):
            return error_response(400, "UNSUPPORTED", "invalid Host header")
        host = request.host.rsplit(":", 1)[0] if not request.host.endswith("]") else request.host
        port = "" if https_port == 443 else f":{https_port}"
        raise web.HTTPMovedPermanently(f"https://{host}{port}{request.raw_path}")

    app = web.Application()
    app.router.add_routes(before or [])
    app.router.add_route("*", "/{tail:.*}", redirect)
    return app
