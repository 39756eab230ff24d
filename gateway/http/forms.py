"""Reading a small urlencoded form whole (the token endpoint's, the web page's): its length
bounded, never waited on forever, and anything malformed None (a 400 to the caller, never a
500)."""

from __future__ import annotations

import asyncio
from urllib.parse import parse_qs

from aiohttp import web
from multidict import MultiDict


async def read_form(request: web.BaseRequest, idle_timeout: float, max_bytes: int) -> MultiDict[str] | None:
    media_type = request.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
    if media_type != "application/x-www-form-urlencoded":
        return None
    if request.content_length is not None and request.content_length > max_bytes:
        return None
    body = b""
    try:
        # Whole, however it arrives (read(n) returns what is buffered), and never waited on forever.
        async with asyncio.timeout(idle_timeout):
            while len(body) <= max_bytes:
                chunk = await request.content.read(max_bytes + 1 - len(body))
                if not chunk:
                    break
                body += chunk
    except TimeoutError:
        return None
    except ConnectionError:
        raise  # the client went away: nothing to answer
    except Exception:  # aiohttp's payload errors (bad chunking, a cut body): a 400, never a 500
        return None
    if len(body) > max_bytes:
        return None
    try:
        parsed = parse_qs(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False)
    except (UnicodeDecodeError, ValueError):
        return None
    return MultiDict((key, value) for key, values in parsed.items() for value in values)
