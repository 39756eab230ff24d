"""What a token grants: the intersection of the scopes asked for and what the policy allows, by
the same rules every request is decided by (the default policy or the ACL). Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable

from gateway import acl
from gateway.identity import Labels
from gateway.policy import acl_request
from gateway.policyfile import Policy
from gateway.robots import Robot
from gateway.routes import CATALOG, DELETE, PULL, PUSH, valid_name
from gateway.tokens.scopes import Scope

REPOSITORY_ACTIONS = frozenset({PULL, PUSH, DELETE})


def grant(
    scopes: Iterable[Scope],
    user: str | None,
    policy: Policy | None,
    admin_prefix: str,
    ip: str | None,
    labels: Labels | None = None,
) -> list[Scope]:
    """The granted scopes, in the order asked; a scope with nothing granted is left out."""
    if user is None and policy is not None and not policy.anonymous:
        return []  # a users: section without "": no request without credentials is evaluated
    granted: list[Scope] = []
    for scope in scopes:
        actions = _allowed(scope, user, policy, admin_prefix, ip, labels)
        if actions:
            granted.append(Scope(scope.type, scope.name, actions))
    return granted


def _allowed(
    scope: Scope,
    user: str | None,
    policy: Policy | None,
    admin_prefix: str,
    ip: str | None,
    labels: Labels | None,
) -> frozenset[str]:
    if scope.type == "registry":
        if scope.name != "catalog":
            return frozenset()
        # What a registry checking tokens itself would serve whole. (The gateway's own catalog
        # needs no such grant: it answers any valid token, filtered to what the user may pull.)
        if policy is None:
            return scope.actions & frozenset({CATALOG}) if user is not None else frozenset()
        request = acl_request(
            policy, user, "registry", "catalog", scope.actions & frozenset({CATALOG}), ip, labels
        )
        return acl.evaluate(policy.rules, request).granted
    if not valid_name(scope.name):
        return frozenset()
    wanted = _wanted(scope)
    if policy is None:
        if user is None:
            return frozenset()
        if admin_prefix and user.startswith(admin_prefix):
            return wanted
        return wanted & frozenset({PULL})
    request = acl_request(policy, user, "repository", scope.name, wanted, ip, labels)
    return acl.evaluate(policy.rules, request).granted - {"*"}


def _wanted(scope: Scope) -> frozenset[str]:
    # `*` is asked for as every repository action, so that an entry granting some actions and
    # `*` beside them grants those actions, never a `*` a registry would read as everything.
    return (scope.actions - {"*"}) | (REPOSITORY_ACTIONS if "*" in scope.actions else frozenset())


def unmatched(
    scopes: Iterable[Scope], user: str | None, policy: Policy | None, ip: str | None, labels: Labels | None
) -> list[Scope]:
    """The repository scopes of a known user that no ACL entry matches (with `*` spelled out):
    what an ext_authz program decides."""
    if policy is None or user is None:
        return []
    found = []
    for scope in scopes:
        if scope.type != "repository" or not valid_name(scope.name):
            continue
        request = acl_request(policy, user, "repository", scope.name, _wanted(scope), ip, labels)
        if acl.evaluate(policy.rules, request).entry_index is None:
            found.append(Scope(scope.type, scope.name, _wanted(scope)))
    return found


def within(scopes: Iterable[Scope], robot: Robot | None) -> list[Scope]:
    """What a robot's token may grant of `scopes` (the policy's grant): within its own scopes."""
    if robot is None:
        return list(scopes)
    narrowed = [Scope(s.type, s.name, robot.allowed(s.type, s.name, s.actions)) for s in scopes]
    return [scope for scope in narrowed if scope.actions]
