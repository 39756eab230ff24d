"""The policy file: ACL, static users, labels, groups and expiry dates, parsed into frozen dataclasses.

```yaml
acl:                       # docker_auth's format; first match wins; no match denies
  - match: {account: "/^admin/"}
    actions: ["*"]
    comment: admins
users:                     # optional, docker_auth's static users (beside the htpasswd file)
  "ci-bot": {password: "$2y$10$...", labels: {team: [ci]}}
  "": {}                   # allow anonymous requests (evaluated as account "")
accounts:                  # labels, groups and expiry for users of either source
  alice: {labels: {team: [backend, web]}, groups: [developers], expires: 2027-01-31}
groups:                    # or membership listed by group
  developers: [alice, bob]
service: registry          # the value of ${service} and match.service
```

Groups become values of the label `group`. Every problem is reported at once with its key path
(`acl[3].match.name: invalid regex ...`); unknown keys are errors.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from gateway import acl, htpasswd, immutable, yaml_files
from gateway.acl import Rules
from gateway.addresses import parse_network
from gateway.files import describe_read_error
from gateway.identity import external as external_identity
from gateway.identity import ldap as ldap_identity
from gateway.identity.external import ExternalSettings
from gateway.identity.ldap import LdapSettings
from gateway.immutable import ImmutableRule

ACTIONS = frozenset({"pull", "push", "delete", "*"})
MATCH_KEYS = ("account", "type", "name", "service", "ip", "labels")
GROUP_LABEL = "group"


@dataclass(frozen=True)
class Account:
    labels: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    expires: dt.datetime | None = None

    def expired(self, now: dt.datetime) -> bool:
        return self.expires is not None and now >= self.expires


@dataclass(frozen=True)
class DockerAuthSections:
    """docker_auth's `server:` and `token:` sections, as found (applied by gateway.docker_auth)."""

    addr: str | None = None
    server_certificate: str | None = None
    server_key: str | None = None
    issuer: str | None = None
    expiration: int | None = None
    token_certificate: str | None = None
    token_key: str | None = None


# docker_auth's other sections: identity and authorization sources this gateway does not have.
DOCKER_AUTH_UNSUPPORTED = (
    "mongo_auth",
    "xorm_auth",
    "google_auth",
    "github_auth",
    "oidc_auth",
    "gitlab_auth",
    "plugin_authn",
    "plugin_authz",
    "acl_mongo",
    "acl_xorm",
    "casbin_authz",
)


@dataclass(frozen=True)
class Policy:
    acl: tuple[acl.Entry, ...]
    rules: Rules
    users: Mapping[str, htpasswd.StoredHash]
    accounts: Mapping[str, Account]
    anonymous: bool  # may requests without credentials be evaluated (as account "")?
    service: str = "registry"
    warnings: tuple[str, ...] = ()
    docker_auth: DockerAuthSections | None = None  # a docker_auth auth_config.yml's server/token
    service_explicit: bool = False  # the file has its own `service:` key
    ldap: LdapSettings | None = None  # docker_auth's ldap_auth section: logins against a directory
    external: ExternalSettings | None = None  # docker_auth's ext_auth section: a login program
    ext_authz: ExternalSettings | None = None  # docker_auth's ext_authz: a program for what no entry matches
    immutable: tuple[ImmutableRule, ...] = ()  # tags that cannot change once pushed (gateway.immutable)

    def account(self, name: str) -> Account:
        return self.accounts.get(name, NO_ACCOUNT)

    @property
    def read_files(self) -> tuple[Path, ...]:
        """Files the policy was read from besides itself: followed as it is (a change reloads)."""
        if self.ldap is not None and self.ldap.bind_password_file is not None:
            return (Path(self.ldap.bind_password_file),)
        return ()


NO_ACCOUNT = Account()


class PolicyError(ValueError):
    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


class _Collector:
    def __init__(self) -> None:
        self.problems: list[str] = []
        self.warnings: list[str] = []

    def bad(self, path: str, message: str) -> None:
        self.problems.append(f"{path}: {message}")

    def mapping(self, value: Any, path: str, allowed: tuple[str, ...] | None) -> dict[str, Any] | None:
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.bad(path, "expected a mapping")
            return None
        if allowed is not None:
            for key in value:
                if key not in allowed:
                    hint = yaml_files.did_you_mean(str(key), allowed)
                    self.bad(f"{path}.{key}", f"unknown key{hint} (expected one of: {', '.join(allowed)})")
        return {str(k): v for k, v in value.items()}

    def string_list(self, value: Any, path: str) -> tuple[str, ...] | None:
        if isinstance(value, str):
            return (value,)
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return tuple(value)
        self.bad(path, "expected a string or a list of strings")
        return None


def _pattern(c: _Collector, value: Any, path: str) -> str | None:
    if not isinstance(value, str):
        c.bad(path, "expected a string pattern")
        return None
    problem = acl.validate_pattern(value)
    if problem:
        c.bad(path, problem)
        return None
    return value


