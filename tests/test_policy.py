"""The default policy as a table: admin prefix read-write, others read-only, anonymous nothing."""

from __future__ import annotations

import pytest

from gateway.policy import Outcome, default_policy
from gateway.routes import Operation, parse_request

DIGEST = "sha256:" + "b" * 64


def op(method: str, target: str) -> Operation:
    parsed = parse_request(method, target)
    assert isinstance(parsed, Operation)
    return parsed


CASES = [
    # user, method, target, outcome
    (None, "GET", "/v2/", Outcome.CHALLENGE),
    (None, "GET", "/v2/a/manifests/x", Outcome.CHALLENGE),
    (None, "HEAD", f"/v2/a/blobs/{DIGEST}", Outcome.CHALLENGE),
    (None, "GET", "/v2/_catalog", Outcome.CHALLENGE),
    ("alice", "GET", "/v2/", Outcome.ALLOW),
    ("alice", "GET", "/v2/a/manifests/x", Outcome.ALLOW),
    ("alice", "HEAD", "/v2/a/manifests/x", Outcome.ALLOW),
    ("alice", "GET", "/v2/_catalog", Outcome.ALLOW),
    ("alice", "GET", "/v2/a/tags/list", Outcome.ALLOW),
    ("alice", "PUT", "/v2/a/manifests/x", Outcome.DENY),
    ("alice", "POST", "/v2/a/blobs/uploads/", Outcome.DENY),
    ("alice", "PATCH", "/v2/a/blobs/uploads/u1", Outcome.DENY),
    ("alice", "DELETE", f"/v2/a/manifests/{DIGEST}", Outcome.DENY),
    ("alice", "DELETE", f"/v2/a/blobs/{DIGEST}", Outcome.DENY),
    ("myadmin", "PUT", "/v2/a/manifests/x", Outcome.DENY),  # prefix, not substring
    ("Admin", "PUT", "/v2/a/manifests/x", Outcome.DENY),  # case matters, as in nginx's regex
    ("admin", "PUT", "/v2/a/manifests/x", Outcome.ALLOW),
    ("admin-ci", "POST", "/v2/a/blobs/uploads/", Outcome.ALLOW),
    ("administrator", "DELETE", f"/v2/a/blobs/{DIGEST}", Outcome.ALLOW),
]


@pytest.mark.parametrize(("user", "method", "target", "outcome"), CASES)
def test_default_policy(user: str | None, method: str, target: str, outcome: Outcome) -> None:
    assert default_policy(user, op(method, target), "admin").outcome is outcome


def test_custom_and_empty_prefix() -> None:
    put = op("PUT", "/v2/a/manifests/x")
    assert default_policy("ops-bob", put, "ops-").allowed
    assert not default_policy("admin", put, "ops-").allowed
    # An empty prefix makes nobody an admin (it does not make everybody one).
    assert not default_policy("admin", put, "").allowed
