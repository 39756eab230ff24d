"""Which requests are the web page's: the one question the request path asks before importing
the page's code (Jinja2) at its first request."""

from __future__ import annotations

PREFIX = "/ui/"


def is_ui_path(raw_path: str) -> bool:
    path = raw_path.partition("?")[0]
    return path == PREFIX.rstrip("/") or path.startswith(PREFIX)
