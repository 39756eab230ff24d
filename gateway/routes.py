"""Map a raw request line (method + target) to the registry operation it is.

Pure: no I/O, no aiohttp. The target is read exactly as the client sent it, before any decoding,
and only targets whose meaning cannot differ between us and the registry are accepted: no percent
escapes in the path, no dot segments, no empty segments, no backslashes. What we authorize is then
byte for byte what we forward.

The route patterns and their order mirror distribution 2.8 (`registry/api/v2/routes.go`), whose
gorilla/mux router tries them in registration order with leftmost-first (greedy) regexps, so a
name such as `a/manifests/b` in `/v2/a/manifests/b/manifests/c` is split the same way here.
"""

from __future__ import annotations

import enum
import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from urllib.parse import unquote_plus

MAX_NAME_LENGTH = 255
MAX_TARGET_LENGTH = 8192

PULL = "pull"
PUSH = "push"
DELETE = "delete"
CATALOG = "*"


class Route(enum.Enum):
    BASE = "base"
    CATALOG = "catalog"
    TAGS = "tags"
    MANIFEST = "manifest"
    BLOB = "blob"
    UPLOAD_START = "upload_start"
    UPLOAD = "upload"
    REFERRERS = "referrers"


@dataclass(frozen=True)
class Operation:
    """A request the gateway understood: which route, which repository, which actions it needs."""

    route: Route
    method: str
    repository: str | None = None
    reference: str | None = None
    actions: frozenset[str] = frozenset()
    mount_from: str | None = None  # set only when the registry would really attempt a mount
    params: Mapping[str, str] = field(default_factory=dict, compare=False)  # the decoded query
    # What to forward: the raw target as sent, less `mount`/`from` when they cannot make a mount.
    target: str = field(default="", compare=False)


@dataclass(frozen=True)
class RouteError:
    """A request refused with `status` and a registry error code.

    `after_authentication`: the request is well-formed HTTP the registry would read as we do, it
    just names no operation (an unknown endpoint, a bad name or digest); like the registry behind
    an auth layer, only a client that authenticated learns that. Errors about how the target
    itself would be read (escapes, dot segments, ambiguous queries) are answered at once.
    """

    status: int
    code: str
    message: str
    after_authentication: bool = False


# OCI distribution spec name grammar (stricter than distribution's, which also admits a domain).
_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
_NAME = rf"{_COMPONENT}(?:/{_COMPONENT})*"
_TAG = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"
# What distribution 2.8's router accepts where a digest goes (go-digest's DigestRegexp). The
# handlers then call digest.Parse, which is far stricter: see VALID_DIGEST.
_DIGEST_SHAPE = r"[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]+"
_UUID = r"[a-zA-Z0-9_.=-]+"

# Every pattern here is used with fullmatch: `$` would also match before a final newline.
NAME_RE = re.compile(_NAME)
TAG_RE = re.compile(_TAG)
# go-digest's digest.Parse: an algorithm it implements, lower-case hex of exactly its length.
# Anything else in a manifest reference is read by distribution 2.8 as a *tag*, which the storage
# driver then refuses with a 500 carrying its internal path; for a blob it is 400 DIGEST_INVALID.
VALID_DIGEST = re.compile(r"sha256:[a-f0-9]{64}|sha384:[a-f0-9]{96}|sha512:[a-f0-9]{128}")

