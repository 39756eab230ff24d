"""Whether an identified (or anonymous) user may perform an operation. Pure: no I/O.

The default policy is the seed nginx recipe's: users whose name starts with the admin prefix may
do anything, other users may only read (GET/HEAD), anonymous users nothing.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from gateway import acl
from gateway.identity import Labels
from gateway.policyfile import Policy
from gateway.robots import Robot
from gateway.routes import CATALOG, PULL, Operation, Route

READ_METHODS = frozenset({"GET", "HEAD"})


class Outcome(enum.Enum):
    ALLOW = "allow"
    CHALLENGE = "challenge"  # 401: credentials needed or wrong
    DENY = "deny"  # 403: known user, not allowed


@dataclass(slots=True)  # made per request: not frozen (docs/performance.md, "Records made per request")
class Decision:
    """The outcome, and what the request path needs to act on it."""

    outcome: Outcome
    reason: str
    rule: int | None = None  # the ACL entry that decided
    comment: str | None = None
    filter_catalog: bool = False  # answer the catalog with only what the user may pull
    drop_mount: bool = False  # forward a cross-repository mount as an ordinary upload

    @property
    def allowed(self) -> bool:
        return self.outcome is Outcome.ALLOW


def default_policy(user: str | None, operation: Operation, admin_prefix: str) -> Decision:
    if user is None:
        return Decision(Outcome.CHALLENGE, "authentication required")
    if operation.route is Route.BASE:
        return Decision(Outcome.ALLOW, "any authenticated user may check its login")
    if admin_prefix and user.startswith(admin_prefix):
        return Decision(Outcome.ALLOW, f"user name starts with {admin_prefix!r}")
    if operation.method in READ_METHODS:
        return Decision(Outcome.ALLOW, "read access for authenticated users")
    return Decision(Outcome.DENY, "read-only user")


def acl_request(
    policy: Policy,
    user: str | None,
    type_: str,
    name: str,
    actions: frozenset[str],
    ip: str | None,
    labels: Labels | None = None,
) -> acl.Request:
    """`labels`: the login's (an identity source's with the policy account's); None: the account's."""
    account = policy.account(user) if user is not None else None
    return acl.Request(
        account=user or "",
        type=type_,
        name=name,
        actions=actions,
        ip=ip,
        service=policy.service,
        labels=labels if labels is not None else (account.labels if account is not None else {}),
    )


def may_pull(
    policy: Policy, user: str | None, repository: str, ip: str | None, labels: Labels | None = None
) -> bool:
    request = acl_request(policy, user, "repository", repository, frozenset({PULL}), ip, labels)
    return acl.evaluate(policy.rules, request).allows({PULL})


def acl_policy(
    policy: Policy, user: str | None, operation: Operation, ip: str | None, labels: Labels | None = None
) -> Decision:
    """Decide under the policy file's ACL. `user` is None for requests without credentials."""
    if user is None and not policy.anonymous:
        return Decision(Outcome.CHALLENGE, "authentication required")
    if operation.route is Route.BASE:
        if user is None:
            # Anonymous clients are challenged so that those with credentials send them.
            return Decision(Outcome.CHALLENGE, "authentication required")
        return Decision(Outcome.ALLOW, "any authenticated user may check its login")

    if operation.route is Route.CATALOG:
        request = acl_request(policy, user, "registry", "catalog", operation.actions, ip, labels)
        verdict = acl.evaluate(policy.rules, request)
        if verdict.allows(operation.actions):
            return Decision(Outcome.ALLOW, "catalog granted", verdict.entry_index, verdict.comment)
        return Decision(Outcome.ALLOW, "catalog filtered to pullable repositories", filter_catalog=True)

    if operation.repository is None:  # every other route names one; refuse if that ever changes
        return Decision(Outcome.DENY, "no repository in the request")
    request = acl_request(policy, user, "repository", operation.repository, operation.actions, ip, labels)
    verdict = acl.evaluate(policy.rules, request)
    if not verdict.allows(operation.actions):
        reason = "no rule matched" if verdict.entry_index is None else "rule grants too little"
        outcome = Outcome.CHALLENGE if user is None else Outcome.DENY
        return Decision(outcome, reason, verdict.entry_index, verdict.comment)
    drop_mount = operation.mount_from is not None and not may_pull(
        policy, user, operation.mount_from, ip, labels
    )
    return Decision(Outcome.ALLOW, "granted", verdict.entry_index, verdict.comment, drop_mount=drop_mount)


def within_scopes(decision: Decision, robot: Robot, operation: Operation) -> Decision:
    """A robot's decision: the policy's (for the account robot+NAME), narrowed to the robot's
    scopes. A denial keeps the rule that had granted, so that no ext_authz program is asked to
    grant what the scopes refuse."""
    if not decision.allowed or operation.route is Route.BASE:
        return decision
    if operation.route is Route.CATALOG:
        if decision.filter_catalog or not robot.allowed("registry", "catalog", frozenset({CATALOG})):
            return Decision(Outcome.ALLOW, "catalog filtered to what the robot may pull", filter_catalog=True)
        return decision
    if operation.repository is None or robot.allowed(
        "repository", operation.repository, operation.actions
    ) != (operation.actions):
        return Decision(Outcome.DENY, f"outside robot {robot.name}'s scopes", decision.rule, decision.comment)
    if operation.mount_from is not None and not robot.allowed(
        "repository", operation.mount_from, frozenset({PULL})
    ):
        decision.drop_mount = True
    return decision
