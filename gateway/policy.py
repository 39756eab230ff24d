"""Whether an identified (or anonymous) user may perform an operation. Pure: no I/O.

The default policy is the seed nginx recipe's: users whose name starts with the admin prefix may
do anything, other users may only read (GET/HEAD), anonymous users nothing.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from gateway.routes import Operation, Route

READ_METHODS = frozenset({"GET", "HEAD"})


class Outcome(enum.Enum):
    ALLOW = "allow"
    CHALLENGE = "challenge"  # 401: credentials needed or wrong
    DENY = "deny"  # 403: known user, not allowed


@dataclass(frozen=True)
class Decision:
    outcome: Outcome
    reason: str

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
