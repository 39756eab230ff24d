"""Table tests of the ACL matcher against docker_auth's documented semantics, and of policy decisions."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from gateway import acl, policyfile
from gateway.policy import Outcome, acl_policy
from gateway.routes import Operation, parse_request

ALL = frozenset({"pull", "push", "delete"})


def req(
    account: str = "alice",
    name: str = "library/busybox",
    actions: frozenset[str] = frozenset({"pull"}),
    type_: str = "repository",
    ip: str | None = "192.0.2.10",
    labels: dict[str, tuple[str, ...]] | None = None,
) -> acl.Request:
    return acl.Request(account, type_, name, actions, ip, "registry", labels or {})


def entries(*raw: dict[str, Any]) -> tuple[acl.Entry, ...]:
    return policyfile.parse({"acl": list(raw)}).acl


PATTERN_CASES = [
    # pattern, value, matches
    ("*", "busybox", True),
    ("*", "library/busybox", False),  # * does not cross /
    ("library/*", "library/busybox", True),
    ("library/*", "library/a/b", False),
    ("*/*", "library/busybox", True),
    ("lib?ary/x", "library/x", True),
    ("lib?ary/x", "lib/ary/x", False),
    ("[a-c]*", "busybox", True),
    ("[^a-c]*", "busybox", False),
    ("a\\*b", "a*b", True),
    ("a\\*b", "axb", False),
    ("/^dev-/", "dev-x/y", True),  # regex: may cross /
    ("/dev/", "my-dev-team", True),  # regex: unanchored, as Go's regexp.Match
    ("/^dev$/", "my-dev", False),
    ("/^[[a]x/", "[x", True),  # Python warns "possible nested set": still a valid pattern
    ("library", "library", True),
    ("library", "library2", False),
    ("", "", True),
    ("", "alice", False),
]


@pytest.mark.parametrize(("pattern", "value", "expected"), PATTERN_CASES)
def test_patterns(pattern: str, value: str, expected: bool) -> None:
    assert acl.match_pattern(pattern, value, req()) is expected


VARIABLE_CASES = [
    # pattern, request, matches
    ("${account}/*", req(account="alice", name="alice/app"), True),
    ("${account}/*", req(account="alice", name="bob/app"), False),
    ("${account}/*", req(account="a*", name="abc/app"), False),  # values are escaped, not globs
    ("/^${account}\\//", req(account="a.c", name="abc/app"), False),  # escaped in regex too
    ("/^${account}\\//", req(account="a.c", name="a.c/app"), True),
    ("dev-${labels:team}/*", req(name="dev-web/x", labels={"team": ("backend", "web")}), True),
    ("dev-${labels:team}/*", req(name="dev-backend/x", labels={"team": ("backend", "web")}), True),
    ("dev-${labels:team}/*", req(name="dev-ops/x", labels={"team": ("backend", "web")}), False),
    ("dev-${labels:team}/*", req(name="dev-/x", labels={}), False),  # no label: no match
    (
        "${labels:org}/${labels:team}/*",
        req(name="acme/web/x", labels={"org": ("acme",), "team": ("db", "web")}),
        True,
    ),
]


@pytest.mark.parametrize(("pattern", "request_", "expected"), VARIABLE_CASES)
def test_variables(pattern: str, request_: acl.Request, expected: bool) -> None:
    assert acl.match_pattern(pattern, request_.name, request_) is expected


def test_ip_cidr_and_address() -> None:
    table = entries(
        {"match": {"ip": "10.0.0.0/8"}, "actions": ["*"]},
        {"match": {"ip": "192.0.2.10"}, "actions": ["pull"]},
    )
    assert acl.evaluate(table, req(ip="10.1.2.3", actions=ALL)).granted == ALL
    assert acl.evaluate(table, req(ip="192.0.2.10", actions=ALL)).granted == {"pull"}
    assert acl.evaluate(table, req(ip="192.0.2.11", actions=ALL)).granted == frozenset()
    assert acl.evaluate(table, req(ip=None, actions=ALL)).entry_index is None


def test_first_match_wins_and_star_vs_intersection() -> None:
    table = entries(
        {"match": {"account": "alice", "name": "secret/*"}, "actions": []},
        {"match": {"account": "alice"}, "actions": ["pull", "push"], "comment": "alice rw"},
        {"match": {"account": "alice"}, "actions": ["*"]},
        {"match": {"account": "admin"}, "actions": ["*"]},
    )
    verdict = acl.evaluate(table, req(name="secret/x"))
    assert (verdict.granted, verdict.entry_index) == (frozenset(), 0)
    verdict = acl.evaluate(table, req(actions=ALL))
    assert (verdict.granted, verdict.entry_index, verdict.comment) == (
        frozenset({"pull", "push"}),
        1,
        "alice rw",
    )
    assert acl.evaluate(table, req(account="admin", actions=ALL)).granted == ALL
    assert acl.evaluate(table, req(account="admin", actions=frozenset({"*"}))).granted == {"*"}
    assert acl.evaluate(table, req(account="mallory")).entry_index is None


def test_all_fields_must_hold() -> None:
    table = entries({"match": {"account": "alice", "name": "a/*", "type": "repository"}, "actions": ["*"]})
    assert acl.evaluate(table, req(name="a/x")).granted == {"pull"}
    assert acl.evaluate(table, req(name="b/x")).granted == frozenset()
    assert acl.evaluate(table, req(account="bob", name="a/x")).granted == frozenset()
    assert acl.evaluate(table, req(name="a/x", type_="registry")).granted == frozenset()


def test_label_match() -> None:
    table = entries({"match": {"labels": {"team": "back*"}}, "actions": ["push"]})
    assert acl.evaluate(table, req(actions=ALL, labels={"team": ("web", "backend")})).granted == {"push"}
    assert acl.evaluate(table, req(actions=ALL, labels={"team": ("web",)})).granted == frozenset()
    assert acl.evaluate(table, req(actions=ALL)).granted == frozenset()


def test_anonymous_account() -> None:
    table = entries({"match": {"account": "", "name": "public/*"}, "actions": ["pull"]})
    assert acl.evaluate(table, req(account="", name="public/x")).granted == {"pull"}
    assert acl.evaluate(table, req(account="alice", name="public/x")).granted == frozenset()


# --- decisions on parsed requests -------------------------------------------------------------

TEAMS_POLICY = policyfile.parse(
    {
        "acl": [
            {"match": {"account": "/^admin/"}, "actions": ["*"], "comment": "admins"},
            {"match": {"account": "/.+/", "name": "dev-${labels:team}/*"}, "actions": ["pull", "push"]},
            {"match": {"account": "/.+/", "name": "library/*"}, "actions": ["pull"]},
            {"match": {"account": "", "name": "public/*"}, "actions": ["pull"]},
        ],
        "accounts": {"alice": {"labels": {"team": ["x"]}}, "bob": {"labels": {"team": ["y"]}}},
    }
)


def op(method: str, target: str) -> Operation:
    parsed = parse_request(method, target)
    assert isinstance(parsed, Operation)
    return parsed


DECISIONS = [
    # user, method, target, outcome, rule
    ("admin", "DELETE", "/v2/any/thing/manifests/x", Outcome.ALLOW, 0),
    ("alice", "PUT", "/v2/dev-x/app/manifests/1", Outcome.ALLOW, 1),
    ("alice", "PUT", "/v2/dev-y/app/manifests/1", Outcome.DENY, None),
    ("alice", "DELETE", "/v2/dev-x/app/manifests/1", Outcome.DENY, 1),
    ("bob", "GET", "/v2/dev-y/app/manifests/1", Outcome.ALLOW, 1),
    ("bob", "GET", "/v2/library/busybox/tags/list", Outcome.ALLOW, 2),
    ("bob", "POST", "/v2/library/busybox/blobs/uploads/", Outcome.DENY, 2),
    (None, "GET", "/v2/public/x/manifests/1", Outcome.ALLOW, 3),
    (None, "GET", "/v2/library/busybox/manifests/1", Outcome.CHALLENGE, None),
    (None, "GET", "/v2/", Outcome.CHALLENGE, None),
    ("bob", "GET", "/v2/", Outcome.ALLOW, None),
]


@pytest.mark.parametrize(("user", "method", "target", "outcome", "rule"), DECISIONS)
def test_decisions(user: str | None, method: str, target: str, outcome: Outcome, rule: int | None) -> None:
    decision = acl_policy(TEAMS_POLICY, user, op(method, target), "192.0.2.1")
    assert (decision.outcome, decision.rule) == (outcome, rule)


def test_manifest_put_needs_pull_too() -> None:
    policy = policyfile.parse({"acl": [{"match": {"account": "ci"}, "actions": ["push"]}]})
    assert acl_policy(policy, "ci", op("PUT", "/v2/a/manifests/1"), None).outcome is Outcome.DENY


def test_catalog_full_or_filtered() -> None:
    catalog = op("GET", "/v2/_catalog")
    assert not acl_policy(TEAMS_POLICY, "admin", catalog, None).filter_catalog
    decision = acl_policy(TEAMS_POLICY, "alice", catalog, None)
    assert decision.allowed and decision.filter_catalog


def test_mount_from_unpullable_repository_is_dropped() -> None:
    digest = "sha256:" + "d" * 64
    allowed = acl_policy(
        TEAMS_POLICY, "alice", op("POST", f"/v2/dev-x/a/blobs/uploads/?mount={digest}&from=library/b"), None
    )
    assert allowed.allowed and not allowed.drop_mount
    refused = acl_policy(
        TEAMS_POLICY,
        "alice",
        op("POST", f"/v2/dev-x/a/blobs/uploads/?mount={digest}&from=dev-y/secret"),
        None,
    )
    assert refused.allowed and refused.drop_mount


def test_users_section_without_anonymous_entry_refuses_anonymous() -> None:
    policy = policyfile.parse(
        {
            "users": {"ci": {"password": "$2y$05$" + "a" * 53}},
            "acl": [{"match": {"account": ""}, "actions": ["pull"]}],
        }
    )
    assert not policy.anonymous
    assert acl_policy(policy, None, op("GET", "/v2/a/manifests/1"), None).outcome is Outcome.CHALLENGE
    with_anonymous = policyfile.parse(
        {"users": {"": {}}, "acl": [{"match": {"account": ""}, "actions": ["pull"]}]}
    )
    assert acl_policy(with_anonymous, None, op("GET", "/v2/a/manifests/1"), None).allowed


# --- the policy file --------------------------------------------------------------------------


def test_policy_file_problems_named_by_key_path() -> None:
    with pytest.raises(policyfile.PolicyError) as info:
        policyfile.parse(
            {
                "acl": [
                    {"match": {"account": "alice"}, "actions": ["pull"]},
                    {"match": {"name": "/[unclosed/"}, "actions": ["pull"]},
                    {"match": {"nmae": "x"}, "actions": ["pul"]},
                    {"actions": ["pull"]},
                    {"match": {"ip": "300.1.1.1"}, "actions": ["*"], "extra": 1},
                ],
                "users": {"bob": {"password": "plaintext"}},
                "accounts": {"carol": {"expires": "next tuesday"}},
                "unknown": True,
            }
        )
    problems = "\n".join(info.value.problems)
    for expected in (
        "acl[1].match.name: invalid regex '/[unclosed/'",
        "acl[2].match.nmae: unknown key",
        "acl[2].actions: unknown action 'pul'",
        "acl[3].match: required",
        "acl[4].match.ip: '300.1.1.1' is not an IP address or CIDR",
        "acl[4].extra: unknown key",
        "users.bob.password: expected a password hash",
        "accounts.carol.expires: expected a date",
        "policy.unknown: unknown key",
    ):
        assert expected in problems, expected


def test_shadowed_rules_warned() -> None:
    policy = policyfile.parse(
        {
            "acl": [
                {"match": {"account": "alice"}, "actions": ["pull"]},
                {"match": {"account": "alice", "name": "x/*"}, "actions": ["*"]},
                {"match": {"ip": "10.0.0.0/8"}, "actions": ["pull"]},
                {"match": {"ip": "10.1.0.0/16", "account": "bob"}, "actions": ["*"]},
                {"match": {"account": "carol"}, "actions": ["*"]},
            ]
        }
    )
    assert policy.warnings == (
        "acl[1]: can never match: acl[0] matches every request it would",
        "acl[3]: can never match: acl[2] matches every request it would",
    )


def test_groups_expiry_and_labels() -> None:
    policy = policyfile.parse(
        {
            "acl": [{"match": {"labels": {"group": "developers"}}, "actions": ["pull"]}],
            "accounts": {
                "alice": {"labels": {"team": "web"}, "groups": ["ops"], "expires": dt.date(2030, 1, 2)}
            },
            "groups": {"developers": ["alice", "bob"]},
        }
    )
    alice = policy.account("alice")
    assert alice.labels == {"team": ("web",), "group": ("ops", "developers")}
    assert alice.expires == dt.datetime(2030, 1, 2, tzinfo=dt.UTC)
    assert not alice.expired(dt.datetime(2030, 1, 1, 23, 59, tzinfo=dt.UTC))
    assert alice.expired(dt.datetime(2030, 1, 2, tzinfo=dt.UTC))
    assert policy.account("bob").labels == {"group": ("developers",)}
    assert policy.account("nobody").labels == {}


def test_account_index_keeps_first_match_order() -> None:
    raw = [
        {"match": {"account": "alice", "name": "a/*"}, "actions": ["pull"]},
        {"match": {"account": "/^al/"}, "actions": ["push"]},
        {"match": {"account": "alice"}, "actions": ["delete"]},
        {"match": {"account": "bob"}, "actions": ["*"]},
        {"match": {"account": "al*"}, "actions": ["pull", "push"]},
        {"match": {"name": "shared/*"}, "actions": ["pull"]},
        {"match": {"account": ""}, "actions": ["pull"]},
        {"match": {"account": "a\\*"}, "actions": ["*"]},
    ]
    policy = policyfile.parse({"acl": raw})
    assert policy.rules.by_account == {"alice": (0, 2), "bob": (3,), "": (6,)}
    for account in ("alice", "bob", "alfred", "", "a*", "carol"):
        for name in ("a/x", "shared/y", "other/z"):
            request = req(account=account, name=name, actions=ALL)
            assert acl.evaluate(policy.rules, request) == acl.evaluate(policy.acl, request), (account, name)


@pytest.mark.parametrize(
    ("earlier", "later", "shadowed"),
    [
        ({"account": "alice"}, {"account": "alice", "name": "x/*"}, True),  # the same, and more
        ({"account": "/.+/"}, {"account": "alice"}, True),  # broader regex, literal later
        ({"account": "/.*/"}, {"account": "/^b/"}, True),  # match-all covers any pattern
        ({"account": "/.*/"}, {}, True),
        ({"account": "/.+/"}, {"account": ""}, False),  # anonymous is not matched by .+
        ({"account": "/.+/"}, {"account": "/^b/"}, False),  # pattern later: left in doubt
        ({"name": "alice/*"}, {"name": "alice/app"}, True),
        ({"name": "alice/*"}, {"name": "alice/team/app"}, False),  # * does not cross /
        ({"name": "*"}, {"name": "app"}, True),
        ({"name": "${account}/*"}, {"name": "alice/app"}, False),  # depends on the request
        ({"labels": {"team": "/.*/"}}, {"labels": {"team": "ops"}}, True),
        ({"labels": {"team": "ops"}}, {"labels": {"team": "web"}}, False),
        ({"labels": {"team": "ops"}}, {"account": "bob"}, False),  # later has no such label
        ({"ip": "10.0.0.0/8", "account": "/.*/"}, {"ip": "10.1.0.0/16", "account": "bob"}, True),
        ({"ip": "10.1.0.0/16"}, {"ip": "10.0.0.0/8"}, False),
        ({"account": "alice", "name": "x/*"}, {"account": "alice"}, False),  # narrower earlier
    ],
)
def test_shadowing_as_a_table(earlier: dict[str, object], later: dict[str, object], shadowed: bool) -> None:
    policy = policyfile.parse(
        {"acl": [{"match": earlier, "actions": ["pull"]}, {"match": later, "actions": ["push"]}]}
    )
    warned = "acl[1]: can never match: acl[0] matches every request it would" in policy.warnings
    assert warned is shadowed, policy.warnings
