"""Token decisions as tables, no I/O: scopes as clients send them, grants under both policies,
what an operation needs, what a token covers, and which tokens a revocation voids."""

from __future__ import annotations

import pytest

from gateway import policyfile
from gateway.routes import Operation, parse_request
from gateway.tokens import revocations
from gateway.tokens.grants import grant
from gateway.tokens.scopes import Scope, covers, merge, needed, parse_scopes

DIGEST = "sha256:" + "a" * 64


def scope(text: str) -> Scope:
    parsed = parse_scopes([text])
    assert len(parsed) == 1, text
    return parsed[0]


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (["repository:alice/app:pull,push"], ["repository:alice/app:pull,push"]),
        (["repository:a:pull repository:b:push"], ["repository:a:pull", "repository:b:push"]),  # moby
        (["repository:a:pull", "repository:b:push"], ["repository:a:pull", "repository:b:push"]),  # skopeo
        (["repository(plugin):a:pull"], ["repository:a:pull"]),
        (["registry:catalog:*"], ["registry:catalog:*"]),
        (["repository:host:5000/a:pull"], ["repository:host:5000/a:pull"]),  # actions after the last colon
        (["repository:a:"], []),
        (["repository::pull"], []),
        (["bogus"], []),
        (["other:a:pull"], []),
        ([""], []),
    ],
)
def test_parse_scopes(values: list[str], expected: list[str]) -> None:
    assert [str(s) for s in parse_scopes(values)] == expected


def test_merge_unites_actions_per_repository() -> None:
    merged = merge(parse_scopes(["repository:a:pull", "repository:a:push repository:b:pull"]))
    assert [str(s) for s in merged] == ["repository:a:pull,push", "repository:b:pull"]


def test_scope_count_is_bounded() -> None:
    assert [str(s) for s in parse_scopes(["repository:a:pull " * 1000])] == ["repository:a:pull"]
    # Names are counted, not repeats: a repeated scope never pushes a later name out.
    asked = ["repository:a:pull"] * 17 + ["repository:b:push"]
    assert [str(s) for s in parse_scopes(asked)] == ["repository:a:pull", "repository:b:push"]
    many = [f"repository:r{i}:pull repository:r{i}:push" for i in range(40)]
    assert [s.name for s in parse_scopes(many)] == [f"r{i}" for i in range(16)]


POLICY = policyfile.parse(
    {
        "acl": [
            {"match": {"account": "admin"}, "actions": ["*"]},
            {"match": {"account": "alice", "name": "alice/*"}, "actions": ["pull", "push"]},
            {"match": {"account": "alice", "type": "registry", "name": "catalog"}, "actions": ["*"]},
            {"match": {"account": "", "name": "public/*"}, "actions": ["pull"]},
            {"match": {"account": "bob", "name": "team/*"}, "actions": ["pull", "*"]},
        ]
    },
    "test",
)

GRANTS = [
    # user, asked, policy?, granted
    ("alice", "repository:alice/app:pull,push", True, ["repository:alice/app:pull,push"]),
    ("alice", "repository:bob/app:pull,push", True, []),
    ("alice", "repository:alice/app:pull,push,delete", True, ["repository:alice/app:pull,push"]),
    ("admin", "repository:bob/app:pull,push,delete", True, ["repository:bob/app:delete,pull,push"]),
    (None, "repository:public/app:pull,push", True, ["repository:public/app:pull"]),
    (None, "repository:alice/app:pull", True, []),
    ("alice", "registry:catalog:*", True, ["registry:catalog:*"]),
    # No catalog rule for them: a registry checking tokens itself would serve the whole catalog.
    # (The gateway's own catalog answers any valid token, filtered to what they may pull.)
    (None, "registry:catalog:*", True, []),
    ("bob", "registry:catalog:*", True, []),
    # `*` is asked as every action: an entry of some actions and `*` grants those, never `*`.
    ("bob", "repository:team/app:*", True, ["repository:team/app:pull"]),
    ("admin", "repository:team/app:*", True, ["repository:team/app:delete,pull,push"]),
    ("alice", "repository:Alice/App:pull", True, []),  # not a valid name: nothing
    # The default policy: names starting with admin may do anything, others pull, anonymous nothing.
    ("admin2", "repository:x/y:pull,push,delete", False, ["repository:x/y:delete,pull,push"]),
    ("alice", "repository:x/y:pull,push", False, ["repository:x/y:pull"]),
    (None, "repository:x/y:pull", False, []),
    (None, "registry:catalog:*", False, []),
    ("alice", "registry:catalog:*", False, ["registry:catalog:*"]),
]


# A users: section without "": requests without credentials are not evaluated, so an entry with
# no account grants them nothing (as acl_policy challenges them).
CLOSED = policyfile.parse(
    {
        "acl": [
            {"match": {"name": "public/*"}, "actions": ["pull"]},
            {"match": {"type": "registry", "name": "catalog"}, "actions": ["*"]},
        ],
        "users": {"ci": {"password": "$2y$05$" + "a" * 53}},
    },
    "test",
)


