"""`GET /v2/_catalog` answered with only the repositories a user may pull, paginated correctly.

The registry lists repositories in lexical order and pages with `n` and `last` (list those after
`last`). We read its pages, keep the visible names, and hand out our own `Link` whose `last` is the
last name we returned: the next page then starts right after it, so every visible repository
appears exactly once however the hidden ones fall across the registry's pages.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from urllib.parse import quote

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from gateway.routes import MAX_NAME_LENGTH, NAME_RE

UPSTREAM_PAGE = 1000
MAX_PAGE = 10000


@dataclass(frozen=True)
class Page:
    repositories: list[str]
    next_last: str | None  # set when more visible repositories may follow


class CatalogError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def parse_paging(params: Mapping[str, str]) -> tuple[int | None, str | None]:
    n_text, last = params.get("n"), params.get("last")
    n = None
    if n_text is not None and n_text != "":
        if not n_text.isdigit() or not 0 < int(n_text) <= MAX_PAGE:
            raise CatalogError(400, "PAGINATION_NUMBER_INVALID", f"n must be between 1 and {MAX_PAGE}")
        n = int(n_text)
    if last is not None and last != "" and (not NAME_RE.match(last) or len(last) > MAX_NAME_LENGTH):
        raise CatalogError(400, "NAME_INVALID", "invalid repository name in last")
    return n, last or None


async def filtered_page(
    session: aiohttp.ClientSession,
    upstream: URL,
    headers: CIMultiDict[str],
    visible: Callable[[str], bool],
    n: int | None,
    last: str | None,
) -> Page:
    shown: list[str] = []
    cursor = last
    while True:
        query = f"n={UPSTREAM_PAGE}" + (f"&last={quote(cursor, safe='')}" if cursor else "")
        url = URL(f"{upstream}/v2/_catalog?{query}", encoded=True)
        async with session.get(url, headers=headers, allow_redirects=False) as response:
            if response.status != 200:
                message = f"the registry answered {response.status} to the catalog"
                raise CatalogError(502, "UNAVAILABLE", message)
            try:
                names = json.loads(await response.read())["repositories"]
            except (ValueError, KeyError, TypeError):
                raise CatalogError(502, "UNAVAILABLE", "the registry sent an unreadable catalog") from None
            upstream_has_more = "next" in response.headers.get("Link", "")
        if not isinstance(names, list) or not all(isinstance(x, str) for x in names):
            raise CatalogError(502, "UNAVAILABLE", "the registry sent an unreadable catalog")
        for index, name in enumerate(names):
            if visible(name):
                shown.append(name)
                if n is not None and len(shown) == n:
                    more = upstream_has_more or index < len(names) - 1
                    return Page(shown, name if more else None)
        if not upstream_has_more or not names:
            return Page(shown, None)
        cursor = names[-1]
