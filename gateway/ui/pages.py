"""The pages under /ui/: HTTP, the session, the registry reads; what they show comes from
gateway.ui.views and the decisions from the same functions every registry request is decided by
(gateway.pipeline, gateway.policy, gateway.immutable), so the page never shows or does more
than `docker` could.

Every page: Content-Security-Policy allowing the page's own stylesheet and script and nothing
else (no inline script, no frames, forms to itself only), no caching of what a user sees, and
every value escaped by Jinja2's autoescaping. Every POST: same origin (Origin), and a CSRF token
of the session (login excepted: there is no session yet). Logins go through check_login, with
the lockout, like `docker login`.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import re
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any, Protocol, TypeVar
from urllib.parse import quote

import aiohttp
import jinja2
from aiohttp import web
from multidict import CIMultiDict

from gateway import acl, catalog, forwarding, immutable, pipeline, tag_lookup
from gateway.audit import AuditRecord
from gateway.authn import Authenticator, Credentials, Malformed, parse_basic_authorization
from gateway.config import Settings
from gateway.http.forms import read_form
from gateway.http.upstream import UpstreamPool
from gateway.identity import Labels, merge_labels
from gateway.login import Locked, LoggedIn, check_login, without_robot_label
from gateway.metrics import Metrics
from gateway.pipeline import Identity
from gateway.policy import Decision, Outcome, acl_request
from gateway.robots import robot_name
from gateway.routes import TAG_RE, Operation, parse_request, valid_name
from gateway.shared.lockout import SharedLockout
from gateway.shared.tag_locks import SharedTagLocks, TagBusy
from gateway.state import Snapshot
from gateway.tokens import keys, revocations
from gateway.tokens.authority import TokenAuthority
from gateway.tokens.scopes import Scope
from gateway.ui import sessions, views
from gateway.ui.paths import PREFIX

log = logging.getLogger(__name__)
Answer = TypeVar("Answer", bound=web.StreamResponse)

PAGE_SIZE = 50
MAX_MANIFEST = 4 * 1024 * 1024
MAX_CONFIG = 1024 * 1024
MAX_FORM_BYTES = 16 * 1024
CATALOG_PAGES = 10  # of the registry's pages (1000 names each): what one request may make it read
DIGEST_RE = re.compile(r"sha256:[a-f0-9]{64}")
CSP = (
    "default-src 'none'; style-src 'self'; script-src 'self'; img-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
STATIC = {"ui.css": "text/css", "ui.js": "text/javascript"}


class RepositoryLocks(Protocol):
    def holding(self, key: object) -> contextlib.AbstractAsyncContextManager[None]: ...


class Host(Protocol):
    """What the pages need of the gateway (gateway.app.Gateway)."""

    settings: Settings
    authenticator: Authenticator
    lockout: SharedLockout
    authority: TokenAuthority | None
    session: aiohttp.ClientSession | None
    upstream: UpstreamPool | None
    metrics: Metrics
    shared_tag_locks: SharedTagLocks

    @property
    def tag_locks(self) -> RepositoryLocks: ...


def session_key(settings: Settings) -> bytes:
    """Sessions' signing key: from the token key when there is one (every worker and replica
    sharing it accepts the others' sessions), else this process's own."""
    if settings.token_key is not None:
        signing = keys.load_all(settings.token_key)[0]
        return hashlib.sha256(b"registry-gateway ui session\0" + keys.private_der(signing)).digest()
    return secrets.token_bytes(32)


@dataclass(frozen=True)
class Visitor:
    """Who looks: a user with a session, or anonymous (user None)."""

    user: str | None
    labels: Labels | None
    cookie: str | None


@dataclass(frozen=True)
class Visit:
    """One page request: the request, how its client reached us, the users and rules it is
    decided by (one snapshot throughout), who asks, and its audit record."""

    request: web.BaseRequest
    view: forwarding.ClientView
    snapshot: Snapshot
    visitor: Visitor
    record: AuditRecord


class Pages:
    def __init__(self, host: Host) -> None:
        self.host = host
        self.key = session_key(host.settings)
        self.templates = jinja2.Environment(
            loader=jinja2.PackageLoader("gateway.ui", "templates"),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
        )
        self.static = {
            name: resources.files("gateway.ui").joinpath("static", name).read_bytes() for name in STATIC
        }

    # --- the request ------------------------------------------------------------------------

    async def handle(
        self, request: web.BaseRequest, view: forwarding.ClientView, record: AuditRecord
    ) -> web.StreamResponse:
        """`view`: how the client reached us, checked as for the registry (app._client_view);
        `record`: this request's audit record, which the page fills in (who, what, the outcome)."""
        record.operation = "ui"
        response = await self._answer(request, view, record)
        if record.decision in ("refused", "challenge"):
            record.decision = "allow" if response.status < 400 else "deny"
        return response

    async def _answer(
        self, request: web.BaseRequest, view: forwarding.ClientView, record: AuditRecord
    ) -> web.StreamResponse:
        path = request.path
        if path == PREFIX.rstrip("/"):
            return _see_other(PREFIX)
        page = path[len(PREFIX) :]
        if page.startswith("static/") and request.method in ("GET", "HEAD"):
            name = page[len("static/") :]
            if name not in STATIC:
                return self._message(request, None, 404, "Not found", "No such page.", error=True)
            return self._secure(web.Response(body=self.static[name], content_type=STATIC[name]), cache=True)
        snapshot = self.host.authenticator.store.snapshot
        visitor = self._visitor(request, snapshot)
        record.user = visitor.user
        visit = Visit(request, view, snapshot, visitor, record)
        if request.method == "POST":
            origin = request.headers.get("Origin")
            if origin != f"{view.scheme}://{view.host}":
                return self._message(
                    request, visitor, 403, "Refused", "A form from another site.", error=True
                )
            if request.content_length is not None and request.content_length > MAX_FORM_BYTES:
                return self._message(
                    request, visitor, 413, "Refused", "Not a form of these pages.", error=True
                )
            # Small, urlencoded, read within body_timeout; anything else a 400, never a 500.
            form = await read_form(request, self.host.settings.body_timeout, MAX_FORM_BYTES)
            if form is None:
                return self._message(
                    request, visitor, 400, "Refused", "Not a form of these pages.", error=True
                )
            fields = {key: value for key, value in form.items()}
            if page == "login":
                record.operation = "ui login"
                return await self._login(visit, fields)
            if not sessions.csrf_ok(self.key, visitor.cookie, fields.get("csrf")):
                return self._message(
                    request,
                    visitor,
                    403,
                    "Refused",
                    "The form's token is missing or stale: reload the page.",
                    error=True,
                )
            if page == "logout":
                response = _see_other(PREFIX)
                response.del_cookie(sessions.COOKIE, path=PREFIX)
                return self._secure(response)
            if page == "delete":
                record.operation = "ui delete"
                return await self._delete(visit, fields)
            return self._message(request, visitor, 404, "Not found", "No such page.", error=True)
        if request.method not in ("GET", "HEAD"):
            return self._message(
                request, visitor, 405, "Not allowed", "Not a method of these pages.", error=True
            )
        query = {key: value for key, value in request.query.items()}
        if page == "":
            return await self._repositories(visit, query)
        if page == "login":
            return self._render(request, visitor, "login.html", problem=None, username="")
        if page == "repo":
            return await self._repository(visit, query)
        if page == "manifest":
            return await self._manifest(visit, query)
        if page == "delete":
            return await self._confirm_delete(visit, query)
        return self._message(request, visitor, 404, "Not found", "No such page.", error=True)

    def _visitor(self, request: web.BaseRequest, snapshot: Snapshot) -> Visitor:
        """The session's user while it is still theirs: signed by us, not ended, the password
        unchanged (files), the login still remembered (a directory's or a program's user), no
        token revocation since, the account not expired."""
        cookie = request.cookies.get(sessions.COOKIE)
        now = time.time()
        session = sessions.read(self.key, cookie, now)
        if session is None:
            return Visitor(None, None, None)
        user = session.user
        authority = self.host.authority
        if authority is not None and revocations.is_revoked(authority.revoked, user, session.issued):
            return Visitor(None, None, None)
        remembered = None
        if session.fingerprint:
            stored = snapshot.users.get(user)
            if stored is None or sessions.fingerprint(self.key, stored.value) != session.fingerprint:
                return Visitor(None, None, None)
        else:
            remembered = self.host.authenticator.remembered_labels(user)
            if remembered is None:
                return Visitor(None, None, None)
        if not pipeline.still_valid(snapshot, user, remembered):
            return Visitor(None, None, None)
        labels = without_robot_label(
            user, merge_labels(snapshot.account(user).labels, remembered or {}), snapshot
        )
        return Visitor(user, labels, cookie)

    # --- pages ------------------------------------------------------------------------------

    async def _login(self, visit: Visit, fields: Mapping[str, str]) -> web.StreamResponse:
        request, view, snapshot, record = visit.request, visit.view, visit.snapshot, visit.record
        username, password = fields.get("username", ""), fields.get("password", "")
        nobody = Visitor(None, None, None)
        record.user = username[:200] or None
        # What Basic credentials must be (authn.parse_basic_authorization), the same here.
        malformed = isinstance(parse_basic_authorization(_basic(username, password)), Malformed)
        if not username or not password or malformed:
            return self._render(
                request,
                nobody,
                "login.html",
                400,
                problem="Give a user name and a password.",
                username=username,
            )
        if robot_name(username) is not None:
            return self._render(
                request,
                nobody,
                "login.html",
                403,
                problem="Robots log in with docker, not here.",
                username=username,
            )
        login = await check_login(
            self.host.authenticator,
            self.host.lockout,
            Credentials(username, password),
            view.address,
            snapshot,
        )
        if isinstance(login, Locked):
            record.decision = "locked"
            self.host.metrics.auth_failures.labels("locked").inc()
            wait = f"{login.retry_after:.0f}"
            return self._render(
                request,
                nobody,
                "login.html",
                429,
                problem=f"Too many failed logins: try again in {wait} s.",
                username=username,
            )
        if not isinstance(login, LoggedIn):
            why = "That account has expired." if login.reason == "expired" else "Wrong user name or password."
            if login.reason == "source_unavailable":
                why = "The directory does not answer: try again later."
            log.info("ui: failed login for user %r from %s", username, view.address)
            record.decision = "challenge"
            self.host.metrics.auth_failures.labels(login.reason).inc()
            return self._render(request, nobody, "login.html", 401, problem=why, username=username)
        record.decision = "allow"
        stored = snapshot.users.get(login.user)
        now = time.time()
        session = sessions.Session(
            login.user,
            login.source,
            now,
            now + sessions.LIFETIME,
            sessions.fingerprint(self.key, stored.value) if stored is not None else "",
        )
        response = _see_other(PREFIX)
        response.set_cookie(
            sessions.COOKIE,
            sessions.make(self.key, session),
            path=PREFIX,
            max_age=sessions.LIFETIME,
            httponly=True,
            secure=view.scheme == "https",
            samesite="Strict",
        )
        log.info("ui: %r logged in from %s", login.user, view.address)
        return self._secure(response)

    async def _repositories(self, visit: Visit, query: Mapping[str, str]) -> web.StreamResponse:
        request, view, snapshot, visitor = visit.request, visit.view, visit.snapshot, visit.visitor
        search = query.get("q", "")[:200]
        last = query.get("last") or None
        pullable = pipeline.pullable(
            snapshot, self.host.settings.admin_prefix, self._identity(visitor), view.address
        )

        def visible(name: str) -> bool:
            return search.lower() in name.lower() and pullable(name)

        policy = snapshot.policy
        if visitor.user is None and (policy is None or not policy.anonymous):
            # Anonymous may pull nothing here: no reason to read the registry's catalog at all.
            return self._render(
                request,
                visitor,
                "repositories.html",
                repositories=[],
                truncated=False,
                query=search,
                next_last=None,
            )

        headers = self._registry_headers(Scope("registry", "catalog", frozenset({"*"})))
        try:
            page = await catalog.filtered_page(
                self._session(), self.host.settings.upstream, headers, visible, PAGE_SIZE, last, CATALOG_PAGES
            )
        except (catalog.CatalogError, TimeoutError, aiohttp.ClientError) as exc:
            return self._unreachable(request, visitor, exc)
        return self._render(
            request,
            visitor,
            "repositories.html",
            repositories=page.repositories,
            truncated=page.truncated,
            query=search,
            next_last=page.next_last,
        )

    async def _repository(self, visit: Visit, query: Mapping[str, str]) -> web.StreamResponse:
        request, view, snapshot, visitor = visit.request, visit.view, visit.snapshot, visit.visitor
        name = query.get("name", "")
        if not self._may_pull(snapshot, visitor, view, name):
            return self._not_found(request, visitor)
        last = query.get("last", "")
        target = f"/v2/{name}/tags/list?n={PAGE_SIZE}" + (f"&last={quote(last, safe='')}" if last else "")
        try:
            status, _, body, link = await self._get(
                target, Scope("repository", name, frozenset({"pull"})), 4 * 1024 * 1024
            )
        except (TimeoutError, aiohttp.ClientError) as exc:
            return self._unreachable(request, visitor, exc)
        tags: list[str] = []
        if status == 200:
            try:
                found = json.loads(body).get("tags") or []
            except (ValueError, AttributeError):
                found = []
            tags = [tag for tag in found if isinstance(tag, str)] if isinstance(found, list) else []
        next_last = tags[-1] if link and 'rel="next"' in link and tags else None
        permissions = self._permissions(snapshot, visitor, view, name)
        return self._render(
            request,
            visitor,
            "repository.html",
            name=name,
            tags=tags,
            next_last=next_last,
            permissions=permissions,
        )

    async def _manifest(self, visit: Visit, query: Mapping[str, str]) -> web.StreamResponse:
        request, view, snapshot, visitor = visit.request, visit.view, visit.snapshot, visit.visitor
        name, ref = query.get("name", ""), query.get("ref", "")
        if not _valid_reference(ref) or not self._may_pull(snapshot, visitor, view, name):
            return self._not_found(request, visitor)
        pull = Scope("repository", name, frozenset({"pull"}))
        accept = ", ".join(tag_lookup.MANIFEST_TYPES)
        try:
            status, headers, body, _ = await self._get(
                f"/v2/{name}/manifests/{quote(ref, safe=':')}", pull, MAX_MANIFEST, accept
            )
            if status != 200:
                return self._not_found(request, visitor)
            manifest = views.parse_manifest(body, headers.get("Content-Type", ""))
            config = None
            if manifest.config_digest and DIGEST_RE.fullmatch(manifest.config_digest):
                status, _, config_body, _ = await self._get(
                    f"/v2/{name}/blobs/{manifest.config_digest}", pull, MAX_CONFIG
                )
                config = views.parse_config(config_body) if status == 200 else None
        except views.NotAManifest:
            return self._message(
                request,
                visitor,
                502,
                "Unreadable",
                "The registry's manifest is not one this page reads.",
                error=True,
            )
        except (TimeoutError, aiohttp.ClientError) as exc:
            return self._unreachable(request, visitor, exc)
        digest = headers.get("Docker-Content-Digest") or "sha256:" + hashlib.sha256(body).hexdigest()
        place = f"{view.host}/{name}" + (f"@{ref}" if ref.startswith("sha256:") else f":{ref}")
        commands = [
            {"label": "docker pull", "text": f"docker pull {place}"},
            {
                "label": "skopeo copy",
                "text": f"skopeo copy docker://{place} oci:{name.rsplit('/', 1)[-1]}:{ref.replace(':', '-')}",
            },
        ]
        may_delete = self._decide(snapshot, visitor, view, "DELETE", f"/v2/{name}/manifests/{digest}").allowed
        return self._render(
            request, visitor, "manifest.html", name=name, ref=ref, digest=digest, manifest=manifest,
            config=config, commands=commands, size=views.human_size, may_delete=may_delete,
        )  # fmt: skip

    async def _confirm_delete(self, visit: Visit, query: Mapping[str, str]) -> web.StreamResponse:
        request, view, snapshot, visitor = visit.request, visit.view, visit.snapshot, visit.visitor
        name, ref = query.get("name", ""), query.get("ref", "")
        if visitor.cookie is None:
            return _see_other(PREFIX + "login")
        if not _valid_reference(ref) or not self._may_pull(snapshot, visitor, view, name):
            return self._not_found(request, visitor)
        try:
            digest = await self._digest_of(view, name, ref)
        except tag_lookup.LookupFailed as exc:
            return self._unreachable(request, visitor, exc)
        if digest is None:
            return self._not_found(request, visitor)
        if not self._decide(snapshot, visitor, view, "DELETE", f"/v2/{name}/manifests/{digest}").allowed:
            return self._message(
                request, visitor, 403, "Not allowed", f"You may not delete in {name}.", error=True
            )
        return self._render(request, visitor, "confirm_delete.html", name=name, ref=ref, digest=digest)

    async def _delete(self, visit: Visit, fields: Mapping[str, str]) -> web.StreamResponse:
        request, view, snapshot, visitor = visit.request, visit.view, visit.snapshot, visit.visitor
        record = visit.record
        name, ref, digest = fields.get("name", ""), fields.get("ref", ""), fields.get("digest", "")
        record.repository, record.digest = name[:200] or None, digest[:100] or None
        if not DIGEST_RE.fullmatch(digest) or not self._may_pull(snapshot, visitor, view, name):
            return self._not_found(request, visitor)
        decision = self._decide(snapshot, visitor, view, "DELETE", f"/v2/{name}/manifests/{digest}")
        if not decision.allowed:
            return self._message(
                request, visitor, 403, "Not allowed", f"You may not delete in {name}.", error=True
            )
        operation = parse_request("DELETE", f"/v2/{name}/manifests/{digest}")
        assert isinstance(operation, Operation)
        guard = immutable.guard(snapshot.policy.immutable, operation) if snapshot.policy is not None else None
        try:
            # The same locks as a delete through the registry API (app._guarded).
            async with self.host.tag_locks.holding(name), self.host.shared_tag_locks.holding(name):
                if guard is not None:
                    pointing = await tag_lookup.tags_holding(
                        self._pool(),
                        view,
                        self._authorization(Scope("repository", name, frozenset({"pull"}))),
                        name,
                        digest,
                        guard.rules,
                    )
                    refusal = immutable.on_delete_digest(digest, pointing)
                    if refusal is not None:
                        return self._message(
                            request, visitor, 403, "Not allowed", refusal.message, error=True
                        )
                status, _, _, _ = await self._get(
                    f"/v2/{name}/manifests/{digest}",
                    Scope("repository", name, frozenset({"delete"})),
                    65536,
                    method="DELETE",
                )
        except (tag_lookup.LookupFailed, TagBusy, TimeoutError, aiohttp.ClientError) as exc:
            return self._unreachable(request, visitor, exc)
        log.info(
            "ui: %r deleted %r@%r (%r) from %s: registry answered %d",
            visitor.user,
            name,
            digest,
            ref,
            view.address,
            status,
        )
        back = f"{PREFIX}repo?name={quote(name, safe='')}"
        if status == 202:
            return self._message(request, visitor, 200, "Deleted", f"{name}@{digest} is deleted.", back=back)
        if status == 405:
            return self._message(
                request,
                visitor,
                405,
                "Not deleted",
                "The registry does not accept deletes (storage.delete.enabled).",
                error=True,
                back=back,
            )
        return self._message(
            request, visitor, 502, "Not deleted", f"The registry answered {status}.", error=True, back=back
        )

    # --- decisions --------------------------------------------------------------------------

    def _identity(self, visitor: Visitor) -> Identity:
        return Identity(visitor.user, basic=visitor.user is not None, labels=visitor.labels)

    def _decide(
        self, snapshot: Snapshot, visitor: Visitor, view: forwarding.ClientView, method: str, target: str
    ) -> Decision:
        operation = parse_request(method, target)
        if not isinstance(operation, Operation):
            return Decision(Outcome.DENY, "not a registry request")
        return pipeline.decide(
            snapshot, self.host.settings.admin_prefix, self._identity(visitor), operation, view.address
        )

    def _may_pull(self, snapshot: Snapshot, visitor: Visitor, view: forwarding.ClientView, name: str) -> bool:
        if not valid_name(name):
            return False
        return pipeline.pullable(
            snapshot, self.host.settings.admin_prefix, self._identity(visitor), view.address
        )(name)

    def _permissions(
        self, snapshot: Snapshot, visitor: Visitor, view: forwarding.ClientView, name: str
    ) -> list[views.Permission]:
        """What `policy explain` would say for pull, push and delete here."""
        found = []
        policy = snapshot.policy
        for action in ("pull", "push", "delete"):
            if policy is None:
                if visitor.user is None:
                    found.append(
                        views.Permission(
                            action, False, "denied: log in (the default policy lets no one in anonymously)"
                        )
                    )
                    continue
                admin = self.host.settings.admin_prefix
                allowed = bool(admin and visitor.user.startswith(admin)) or action == "pull"
                why = (
                    f"user names starting with {admin!r} may"
                    if allowed and action != "pull"
                    else "the default policy: others may pull only"
                )
                found.append(
                    views.Permission(action, allowed, ("granted: " if allowed else "denied: ") + why)
                )
                continue
            asked = acl_request(
                policy, visitor.user, "repository", name, frozenset({action}), view.address, visitor.labels
            )
            verdict = acl.evaluate(policy.rules, asked)
            allowed = verdict.allows(frozenset({action}))
            if verdict.entry_index is None:
                why = "denied: no rule matched"
            elif visitor.user is None:
                why = "granted" if allowed else "denied: log in"  # which rule is for logged-in users
            else:
                why = f"{'granted' if allowed else 'denied'} by acl[{verdict.entry_index}]"
                if verdict.comment:
                    why += f" ({verdict.comment})"
            found.append(views.Permission(action, allowed, why))
        return found

    # --- the registry -----------------------------------------------------------------------

    def _session(self) -> aiohttp.ClientSession:
        session = self.host.session
        if session is None:
            raise aiohttp.ClientError("the gateway is not running")
        return session

    def _pool(self) -> UpstreamPool:
        pool = self.host.upstream
        if pool is None:
            raise aiohttp.ClientError("the gateway is not running")
        return pool

    def _authorization(self, scope: Scope) -> str | None:
        authority = self.host.authority
        return None if authority is None else f"Bearer {authority.token_for('', [scope])}"

    def _registry_headers(self, scope: Scope) -> CIMultiDict[str]:
        headers: CIMultiDict[str] = CIMultiDict()
        authorization = self._authorization(scope)
        if authorization is not None:
            headers["Authorization"] = authorization
        return headers

    async def _get(
        self, target: str, scope: Scope, limit: int, accept: str | None = None, method: str = "GET"
    ) -> tuple[int, Mapping[str, str], bytes, str | None]:
        headers = self._registry_headers(scope)
        if accept:
            headers["Accept"] = accept
        url = f"{self.host.settings.upstream}{target}"
        async with self._session().request(
            method, url, headers=headers, timeout=aiohttp.ClientTimeout(total=30), allow_redirects=True
        ) as response:
            body = b""
            while len(body) <= limit:  # read(n) returns what is buffered: read until the end
                chunk = await response.content.read(limit + 1 - len(body))
                if not chunk:
                    break
                body += chunk
            if len(body) > limit:
                raise aiohttp.ClientPayloadError(
                    f"the registry's answer to {target} is larger than {limit} bytes"
                )
            return response.status, response.headers, body, response.headers.get("Link")

    async def _digest_of(self, view: forwarding.ClientView, name: str, ref: str) -> str | None:
        if ref.startswith("sha256:"):
            return ref
        pull = Scope("repository", name, frozenset({"pull"}))
        return await tag_lookup.digest_of(self._pool(), view, self._authorization(pull), name, ref)

    # --- answers ----------------------------------------------------------------------------

    def _render(
        self,
        request: web.BaseRequest,
        visitor: Visitor | None,
        template: str,
        status: int = 200,
        **values: Any,
    ) -> web.Response:
        visitor = visitor or Visitor(None, None, None)
        csrf = sessions.csrf_token(self.key, visitor.cookie) if visitor.cookie else ""
        text = self.templates.get_template(template).render(
            prefix=PREFIX, user=visitor.user, csrf=csrf, **values
        )
        return self._secure(web.Response(text=text, status=status, content_type="text/html"))

    def _message(
        self,
        request: web.BaseRequest,
        visitor: Visitor | None,
        status: int,
        heading: str,
        message: str,
        *,
        error: bool = False,
        back: str | None = None,
    ) -> web.Response:
        return self._render(
            request, visitor, "message.html", status, heading=heading, message=message, error=error, back=back
        )

    def _not_found(self, request: web.BaseRequest, visitor: Visitor) -> web.Response:
        return self._message(
            request,
            visitor,
            404,
            "Not found",
            "No such repository or tag, or not one you may pull.",
            error=True,
        )

    def _unreachable(self, request: web.BaseRequest, visitor: Visitor, exc: BaseException) -> web.Response:
        log.warning("ui: the registry did not answer: %s", exc)
        return self._message(
            request, visitor, 502, "The registry does not answer", "Try again in a moment.", error=True
        )

    def _secure(self, response: Answer, cache: bool = False) -> Answer:
        response.headers["Content-Security-Policy"] = CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        # same-origin, not no-referrer: with no-referrer browsers send `Origin: null` on our own
        # forms, which the same-origin check must refuse.
        response.headers["Referrer-Policy"] = "same-origin"
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["Cache-Control"] = "max-age=3600" if cache else "no-store"
        return response


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def _see_other(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location})


def _valid_reference(ref: str) -> bool:
    return bool(TAG_RE.fullmatch(ref) or DIGEST_RE.fullmatch(ref))