# (route, pattern, method -> actions). Order as distribution registers them.
_ROUTES: tuple[tuple[Route, re.Pattern[str], dict[str, frozenset[str]]], ...] = (
    (
        Route.BASE,
        re.compile(r"/v2/?"),
        {"GET": frozenset(), "HEAD": frozenset()},
    ),
    (
        Route.TAGS,
        re.compile(rf"/v2/(?P<name>{_NAME})/tags/list"),
        {"GET": frozenset({PULL})},
    ),
    (
        Route.MANIFEST,
        re.compile(rf"/v2/(?P<name>{_NAME})/manifests/(?P<ref>{_TAG}|{_DIGEST_SHAPE})"),
        {
            "GET": frozenset({PULL}),
            "HEAD": frozenset({PULL}),
            "PUT": frozenset({PULL, PUSH}),
            "DELETE": frozenset({DELETE}),
        },
    ),
    (
        Route.BLOB,
        re.compile(rf"/v2/(?P<name>{_NAME})/blobs/(?P<ref>{_DIGEST_SHAPE})"),
        {"GET": frozenset({PULL}), "HEAD": frozenset({PULL}), "DELETE": frozenset({DELETE})},
    ),
    (
        Route.UPLOAD_START,
        re.compile(rf"/v2/(?P<name>{_NAME})/blobs/uploads/"),
        {"POST": frozenset({PULL, PUSH})},
    ),
    (
        Route.UPLOAD,
        re.compile(rf"/v2/(?P<name>{_NAME})/blobs/uploads/(?P<ref>{_UUID})"),
        {
            "GET": frozenset({PULL}),
            "HEAD": frozenset({PULL}),
            "PATCH": frozenset({PULL, PUSH}),
            "PUT": frozenset({PULL, PUSH}),
            "DELETE": frozenset({DELETE}),
        },
    ),
    (
        Route.CATALOG,
        re.compile(r"/v2/_catalog"),
        {"GET": frozenset({CATALOG})},
    ),
    (
        Route.REFERRERS,
        re.compile(rf"/v2/(?P<name>{_NAME})/referrers/(?P<ref>{_DIGEST_SHAPE})"),
        {"GET": frozenset({PULL})},
    ),
)

# The same shapes with any name and reference: a target that fits one of these but no route above
# has a bad name (400 NAME_INVALID) or a reference no route takes (404, as the registry answers).
_LOOSE = re.compile(
    r"/v2/(?P<name>.+)/(?P<kind>tags/list|manifests/[^/]+|blobs/uploads/[^/]*|blobs/[^/]+|referrers/[^/]+)"
)
_UNKNOWN_REFERENCE = {
    "manifests": ("MANIFEST_UNKNOWN", "manifest unknown: the reference is neither a tag nor a digest"),
    "blobs": ("BLOB_UNKNOWN", "blob unknown: the reference is not a digest"),
    "uploads": ("BLOB_UPLOAD_UNKNOWN", "blob upload unknown"),
    "referrers": ("MANIFEST_UNKNOWN", "the reference is not a digest"),
    "tags": ("NAME_UNKNOWN", "unknown registry API endpoint"),
}

_PATH_CHARS = re.compile(r"[A-Za-z0-9._:/=+-]*")
_QUERY_CHARS = re.compile(r"[\x21-\x7e]*")
_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")


def _bad(status: int, code: str, message: str) -> RouteError:
    return RouteError(status, code, message)


def _unknown(status: int, code: str, message: str) -> RouteError:
    return RouteError(status, code, message, after_authentication=True)


def valid_name(name: str) -> bool:
    return len(name) <= MAX_NAME_LENGTH and NAME_RE.fullmatch(name) is not None


def _path_problem(path: str) -> str | None:
    """Why the registry might read this path differently from us, or None when it cannot."""
    if "%" in path:
        return "percent-encoded characters are not allowed in the path"
    if "\\" in path:
        return "backslashes are not allowed in the path"
    if not _PATH_CHARS.fullmatch(path):
        return "the path has characters a registry path never holds"
    if "//" in path:
        return "empty path segments are not allowed"
    segments = path.split("/")
    if any(segment in (".", "..") for segment in segments):
        return "dot segments are not allowed in the path"
    return None


def parse_query(query: str) -> dict[str, str] | RouteError:
    """Decode a query string the way Go's url.ParseQuery would, refusing what it would read differently.

    Go skips pairs with bad escapes or a `;` and keeps the first of repeated keys; rather than
    reproduce those quirks we refuse any query where they would matter.
    """
    if not query:
        return {}
    if not _QUERY_CHARS.fullmatch(query) or "#" in query:
        # `#` too: the client library we forward with would cut the query there, as a fragment.
        return _bad(400, "UNSUPPORTED", "the query string has characters that must be escaped")
    values: dict[str, str] = {}
    for pair in query.split("&"):
        if not pair:
            continue
        if ";" in pair or _ESCAPE.search(pair):
            return _bad(400, "UNSUPPORTED", "malformed query string")
        key, _, value = pair.partition("=")
        key, value = unquote_plus(key), unquote_plus(value)
        if key in values:
            return _bad(400, "UNSUPPORTED", f"query parameter {key!r} given more than once")
        values[key] = value
    return values


