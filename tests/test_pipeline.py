"""The request decision (gateway/pipeline.py) as tables, no I/O: what both transports ask before
anything reaches the registry. The differential tests in test_fastpath.py check that the two
transports then act on it alike."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path
from types import MappingProxyType

import pytest

from gateway import config, htpasswd, pipeline, policyfile
from gateway.identity import Labels
from gateway.pipeline import Identity, Precheck, Scopes, TokenIdentity, TokenRefused
from gateway.policy import Outcome
from gateway.routes import Operation, parse_request
from gateway.state import Snapshot
from gateway.tokens.authority import TokenAuthority
from gateway.tokens.scopes import parse_scopes

DIGEST = "sha256:" + "a" * 64
DUMMY = htpasswd.make_dummy(4)
USERS = MappingProxyType({"alice": DUMMY, "admin": DUMMY, "bob": DUMMY})

POLICY = policyfile.parse(
    {
        "users": {"": {}},
        "acl": [
            {"match": {"ip": "10.0.0.0/8"}, "actions": [], "comment": "the office may do nothing"},
            {"match": {"account": "admin"}, "actions": ["*"]},
            {"match": {"account": "alice", "name": "alice/*"}, "actions": ["pull", "push"]},
            {"match": {"account": "alice", "name": "shared/*"}, "actions": ["pull"]},
            {"match": {"labels": {"team": "ops"}, "name": "ops/*"}, "actions": ["pull", "push"]},
            {"match": {"account": "", "name": "public/*"}, "actions": ["pull"]},
        ],
    },
    "test",
)
WITH_POLICY = Snapshot(USERS, POLICY, 1, DUMMY)
DEFAULT = Snapshot(USERS, None, 1, DUMMY)


def op(method: str, target: str) -> Operation:
    parsed = parse_request(method, target)
    assert isinstance(parsed, Operation), parsed
    return parsed


def token(*scopes: str, user: str | None = "alice") -> Identity:
    return Identity(user, tuple(parse_scopes(list(scopes))))


@pytest.mark.parametrize(
    ("block_old", "bearer", "agent", "path", "expected"),
    [
        (True, False, "docker/1.5.0 go/go1.4", "/v2/", Precheck.OLD_CLIENT),
        (True, False, "Go 1.1 package http", "/v2/", Precheck.OLD_CLIENT),
        (True, False, "docker/1.5.0-dev", "/v2/", Precheck.REGISTRY),  # 1.5 dev builds speak v2
        (True, False, "docker/24.0.7 go/go1.20", "/v2/", Precheck.REGISTRY),
        (False, False, "docker/1.4.0", "/v2/", Precheck.REGISTRY),  # the filter is off
        (False, True, "skopeo/1.9", "/token", Precheck.TOKEN_ENDPOINT),
        (False, False, "skopeo/1.9", "/token", Precheck.REGISTRY),  # Basic mode: no endpoint
        (True, True, "docker/1.4.0", "/token", Precheck.OLD_CLIENT),  # old clients first
    ],
)
def test_precheck(block_old: bool, bearer: bool, agent: str, path: str, expected: Precheck) -> None:
    assert pipeline.precheck(block_old, bearer, agent, path) is expected


@pytest.mark.parametrize(
    ("identity", "operation", "expected"),
    [
        (Identity("alice", basic=True), op("GET", "/v2/x/manifests/1"), Scopes.NOT_A_TOKEN),
        (Identity(None), op("GET", "/v2/x/manifests/1"), Scopes.NOT_A_TOKEN),
        (token("repository:alice/app:pull"), op("GET", "/v2/alice/app/manifests/1"), Scopes.COVERED),
        (token("repository:alice/app:pull"), op("HEAD", f"/v2/alice/app/blobs/{DIGEST}"), Scopes.COVERED),
        (token("repository:alice/app:pull"), op("PUT", "/v2/alice/app/manifests/1"), Scopes.INSUFFICIENT),
        (token("repository:alice/app:pull"), op("GET", "/v2/alice/other/manifests/1"), Scopes.INSUFFICIENT),
        (token("repository:alice/app:pull,push"), op("PUT", "/v2/alice/app/manifests/1"), Scopes.COVERED),
        (token(), op("GET", "/v2/"), Scopes.COVERED),  # any valid token may check its login
        (token(), op("GET", "/v2/_catalog"), Scopes.COVERED),  # the policy filters the catalog
        (
            token("repository:alice/app:pull,push", "repository:shared/base:pull"),
            op("POST", f"/v2/alice/app/blobs/uploads/?mount={DIGEST}&from=shared/base"),
            Scopes.COVERED,
        ),
        (  # no pull on the source: an ordinary upload, as with Basic
            token("repository:alice/app:pull,push"),
            op("POST", f"/v2/alice/app/blobs/uploads/?mount={DIGEST}&from=shared/base"),
            Scopes.COVERED_BUT_MOUNT,
        ),
        (  # no push on the target: refused whatever the source
            token("repository:alice/app:pull", "repository:shared/base:pull"),
            op("POST", f"/v2/alice/app/blobs/uploads/?mount={DIGEST}&from=shared/base"),
            Scopes.INSUFFICIENT,
        ),
    ],
)
def test_scope_check(identity: Identity, operation: Operation, expected: Scopes) -> None:
    assert pipeline.scope_check(identity, operation) is expected


DECISIONS = [
    # snapshot, identity, method, target, ip, outcome, rule, filter_catalog, drop_mount
    (DEFAULT, Identity(None), "GET", "/v2/x/manifests/1", "192.0.2.1", Outcome.CHALLENGE, None, False, False),
    (DEFAULT, Identity("bob"), "GET", "/v2/x/manifests/1", "192.0.2.1", Outcome.ALLOW, None, False, False),
    (DEFAULT, Identity("bob"), "PUT", "/v2/x/manifests/1", "192.0.2.1", Outcome.DENY, None, False, False),
    (
        DEFAULT,
        Identity("admin"),
        "DELETE",
        "/v2/x/manifests/1",
        "192.0.2.1",
        Outcome.ALLOW,
        None,
        False,
        False,
    ),
    (DEFAULT, Identity("bob"), "GET", "/v2/", "192.0.2.1", Outcome.ALLOW, None, False, False),
    (WITH_POLICY, Identity(None), "GET", "/v2/", "192.0.2.1", Outcome.CHALLENGE, None, False, False),
    (
        WITH_POLICY,
        Identity(None),
        "GET",
        "/v2/public/a/manifests/1",
        "192.0.2.1",
        Outcome.ALLOW,
        5,
        False,
        False,
    ),
    (
        WITH_POLICY,
        Identity(None),
        "GET",
        "/v2/alice/a/manifests/1",
        "192.0.2.1",
        Outcome.CHALLENGE,
        None,
        False,
        False,
    ),
    (
        WITH_POLICY,
        Identity("alice"),
        "PUT",
        "/v2/alice/a/manifests/1",
        "192.0.2.1",
        Outcome.ALLOW,
        2,
        False,
        False,
    ),
    (
        WITH_POLICY,
        Identity("alice"),
        "PUT",
        "/v2/shared/a/manifests/1",
        "192.0.2.1",
        Outcome.DENY,
        3,
        False,
        False,
    ),
    (
        WITH_POLICY,
        Identity("alice"),
        "DELETE",
        "/v2/alice/a/manifests/1",
        "192.0.2.1",
        Outcome.DENY,
        2,
        False,
        False,
    ),
    # The office network's deny rule comes first, however the address is spelled.
    (WITH_POLICY, Identity("admin"), "GET", "/v2/x/manifests/1", "10.1.2.3", Outcome.DENY, 0, False, False),
    (
        WITH_POLICY,
        Identity("admin"),
        "GET",
        "/v2/x/manifests/1",
        "::ffff:10.1.2.3",
        Outcome.DENY,
        0,
        False,
        False,
    ),
    (
        WITH_POLICY,
        Identity(None),
        "GET",
        "/v2/public/a/manifests/1",
        "::ffff:a01:203",
        Outcome.CHALLENGE,
        0,
        False,
        False,
    ),
    # Labels: from the login (a directory, a program) when it has them.
    (
        WITH_POLICY,
        Identity("carol", labels={"team": ("ops",)}),
        "PUT",
        "/v2/ops/a/manifests/1",
        "192.0.2.1",
        Outcome.ALLOW,
        4,
        False,
        False,
    ),
    (
        WITH_POLICY,
        Identity("carol"),
        "PUT",
        "/v2/ops/a/manifests/1",
        "192.0.2.1",
        Outcome.DENY,
        None,
        False,
        False,
    ),
    # The catalog: whole when a rule grants it, else filtered to what the user may pull.
    (WITH_POLICY, Identity("admin"), "GET", "/v2/_catalog", "192.0.2.1", Outcome.ALLOW, 1, False, False),
    (WITH_POLICY, Identity("alice"), "GET", "/v2/_catalog", "192.0.2.1", Outcome.ALLOW, None, True, False),
    # A mount from a repository the user may not pull: an ordinary upload.
    (
        WITH_POLICY,
        Identity("alice"),
        "POST",
        f"/v2/alice/a/blobs/uploads/?mount={DIGEST}&from=shared/b",
        "192.0.2.1",
        Outcome.ALLOW,
        2,
        False,
        False,
    ),
    (
        WITH_POLICY,
        Identity("alice"),
        "POST",
        f"/v2/alice/a/blobs/uploads/?mount={DIGEST}&from=admin/b",
        "192.0.2.1",
        Outcome.ALLOW,
        2,
        False,
        True,
    ),
]


@pytest.mark.parametrize(
    ("snapshot", "identity", "method", "target", "ip", "outcome", "rule", "filter_catalog", "drop_mount"),
    DECISIONS,
)
def test_decide(
    snapshot: Snapshot,
    identity: Identity,
    method: str,
    target: str,
    ip: str,
    outcome: Outcome,
    rule: int | None,
    filter_catalog: bool,
    drop_mount: bool,
) -> None:
    decision = pipeline.decide(snapshot, "admin", identity, op(method, target), ip)
    assert (decision.outcome, decision.rule, decision.filter_catalog, decision.drop_mount) == (
        outcome,
        rule,
        filter_catalog,
        drop_mount,
    )


@pytest.fixture(scope="module")
def authority(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TokenAuthority]:
    """A token authority with a key of its own (none on disk), in bearer mode."""
    users = tmp_path_factory.mktemp("pipeline") / "htpasswd"
    users.write_text("")
    settings = config.load(None, {}, {"htpasswd": str(users), "challenge": "bearer"})
    yield TokenAuthority(settings)


def no_directory(_user: str) -> Labels | None:
    return None


def test_token_identity(authority: TokenAuthority) -> None:
    minted = authority.token_for("alice", parse_scopes(["repository:alice/app:pull"]))
    found = pipeline.token_identity(authority, WITH_POLICY, f"Bearer {minted}", no_directory)
    assert isinstance(found, TokenIdentity) and not found.remembered_login
    assert found.identity.user == "alice" and [str(s) for s in found.identity.token_access or ()] == [
        "repository:alice/app:pull"
    ]
    anonymous = pipeline.token_identity(
        authority, WITH_POLICY, f"bearer {authority.token_for('', [])}", no_directory
    )
    assert isinstance(anonymous, TokenIdentity) and anonymous.identity.user is None

    # A user who left the files is refused (naming whom), unless a directory vouched for them
    # within cache_ttl, whose labels then join the policy account's.
    gone = pipeline.token_identity(
        authority, WITH_POLICY, f"Bearer {authority.token_for('carol', [])}", no_directory
    )
    assert gone == TokenRefused("the token's user is no longer valid", "user", "carol")
    directory = pipeline.token_identity(
        authority,
        WITH_POLICY,
        f"Bearer {authority.token_for('carol', [])}",
        lambda user: {"team": ("ops",)} if user == "carol" else None,
    )
    assert isinstance(directory, TokenIdentity) and directory.remembered_login
    assert directory.identity.labels == {"team": ("ops",)}

    for bad in ("Bearer ", "Bearer not-a-jwt", f"Bearer {minted}x"):
        refused = pipeline.token_identity(authority, WITH_POLICY, bad, no_directory)
        assert isinstance(refused, TokenRefused) and refused.metric == "invalid" and refused.user is None


@pytest.mark.parametrize(
    ("identity", "method", "target", "sent", "expected"),
    [
        # Basic mode's identities in bearer mode: a token minted for exactly what is forwarded.
        (Identity("alice", basic=True), "GET", "/v2/alice/a/manifests/1", None, "minted"),
        (Identity(None), "GET", "/v2/public/a/manifests/1", None, "minted"),
        # A client's token goes on as it came, trimmed.
        (token("repository:alice/a:pull"), "GET", "/v2/alice/a/manifests/1", "Bearer  abc ", "Bearer abc"),
        # The catalog is read with the gateway's own token: the client's need not cover it.
        (token("repository:alice/a:pull"), "GET", "/v2/_catalog", "Bearer abc", "minted"),
    ],
)
def test_upstream_authorization(
    authority: TokenAuthority, identity: Identity, method: str, target: str, sent: str | None, expected: str
) -> None:
    operation = op(method, target)
    got = pipeline.upstream_authorization(authority, identity, operation, sent)
    assert got is not None
    if expected == "minted":
        claims = authority.verify(got.removeprefix("Bearer "))
        assert claims.subject == (identity.user or "")
    else:
        assert got == expected
    assert pipeline.upstream_authorization(None, identity, operation, sent) is None  # Basic mode


def test_a_token_of_a_user_past_expiry_is_no_longer_valid() -> None:
    expired = policyfile.parse(
        {"acl": [{"match": {}, "actions": ["pull"]}], "accounts": {"alice": {"expires": "2020-01-01"}}},
        "test",
    )
    snapshot = Snapshot(USERS, expired, 1, DUMMY)
    assert not pipeline.still_valid(snapshot, "alice", None)
    assert pipeline.still_valid(WITH_POLICY, "alice", None)
    assert not pipeline.still_valid(WITH_POLICY, "carol", None)
    assert pipeline.still_valid(WITH_POLICY, "carol", {"team": ("ops",)})


APPLICATION_MODULES = (
    "gateway.acl",
    "gateway.admission",
    "gateway.app",
    "gateway.authn",
    "gateway.identity",
    "gateway.lockout",
    "gateway.login",
    "gateway.pipeline",
    "gateway.policy",
    "gateway.policyfile",
    "gateway.tokens",
)


def _imports(path: Path) -> set[str]:
    """Every module a file imports, wherever the import statement is."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def test_the_transports_decide_nothing() -> None:
    """gateway/http/ holds bytes and connections: no policy, identity or decision is imported
    there, aiohttp's internals are imported in one file, and no other module holds a decision of
    its own (the private names the fast path took from app.py are gone)."""
    root = Path(__file__).parent.parent / "gateway"
    transports = sorted((root / "http").glob("*.py"))
    assert {path.name for path in transports} >= {"fastpath.py", "server.py", "upstream.py", "answers.py"}
    for path in transports:
        imported = _imports(path)
        wrong = sorted(
            name
            for name in imported
            for layer in APPLICATION_MODULES
            if name == layer or name.startswith(f"{layer}.")
        )
        assert not wrong, f"{path.name} imports {wrong}"
        internals = sorted(name for name in imported if name.startswith("aiohttp.") and name != "aiohttp.web")
        if path.name != "aiohttp_internals.py":
            assert not internals, f"{path.name} imports aiohttp's internals {internals}"
    for path in sorted(root.rglob("*.py")):
        text = path.read_text()
        assert "default_policy(" not in text or path.name in ("policy.py", "pipeline.py"), path
        assert "acl_policy(" not in text or path.name in ("policy.py", "pipeline.py"), path
        private = [
            name
            for name in _imports(path)
            if name.startswith("gateway.")
            and name.rpartition(".")[2].startswith("_")
            and not name.endswith("__")
        ]
        assert not private, (path, private)