def _match(c: _Collector, value: Any, path: str) -> acl.Match | None:
    raw = c.mapping(value, path, MATCH_KEYS)
    if raw is None:
        return None
    fields: dict[str, Any] = {}
    for key in ("account", "type", "name", "service"):
        if key in raw:
            fields[key] = _pattern(c, raw[key], f"{path}.{key}")
    if "ip" in raw:
        try:
            fields["ip"] = parse_network(str(raw["ip"]))
        except ValueError:
            c.bad(f"{path}.ip", f"{raw['ip']!r} is not an IP address or CIDR")
    if "labels" in raw:
        labels = c.mapping(raw["labels"], f"{path}.labels", None) or {}
        pairs = []
        for key, pattern in sorted(labels.items()):
            checked = _pattern(c, pattern, f"{path}.labels.{key}")
            if checked is not None:
                pairs.append((key, checked))
        fields["labels"] = tuple(pairs)
    return acl.Match(**fields)


def _entries(c: _Collector, value: Any) -> tuple[acl.Entry, ...]:
    if not isinstance(value, list):
        c.bad("acl", "expected a list of entries")
        return ()
    entries = []
    for index, item in enumerate(value):
        path = f"acl[{index}]"
        raw = c.mapping(item, path, ("match", "actions", "comment"))
        if raw is None:
            continue
        if "match" not in raw:
            c.bad(f"{path}.match", "required")
        match = _match(c, raw.get("match"), f"{path}.match")
        actions: tuple[str, ...] | None = ()
        if "actions" not in raw:
            c.bad(f"{path}.actions", "required")
        else:
            actions = c.string_list(raw["actions"], f"{path}.actions")
            for action in actions or ():
                if action not in ACTIONS:
                    c.bad(f"{path}.actions", f"unknown action {action!r} (expected pull, push, delete or *)")
            if actions and "*" in actions and len(actions) > 1:
                c.warnings.append(f'{path}.actions: "*" grants everything only when it stands alone')
        comment = raw.get("comment")
        if comment is not None and not isinstance(comment, str):
            c.bad(f"{path}.comment", "expected a string")
            comment = None
        if match is not None and actions is not None:
            entries.append(acl.Entry(match, frozenset(actions), comment))
    for later_index, earlier_index in acl.shadowed_entries(entries):
        c.warnings.append(
            f"acl[{later_index}]: can never match: acl[{earlier_index}] matches every request it would"
        )
    return tuple(entries)


def _expires(c: _Collector, value: Any, path: str) -> dt.datetime | None:
    if isinstance(value, dt.datetime):
        moment = value
    elif isinstance(value, dt.date):
        moment = dt.datetime(value.year, value.month, value.day)
    elif isinstance(value, str):
        try:
            moment = dt.datetime.fromisoformat(value)
        except ValueError:
            c.bad(path, "expected a date (2027-01-31) or a date and time (2027-01-31T18:00:00Z)")
            return None
    else:
        c.bad(path, "expected a date (2027-01-31) or a date and time (2027-01-31T18:00:00Z)")
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)


def _account(c: _Collector, raw: dict[str, Any], path: str) -> tuple[dict[str, tuple[str, ...]], Any]:
    labels: dict[str, tuple[str, ...]] = {}
    for key, values in (c.mapping(raw.get("labels"), f"{path}.labels", None) or {}).items():
        parsed = c.string_list(values, f"{path}.labels.{key}")
        if parsed is not None:
            labels[key] = parsed
    if "groups" in raw:
        groups = c.string_list(raw["groups"], f"{path}.groups") or ()
        labels[GROUP_LABEL] = tuple(dict.fromkeys(labels.get(GROUP_LABEL, ()) + groups))
    expires = _expires(c, raw["expires"], f"{path}.expires") if "expires" in raw else None
    return labels, expires


def _docker_auth_sections(c: _Collector, top: Mapping[str, Any]) -> DockerAuthSections:
    server = c.mapping(top.get("server", {}), "server", ("addr", "certificate", "key")) or {}
    token = c.mapping(top.get("token", {}), "token", ("issuer", "expiration", "certificate", "key")) or {}
    texts: dict[str, str | None] = {}
    for path, value in (
        ("server.addr", server.get("addr")),
        ("server.certificate", server.get("certificate")),
        ("server.key", server.get("key")),
        ("token.issuer", token.get("issuer")),
        ("token.certificate", token.get("certificate")),
        ("token.key", token.get("key")),
    ):
        if value is not None and (not isinstance(value, str) or not value):
            c.bad(path, "expected a non-empty string")
            value = None
        texts[path] = value
    expiration = token.get("expiration")
    if expiration is not None and (
        isinstance(expiration, bool) or not isinstance(expiration, int) or expiration < 60
    ):
        c.bad("token.expiration", "expected whole seconds, at least 60")
        expiration = None
    if "token" in top and texts["token.issuer"] is None:
        c.bad("token.issuer", "required (the registry's auth.token.issuer)")
    return DockerAuthSections(
        addr=texts["server.addr"],
        server_certificate=texts["server.certificate"],
        server_key=texts["server.key"],
        issuer=texts["token.issuer"],
        expiration=expiration,
        token_certificate=texts["token.certificate"],
        token_key=texts["token.key"],
    )


