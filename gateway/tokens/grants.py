"""What a token grants: the intersection of the scopes asked for and what the policy allows, by
the same rules every request is decided by (the default policy or the ACL). Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable

from gateway import acl
from gateway.policy import acl_request
from gateway.policyfile import Policy
from gateway.routes import CATALOG, PULL, valid_name
from gateway.tokens.scopes import Scope


def grant(
    scopes: Iterable[Scope], user: str | None, policy: Policy | None, admin_prefix: str, ip: str | None
) -> list[Scope]:
    """The granted scopes, in the order asked; a scope with nothing granted is left out."""
    granted: list[Scope] = []
    for scope in scopes:
        actions = _allowed(scope, user, policy, admin_prefix, ip)
        if actions:
            granted.append(Scope(scope.type, scope.name, actions))
    return granted


def _allowed(
    scope: Scope, user: str | None, policy: Policy | None, admin_prefix: str, ip: str | None
) -> frozenset[str]:
    if scope.type == "registry":
        if scope.name != "catalog":
            return frozenset()
        # The catalog is always answered, filtered to what the user may pull; a token for it
        # needs only a known user (or anonymous access in the policy).
        if user is None and (policy is None or not policy.anonymous):
            return frozenset()
        return scope.actions & frozenset({CATALOG})
    if not valid_name(scope.name):
        return frozenset()
    if policy is None:
        if user is None:
            return frozenset()
        if admin_prefix and user.startswith(admin_prefix):
            return scope.actions
        return scope.actions & frozenset({PULL})
    request = acl_request(policy, user, "repository", scope.name, scope.actions, ip)
    return acl.evaluate(policy.rules, request).granted
