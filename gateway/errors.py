"""Responses the gateway makes itself, in the registry's JSON error format.

Clients (docker, skopeo, containerd) parse `{"errors": [...]}` to show a user why a request failed,
so every answer we make on our own follows the shape distribution uses.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

API_VERSION_HEADER = "Docker-Distribution-Api-Version"
API_VERSION = "registry/2.0"
SERVER_NAME = "registry-gateway"  # the Server header: no software versions to fingerprint


def error_body(code: str, message: str, detail: Any = None) -> bytes:
    return json.dumps({"errors": [{"code": code, "message": message, "detail": detail}]}).encode()


def error_response(
    status: int,
    code: str,
    message: str,
    detail: Any = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    """An error answer. For HEAD requests aiohttp sends the headers (Content-Length included) only."""
    all_headers = {API_VERSION_HEADER: API_VERSION}
    if headers:
        all_headers.update(headers)
    return web.Response(
        status=status,
        body=error_body(code, message, detail),
        content_type="application/json",
        charset="utf-8",
        headers=all_headers,
    )
