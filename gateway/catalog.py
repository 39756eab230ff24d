"""`GET /v2/_catalog` answered with only the repositories a user may pull, paginated correctly.

The registry lists repositories in lexical order and pages with `n` and `last` (list those after
`last`). We read its pages, keep the visible names, and hand out our own `Link` whose `last` is the
last name we returned: the next page then starts right after it, so every visible repository
appears exactly once however the hidden ones fall across the registry's pages. A `Link` is sent
only when another visible repository really follows: a link to an empty page would tell the user
that hidden repositories sort after the last one shown.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from urllib.parse import quote

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from gateway.routes import valid_name

UPSTREAM_PAGE = 1000
MAX_PAGE = 10000
# ASCII digits only (str.isdigit admits superscript and full-width digits, which int() refuses or
# reads as digits), and few of them.
_PAGE_SIZE = re.compile(r"[0-9]{1,5}")


@dataclass(frozen=True)
class Page:
    repositories: list[str]
    next_last: str | None  # set when more visible repositories may follow
    truncated: bool = False  # max_pages of the registry's were read: more may match


class CatalogError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def parse_paging(params: Mapping[str, str]) -> tuple[int | None, str | None]:
    n_text, last = params.get("n"), params.get("last")
    n = None
    if n_text is not None and n_text != "":
        if not _PAGE_SIZE.fullmatch(n_text) or not 0 < int(n_text) <= MAX_PAGE:
            raise CatalogError(400, "PAGINATION_NUMBER_INVALID", f"n must be between 1 and {MAX_PAGE}")
        n = int(n_text)
    if last is not None and last != "" and not valid_name(last):
        raise CatalogError(400, "NAME_INVALID", "invalid repository name in last")
    return n, last or None


async def filtered_page(
    session: aiohttp.ClientSession,
    upstream: URL,
    headers: CIMultiDict[str],
    visible: Callable[[str], bool],
    n: int | None,
    last: str | None,
    max_pages: int | None = None,
) -> Page:
    """`max_pages`: at most so many of the registry's pages are read (the web page's search, which
    anyone may send); then the page ends with what was found, `truncated`."""
    shown: list[str] = []
    cursor = last
    read = 0
    while True:
        if max_pages is not None and read == max_pages:
            return Page(shown, shown[-1] if shown else None, truncated=True)
        read += 1
        names, upstream_has_more = await _upstream_page(session, upstream, headers, cursor)
        for name in names:
            if not visible(name):
                continue
            if n is not None and len(shown) == n:
                # A page is full and one more visible name exists: only now is a next page real.
                return Page(shown, shown[-1])
            shown.append(name)
        if not upstream_has_more or not names:
            return Page(shown, None)
        cursor = names[-1]


async def _upstream_page(
    session: aiohttp.ClientSession, upstream: URL, headers: CIMultiDict[str], cursor: str | None
) -> tuple[list[str], bool]:
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
    return names, upstream_has_more