# A pull asks for the same few targets again and again (manifest HEAD and GET by tag, the base
# endpoint); parsing one costs about 10 us, a cache hit well under one. Only short targets are
# kept (upload URLs carry a long, unique `_state`), so the cache holds at most 1024 x 256 bytes.
_CACHED_TARGET_LENGTH = 256


@functools.lru_cache(maxsize=1024)
def _parse_cached(method: str, target: str) -> Operation | RouteError:
    return _parse_request(method, target)


def parse_request(method: str, target: str) -> Operation | RouteError:
    """Map a method and a raw request target (path and query, as sent) to an Operation."""
    if len(target) <= _CACHED_TARGET_LENGTH:
        return _parse_cached(method, target)
    return _parse_request(method, target)


def _parse_request(method: str, target: str) -> Operation | RouteError:
    if len(target) > MAX_TARGET_LENGTH:
        return _bad(414, "UNSUPPORTED", "request target too long")
    path, _, query = target.partition("?")
    if not path.startswith("/v2"):
        return _unknown(404, "NOT_FOUND", "not a registry API path")
    problem = _path_problem(path)
    if problem is not None:
        return _bad(400, "NAME_INVALID", problem)

    for route, pattern, methods in _ROUTES:
        match = pattern.fullmatch(path)
        if match is None:
            continue
        actions = methods.get(method)
        if actions is None:
            return _unknown(405, "UNSUPPORTED", f"{method} is not supported on this endpoint")
        groups = match.groupdict()
        name = groups.get("name")
        if name is not None and len(name) > MAX_NAME_LENGTH:
            return _unknown(400, "NAME_INVALID", f"repository name longer than {MAX_NAME_LENGTH} characters")
        reference = groups.get("ref")
        if (
            reference is not None
            and route in (Route.MANIFEST, Route.BLOB, Route.REFERRERS)
            and not (route is Route.MANIFEST and TAG_RE.fullmatch(reference))
            and not VALID_DIGEST.fullmatch(reference)
        ):
            return _unknown(400, "DIGEST_INVALID", "invalid digest: expected sha256, sha384 or sha512 hex")
        params = parse_query(query)
        if isinstance(params, RouteError):
            return params
        mount_from = None
        forward_target = target
        if "mount" in params or "from" in params:
            # distribution mounts only when both are non-empty (r.FormValue returns "" for absent);
            # otherwise it starts an ordinary upload, and so do we, without the inert parameters.
            # Elsewhere they do nothing, but a registry checking tokens itself demands pull on
            # `from` on every repository route: never forwarded there.
            if route is Route.UPLOAD_START and params.get("mount") and params.get("from"):
                mount_from = params["from"]
                if not valid_name(mount_from):
                    return _unknown(400, "NAME_INVALID", "invalid repository name in the from parameter")
            else:
                forward_target = without_query_keys(target, MOUNT_KEYS)
        return Operation(
            route=route,
            method=method,
            repository=name,
            reference=reference,
            actions=actions,
            mount_from=mount_from,
            params=MappingProxyType(params),
            target=forward_target,
        )

    loose = _LOOSE.fullmatch(path)
    if loose is not None:
        if not valid_name(loose.group("name")):
            return _unknown(400, "NAME_INVALID", "invalid repository name")
        kind = loose.group("kind")
        key = "uploads" if kind.startswith("blobs/uploads/") else kind.split("/")[0]
        code, message = _UNKNOWN_REFERENCE[key]
        return _unknown(404, code, message)
    return _unknown(404, "NOT_FOUND", "unknown registry API endpoint")


MOUNT_KEYS = frozenset({"mount", "from"})


def without_query_keys(target: str, keys: frozenset[str]) -> str:
    """The target with the named query parameters removed, every other byte left as it was."""
    path, sep, query = target.partition("?")
    if not sep:
        return target
    kept = [pair for pair in query.split("&") if pair and unquote_plus(pair.partition("=")[0]) not in keys]
    return path + ("?" + "&".join(kept) if kept else "")