def parse(data: Any, source: str = "policy") -> Policy:
    """Validate a loaded YAML document. Raises PolicyError listing every problem."""
    c = _Collector()
    if isinstance(data, dict):
        unsupported = [key for key in DOCKER_AUTH_UNSUPPORTED if key in data]
        if unsupported:
            c.bad(
                ", ".join(unsupported),
                "docker_auth sections this gateway does not support (its server, token, users and acl "
                "sections work as they are): remove them and keep their users in an htpasswd file",
            )
            data = {k: v for k, v in data.items() if k not in unsupported}
    top = c.mapping(
        data,
        source,
        (
            "acl",
            "users",
            "accounts",
            "groups",
            "service",
            "server",
            "token",
            "ldap_auth",
            "ext_auth",
            "ext_authz",
            "immutable",
        ),
    )
    if top is None:
        raise PolicyError(c.problems)
    docker_auth = _docker_auth_sections(c, top) if "server" in top or "token" in top else None
    ldap = None
    if "ldap_auth" in top:
        # Its keys are checked by parse_section, which names what replaces another integration's.
        raw_ldap = c.mapping(top["ldap_auth"], "ldap_auth", None)
        if raw_ldap is not None:
            ldap = ldap_identity.parse_section(c, raw_ldap)
    external = None
    if "ext_auth" in top:
        raw_external = c.mapping(top["ext_auth"], "ext_auth", external_identity.SECTION_KEYS)
        if raw_external is not None:
            external = external_identity.parse_section(c, raw_external)
    ext_authz = None
    if "ext_authz" in top:
        raw_authz = c.mapping(top["ext_authz"], "ext_authz", external_identity.SECTION_KEYS)
        if raw_authz is not None:
            ext_authz = external_identity.parse_section(c, raw_authz, "ext_authz")

    entries = _entries(c, top["acl"]) if "acl" in top else ()
    immutable_rules = immutable.parse(top.get("immutable"), c.bad)
    if "acl" not in top and "ext_authz" not in top:
        c.bad("acl", "required (a policy without rules would deny everything)")

    service = top.get("service", "registry")
    if not isinstance(service, str) or not service:
        c.bad("service", "expected a non-empty string")
        service = "registry"

    labels: dict[str, dict[str, tuple[str, ...]]] = {}
    expiry: dict[str, dt.datetime | None] = {}
    users: dict[str, htpasswd.StoredHash] = {}
    anonymous = True
    if "users" in top:
        raw_users = c.mapping(top["users"], "users", None) or {}
        anonymous = "" in raw_users
        for name, entry in raw_users.items():
            path = f"users.{name}" if name else 'users.""'
            raw = c.mapping(entry, path, ("password", "labels", "groups", "expires"))
            if raw is None:
                continue
            if name == "":
                if raw:
                    c.bad(path, "the anonymous entry takes no settings")
                continue
            stored = raw.get("password")
            scheme = htpasswd.classify(stored) if isinstance(stored, str) else None
            if scheme is None or not htpasswd.well_formed(scheme, str(stored)):
                c.bad(f"{path}.password", "expected a password hash (bcrypt: htpasswd -nB USER)")
            else:
                users[name] = htpasswd.StoredHash(scheme, str(stored))
                if users[name].weak:
                    c.warnings.append(f"{path}.password: weak {scheme} hash; use bcrypt")
            labels[name], expiry[name] = _account(c, raw, path)

    for name, entry in (c.mapping(top.get("accounts"), "accounts", None) or {}).items():
        path = f"accounts.{name}"
        raw = c.mapping(entry, path, ("labels", "groups", "expires"))
        if raw is None:
            continue
        if name in users:
            c.bad(path, "this user is defined under users:; put its labels there")
            continue
        labels[name], expiry[name] = _account(c, raw, path)

    for group, members in (c.mapping(top.get("groups"), "groups", None) or {}).items():
        for member in c.string_list(members, f"groups.{group}") or ():
            current = labels.setdefault(member, {})
            current[GROUP_LABEL] = tuple(dict.fromkeys((*current.get(GROUP_LABEL, ()), group)))
            expiry.setdefault(member, None)

    if c.problems:
        raise PolicyError(c.problems)
    accounts = {
        name: Account(MappingProxyType(labels.get(name, {})), expiry.get(name))
        for name in set(labels) | set(expiry)
    }
    return Policy(
        acl=entries,
        rules=acl.Rules.build(entries),
        users=MappingProxyType(users),
        accounts=MappingProxyType(accounts),
        anonymous=anonymous,
        service=service,
        warnings=tuple(c.warnings),
        docker_auth=docker_auth,
        service_explicit="service" in top,
        ldap=ldap,
        external=external,
        ext_authz=ext_authz,
        immutable=immutable_rules,
    )


def load(path: Path) -> Policy:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyError([describe_read_error(path, exc)]) from None
    try:
        data = yaml_files.load(text, str(path))
    except yaml.YAMLError as exc:
        raise PolicyError([f"{path}: invalid YAML: {exc}"]) from None
    return parse(data, str(path))
