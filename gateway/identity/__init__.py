"""Identity sources: who a user is, and the labels the ACL sees, from a name and a password.

The contract every source keeps (docker_auth's `api.Authenticator`, with Caddy's three outcomes):
`verify(user, password)` answers exactly one of

- `Verified(user, labels, source)`: the password is right; `labels` join the ACL's `${labels:...}`;
- `Rejected()`: this source knows the user and the password is wrong (or the name is ambiguous);
- `Unknown()`: this source has no such user: the next source is asked, and when none knows the
  name the login is rejected exactly as for a wrong password;
- `Unavailable(reason)`: the source could not decide (directory down, timeout). The login fails
  closed: refused now, with a log line and a metric; nothing else is asked.

Sources are asked in a documented order (the htpasswd file and the policy's static users first,
then LDAP, then an external program) and each user name is resolved by exactly one source, the
first that knows it: a name in the htpasswd file is never looked up in the directory. The chain's
last step is not a source but the same bcrypt check against a dummy hash, so that a name no
source knows costs what a wrong password costs (authn.Authenticator).

Besides `verify`, a source declares what it can do:

- `lasting`: whether a user it verified stays a user until the files change (the htpasswd file,
  static users). A source that is not lasting (a directory, a program) only vouches for a login
  it verified recently: a token of such a user is honoured while that login is cached
  (`cache_ttl`), with the labels it gave;
- `last_problem`: why its last verification could not decide, for /readyz and metrics;
- `probe()`, optionally (`Probing`): whether it can answer now, for /readyz.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

Labels = Mapping[str, tuple[str, ...]]


@dataclass(frozen=True)
class Verified:
    user: str
    labels: Labels = field(default_factory=dict)
    source: str = "htpasswd"


@dataclass(frozen=True)
class Rejected:
    pass


@dataclass(frozen=True)
class Unknown:
    pass


@dataclass(frozen=True)
class Unavailable:
    reason: str


Verdict = Verified | Rejected | Unknown | Unavailable


class IdentitySource(Protocol):
    name: str  # what Verified.source says, the audit log and `policy explain` show
    lasting: bool  # see the module's docstring

    async def verify(self, user: str, password: str) -> Verdict: ...

    last_problem: str | None  # why the last verification could not decide; None when it could


@runtime_checkable
class Probing(IdentitySource, Protocol):
    async def probe(self) -> str | None:
        """None when the source can answer now, else what is wrong (for /readyz)."""
        ...


def merge_labels(*sets: Labels) -> Labels:
    """Labels of several origins together (the policy's accounts and groups, a directory's)."""
    merged: dict[str, tuple[str, ...]] = {}
    for labels in sets:
        for key, values in labels.items():
            merged[key] = tuple(dict.fromkeys(merged.get(key, ()) + tuple(values)))
    return merged
