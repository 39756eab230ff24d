"""What the registry says a tag is, for immutable tags (gateway.immutable decides): the digest a
tag points to (a HEAD of the manifest, asking for every manifest type so that the registry
answers with the stored manifest's digest, converted to nothing), and which tags point to a
digest (the tags list, paged, then each covered tag's manifest, which may be an index listing it).

Anything but a clear answer (a timeout, a 5xx, an answer without a digest) is LookupFailed: the
gateway then refuses the change (fail closed), naming what it could not learn.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable
from urllib.parse import quote

from gateway import forwarding
from gateway.http.upstream import UpstreamError, UpstreamPool
from gateway.immutable import ImmutableRule

MANIFEST_TYPES = (
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
)
TAGS_PAGE = 1000
MAX_TAGS = 20_000  # a delete by digest in a repository with more tags is refused, not guessed at
MAX_TAGS_PAGE_BYTES = 4 * 1024 * 1024
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
CONCURRENT_HEADS = 8


class LookupFailed(Exception):
    """The registry did not say; the message says what could not be learned."""


async def digest_of(
    pool: UpstreamPool, view: forwarding.ClientView, authorization: str | None, repository: str, tag: str
) -> str | None:
    """The digest `tag` of `repository` points to; None when there is no such tag."""
    return (await _manifest(pool, view, authorization, repository, tag, "HEAD"))[0]


async def tags_holding(
    pool: UpstreamPool,
    view: forwarding.ClientView,
    authorization: str | None,
    repository: str,
    digest: str,
    rules: Iterable[ImmutableRule],
) -> dict[str, ImmutableRule]:
    """The tags of `repository` that a rule covers and that are `digest`, or an index listing
    it (one of its platforms), with the rule."""
    covered: dict[str, ImmutableRule] = {}
    for tag in await _tags(pool, view, authorization, repository):
        rule = next((r for r in rules if r.covers(repository, tag)), None)
        if rule is not None:
            covered[tag] = rule
    reads = asyncio.Semaphore(CONCURRENT_HEADS)

    async def holds(tag: str) -> bool:
        async with reads:
            found, body = await _manifest(pool, view, authorization, repository, tag)
        if found == digest:
            return True
        try:
            listed = json.loads(body).get("manifests") or []
        except (ValueError, AttributeError):
            return False
        return isinstance(listed, list) and any(
            isinstance(m, dict) and m.get("digest") == digest for m in listed
        )

    found = await asyncio.gather(*(holds(tag) for tag in covered))
    return {tag: rule for (tag, rule), hit in zip(covered.items(), found, strict=True) if hit}


async def _manifest(
    pool: UpstreamPool,
    view: forwarding.ClientView,
    authorization: str | None,
    repository: str,
    tag: str,
    method: str = "GET",
) -> tuple[str | None, bytes]:
    """A tag's digest (None: no such tag) and, for a GET, its manifest; every manifest type is
    accepted, so the registry answers with the stored manifest, converted to nothing."""
    headers = ((b"Accept", ", ".join(MANIFEST_TYPES).encode()),)
    target = f"/v2/{repository}/manifests/{quote(tag, safe='')}"
    head = forwarding.upstream_request_head(method, target, headers, view, authorization)
    try:
        async with await pool.request(method, head) as answer:
            status, digest = answer.status, answer.header(b"docker-content-digest")
            body = await answer.read_at_most(MAX_MANIFEST_BYTES) if status == 200 and method == "GET" else b""
    except (UpstreamError, TimeoutError) as exc:
        raise LookupFailed(f"the registry did not say what tag {tag} is ({exc})") from None
    if status == 404:
        return None, b""
    if status != 200 or not digest:
        raise LookupFailed(f"the registry did not say what tag {tag} is (HTTP {status})")
    return digest, body


async def _tags(
    pool: UpstreamPool, view: forwarding.ClientView, authorization: str | None, repository: str
) -> list[str]:
    tags: list[str] = []
    target = f"/v2/{repository}/tags/list?n={TAGS_PAGE}"
    while True:
        head = forwarding.upstream_request_head("GET", target, (), view, authorization)
        try:
            async with await pool.request("GET", head) as answer:
                status, link = answer.status, answer.header(b"link")
                body = await answer.read_at_most(MAX_TAGS_PAGE_BYTES) if status == 200 else b""
        except (UpstreamError, TimeoutError) as exc:
            raise LookupFailed(f"the registry did not list the tags of {repository} ({exc})") from None
        if status == 404:
            return tags  # no repository, no tags
        try:
            page = json.loads(body).get("tags") or [] if status == 200 else None
        except (ValueError, AttributeError):
            page = None
        if not isinstance(page, list) or not all(isinstance(t, str) for t in page):
            raise LookupFailed(f"the registry did not list the tags of {repository} (HTTP {status})")
        tags += page
        if len(tags) > MAX_TAGS:
            raise LookupFailed(f"{repository} has more than {MAX_TAGS} tags: too many to check")
        # distribution: `Link: </v2/NAME/tags/list?last=TAG&n=N>; rel="next"`
        if not link or 'rel="next"' not in link or "<" not in link:
            return tags
        target = link[link.index("<") + 1 : link.index(">")]
        if not target.startswith(f"/v2/{repository}/tags/list?"):
            raise LookupFailed(f"the registry's next page of tags is elsewhere ({target!r})")