@pytest.mark.parametrize(
    ("user", "asked", "granted"),
    [
        (None, "repository:public/app:pull", []),
        (None, "registry:catalog:*", []),
        ("alice", "repository:public/app:pull", ["repository:public/app:pull"]),
        ("alice", "registry:catalog:*", ["registry:catalog:*"]),
    ],
)
def test_grants_without_anonymous_access(user: str | None, asked: str, granted: list[str]) -> None:
    assert not CLOSED.anonymous
    result = grant([scope(asked)], user, CLOSED, "admin", "127.0.0.1")
    assert [str(s) for s in result] == granted


@pytest.mark.parametrize(("user", "asked", "with_policy", "granted"), GRANTS)
def test_grants(user: str | None, asked: str, with_policy: bool, granted: list[str]) -> None:
    result = grant([scope(asked)], user, POLICY if with_policy else None, "admin", "127.0.0.1")
    assert [str(s) for s in result] == granted


def operation(method: str, target: str) -> Operation:
    parsed = parse_request(method, target)
    assert isinstance(parsed, Operation)
    return parsed


@pytest.mark.parametrize(
    ("method", "target", "scopes"),
    [
        ("GET", "/v2/", []),
        ("GET", "/v2/_catalog", ["registry:catalog:*"]),
        ("HEAD", "/v2/a/b/manifests/1", ["repository:a/b:pull"]),
        ("PUT", "/v2/a/b/manifests/1", ["repository:a/b:pull,push"]),
        ("DELETE", f"/v2/a/b/manifests/{DIGEST}", ["repository:a/b:delete"]),
        (
            "POST",
            f"/v2/a/b/blobs/uploads/?mount={DIGEST}&from=c%2Fd",
            ["repository:a/b:pull,push", "repository:c/d:pull"],
        ),
    ],
)
def test_needed(method: str, target: str, scopes: list[str]) -> None:
    assert [str(s) for s in needed(operation(method, target))] == scopes


def test_covers() -> None:
    token = [scope("repository:a/b:pull"), scope("repository:a/b:push"), scope("repository:x:*")]
    assert covers(token, scope("repository:a/b:pull,push"))
    assert not covers(token, scope("repository:a/c:pull"))  # a token for a/b is not one for a/c
    assert not covers(token, scope("repository:a/b:delete"))
    assert covers(token, scope("repository:x:delete"))
    assert not covers(token, scope("registry:a/b:pull"))  # the type must match too


UNMATCHED_POLICY = policyfile.parse(
    {
        "acl": [
            {"match": {"account": "admin"}, "actions": ["*"]},
            {"match": {"account": "reader", "name": "public/*"}, "actions": ["pull"]},
            {"match": {"account": "reader", "name": "closed/*"}, "actions": []},
        ]
    }
)


@pytest.mark.parametrize(
    ("user", "asked", "left"),
    [
        ("reader", "repository:public/a:pull,push", []),  # an entry matched (granting less): it decides
        ("reader", "repository:closed/a:pull", []),  # an entry matched and denies
        ("reader", "repository:other/a:pull,push", ["repository:other/a:pull,push"]),
        ("reader", "repository:other/a:*", ["repository:other/a:delete,pull,push"]),
        ("reader", "registry:catalog:*", []),  # only repositories go to the program
        ("reader", "repository:Bad Name:pull", []),
        (None, "repository:other/a:pull", []),  # anonymous: the ACL alone
        ("admin", "repository:other/a:push", []),
    ],
)
def test_scopes_no_entry_matches_go_to_the_program(user: str | None, asked: str, left: list[str]) -> None:
    from gateway.tokens.grants import unmatched

    scopes = parse_scopes([asked])
    assert [str(scope) for scope in unmatched(scopes, user, UNMATCHED_POLICY, "10.0.0.1", None)] == left


@pytest.mark.parametrize(
    ("revoked_at", "issued_at", "refused"),
    [
        (100.5, 99.9, True),  # before
        (100.5, 100.2, True),  # before, in the revocation's second
        (100.5, 100.7, True),  # after, but in that second: `token revoke` has not returned yet
        (100.5, 101.0, False),  # once `token revoke` has returned
        (100.5, 250.0, False),
        (100.0, 100.0, True),  # at the same moment: refused
        (100.0, 100.999, True),
        (100.999, 101.0, False),
        (100.999, 100.998, True),
    ],
)
def test_a_revocation_voids_tokens_issued_before_it_returned(
    revoked_at: float, issued_at: float, refused: bool
) -> None:
    iat = int(issued_at)  # as tokens carry it (jwt_tokens.issue)
    assert revocations.is_revoked({"alice": revoked_at}, "alice", iat) is refused
    assert not revocations.is_revoked({"alice": revoked_at}, "bob", iat)
    assert not revocations.is_revoked({}, "alice", iat)
    # What `token revoke` waits for: every token issued from then on is accepted.
    assert revocations.is_revoked({"alice": revoked_at}, "alice", iat) is (
        issued_at < revocations.first_accepted_second(revoked_at)
    )
