"""LDAP logins, configured as docker_auth's `ldap_auth` section (its keys, unchanged).

A login: bind as the service account (`bind_dn`, `bind_password_file`; anonymous when there is
none; or, with `initial_bind_as_user`, as the user: `bind_dn` is then a template such as
`uid=${account},ou=people,dc=example,dc=org` or `${account}@corp.example.com`), search `base`
with `filter`, where `${account}` is the user name escaped per RFC 4515, for exactly one entry;
then bind as that entry with the password, which is what verifies it. The entry's attributes
named in `labels` become the user's labels (`parse_cn` keeps the first `CN` of a DN value,
`lower_case` lowers it), so that `memberOf: cn=backend,ou=groups,dc=example,dc=org` is the label
`group: backend` for ACL entries such as `name: "${labels:group}/*"`.

The pure parts (filter escaping, DN parsing, labels, the section's validation) are here without
I/O; `LdapSource` does the talking, with bonsai (an optional extra: it builds on libldap).
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol

from gateway.identity import Labels, Rejected, Unavailable, Unknown, Verdict, Verified
from gateway.yaml_files import did_you_mean

log = logging.getLogger(__name__)

TLS_MODES = ("never", "always", "starttls")
SECTION_KEYS = (
    "addr",
    "tls",
    "insecure_tls_skip_verify",
    "ca_certificate",
    "base",
    "filter",
    "bind_dn",
    "bind_password_file",
    "labels",
    "initial_bind_as_user",
    "method",  # docker_auth's older name for tls: plain, simple_tls, starttls
    # ours, beyond docker_auth's:
    "connect_timeout",
    "operation_timeout",
    "max_connections",
)
LABEL_KEYS = ("attribute", "parse_cn", "lower_case")
# Keys of other LDAP integrations (a separate group search) that docker_auth's section does not
# have: what replaces them, rather than a near key's name. Groups are read from the user's entry.
_GROUPS_FROM_THE_ENTRY = (
    "groups are read from the user's own entry instead: labels: {group: {attribute: memberOf, "
    'parse_cn: true}}, then ACL entries such as name: "${labels:group}/*" (no separate group search)'
)
REPLACED_KEYS = {
    "group_filter": f"not a docker_auth ldap_auth key: {_GROUPS_FROM_THE_ENTRY}",
    "group_base_dn": f"not a docker_auth ldap_auth key: {_GROUPS_FROM_THE_ENTRY}",
}


@dataclass(frozen=True)
class LabelSpec:
    attribute: str
    parse_cn: bool = False
    lower_case: bool = False


@dataclass(frozen=True)
class LdapSettings:
    addr: str  # host:port
    base: str
    filter: str
    tls: str = "always"
    insecure_tls_skip_verify: bool = False
    ca_certificate: str | None = None
    bind_dn: str | None = None
    bind_password: str | None = field(default=None, repr=False)  # read from bind_password_file
    bind_password_file: str | None = None  # followed: a rotated secret reloads the policy
    labels: Mapping[str, LabelSpec] = field(default_factory=dict)
    initial_bind_as_user: bool = False
    connect_timeout: float = 5.0
    operation_timeout: float = 5.0
    max_connections: int = 8

    @property
    def url(self) -> str:
        return ("ldaps" if self.tls == "always" else "ldap") + "://" + self.addr


class Problems(Protocol):
    def bad(self, path: str, message: str) -> None: ...


def warn(c: Problems, message: str) -> None:
    """A warning, where the collector keeps them (the policy file's does)."""
    warnings = getattr(c, "warnings", None)
    if isinstance(warnings, list):
        warnings.append(message)


# --- pure: escaping, DNs, labels, the section --------------------------------------------------

_FILTER_SPECIALS = frozenset(b"\\*()")


def escape_filter_value(value: str) -> str:
    """An assertion value for an LDAP filter (RFC 4515): `\\`, `*`, `(`, `)`, NUL and every byte
    outside printable ASCII as `\\XX`, so that no user name can change the filter's structure."""
    out = []
    for byte in value.encode("utf-8"):
        if byte in _FILTER_SPECIALS or byte < 0x20 or byte >= 0x7F:
            out.append(f"\\{byte:02x}")
        else:
            out.append(chr(byte))
    return "".join(out)


_ACCOUNT_ASSERTION = re.compile(r"\(\s*([A-Za-z][A-Za-z0-9.;-]*)\s*=\s*\$\{account\}\s*\)")


def account_attributes(template: str) -> tuple[str, ...]:
    """The attributes the filter compares with the whole user name, as in `(uid=${account})`."""
    return tuple(dict.fromkeys(match.group(1) for match in _ACCOUNT_ASSERTION.finditer(template)))


def names_entry(entry: Mapping[str, Sequence[str]], attributes: Sequence[str], account: str) -> bool:
    """Whether the user name is, exactly, a value of one of those attributes of the entry.

    Directories compare names without case (`uid` is case-insensitive), so `ALICE` finds alice's
    entry; the gateway would then know the user as `ALICE`, whom an ACL entry for `alice` does not
    match, deny entries included. Only the name as the directory holds it logs in."""
    if not attributes:
        return True  # a filter that does not compare the whole name: nothing to hold it against
    by_name = {name.lower(): values for name, values in entry.items()}
    return any(account in by_name.get(attribute.lower(), ()) for attribute in attributes)


def user_filter(template: str, account: str) -> str:
    return template.replace("${account}", escape_filter_value(account))


def escape_dn_value(value: str) -> str:
    """An attribute value for a DN (RFC 4514): `\\`, `,`, `+`, `"`, `<`, `>`, `;`, `=` and NUL
    escaped, and a leading space or `#` and a trailing space, so a name cannot add DN parts."""
    out = []
    for index, ch in enumerate(value):
        if ch in '\\,+"<>;=' or (ch == "#" and index == 0) or (ch == " " and index in (0, len(value) - 1)):
            out.append("\\" + ch)
        elif ch == "\x00":
            out.append("\\00")
        else:
            out.append(ch)
    return "".join(out)


def user_bind_dn(template: str | None, account: str) -> str:
    """The DN (or name) to bind as with initial_bind_as_user."""
    if template is None:
        return account
    return template.replace("${account}", escape_dn_value(account))


def _split_unescaped(text: str, separator: str) -> list[str]:
    parts, current, escaped = [], [], False
    for ch in text:
        if escaped:
            current.append("\\" + ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == separator:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return parts


def _unescape_dn_value(value: str) -> str:
    out = bytearray()
    i = 0
    while i < len(value):
        ch = value[i]
        if ch == "\\" and i + 1 < len(value):
            pair = value[i + 1 : i + 3]
            if len(pair) == 2 and all(c in "0123456789abcdefABCDEF" for c in pair):
                out.append(int(pair, 16))
                i += 3
                continue
            out += value[i + 1].encode()
            i += 2
            continue
        out += ch.encode()
        i += 1
    return out.decode("utf-8", "replace")


def first_cn(dn: str) -> str:
    """The value of the first `CN` in a DN (docker_auth's `parse_cn`); the DN itself if it has none."""
    for rdn in _split_unescaped(dn, ","):
        for pair in _split_unescaped(rdn, "+"):
            kind, sep, value = pair.partition("=")
            if sep and kind.strip().lower() == "cn":
                return _unescape_dn_value(value.strip())
    return dn


def entry_labels(entry: Mapping[str, Sequence[str]], specs: Mapping[str, LabelSpec]) -> Labels:
    """The labels an entry's attributes give (attribute names compare without case, as in LDAP)."""
    by_name = {name.lower(): values for name, values in entry.items()}
    labels: dict[str, tuple[str, ...]] = {}
    for label, spec in specs.items():
        values = []
        for raw in by_name.get(spec.attribute.lower(), ()):
            value = first_cn(raw) if spec.parse_cn else raw
            values.append(value.lower() if spec.lower_case else value)
        if values:
            labels[label] = tuple(dict.fromkeys(values))
    return MappingProxyType(labels)


def _text(c: Problems, raw: Mapping[str, Any], key: str, path: str, required: bool = False) -> str | None:
    value = raw.get(key)
    if value is None:
        if required:
            c.bad(f"{path}.{key}", "required")
        return None
    if not isinstance(value, str) or not value:
        c.bad(f"{path}.{key}", "expected a non-empty string")
        return None
    return value


def _flag(c: Problems, raw: Mapping[str, Any], key: str, path: str) -> bool:
    value = raw.get(key, False)
    if not isinstance(value, bool):
        c.bad(f"{path}.{key}", "expected true or false")
        return False
    return value


def _seconds(c: Problems, raw: Mapping[str, Any], key: str, path: str, default: float) -> float:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 300:
        c.bad(f"{path}.{key}", "expected seconds, more than 0 and at most 300")
        return default
    return float(value)


def parse_section(c: Problems, raw: Mapping[str, Any], path: str = "ldap_auth") -> LdapSettings | None:
    """Validate an `ldap_auth` mapping; every problem is reported with its key path, an unknown
    key with the key that replaces it when it is another integration's. The bind password is read
    from its file here."""
    problems_before = len(getattr(c, "problems", []))
    for key in raw:
        if key in REPLACED_KEYS:
            c.bad(f"{path}.{key}", REPLACED_KEYS[key])
        elif key not in SECTION_KEYS:
            hint = did_you_mean(str(key), SECTION_KEYS)
            c.bad(f"{path}.{key}", f"unknown key{hint} (expected one of: {', '.join(SECTION_KEYS)})")
    if importlib.util.find_spec("bonsai") is None:
        c.bad(
            path, "needs the LDAP client: pip install 'registry-gateway[ldap]' (bonsai; Debian: libldap2-dev)"
        )
    addr = _text(c, raw, "addr", path, required=True)
    if addr is not None:
        host, sep, port = addr.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            c.bad(f"{path}.addr", f"expected HOST:PORT, not {addr!r}")
    base = _text(c, raw, "base", path, required=True)
    filter_ = _text(c, raw, "filter", path, required=True)
    if filter_ is not None:
        if "${account}" not in filter_:
            c.bad(f"{path}.filter", "must contain ${account}")
        elif filter_.count("(") != filter_.count(")") or not filter_.startswith("("):
            c.bad(f"{path}.filter", "expected an LDAP filter in parentheses, such as (uid=${account})")
    old_methods = {"plain": "never", "simple_tls": "always", "starttls": "starttls"}
    if "method" in raw and "tls" in raw:
        c.bad(f"{path}.method", "give tls or its older name method, not both")
    if "method" in raw and raw["method"] not in old_methods:
        c.bad(f"{path}.method", "expected one of: plain, simple_tls, starttls")
    tls = old_methods.get(raw["method"], "always") if "method" in raw else raw.get("tls")
    if tls in ("", None) and "method" not in raw:
        # As docker_auth's NewLDAPAuth reads it: no tls is LDAPS on port 636, plain LDAP elsewhere.
        tls = "always" if addr is not None and addr.endswith(":636") else "never"
        if tls == "never":
            warn(
                c,
                f"{path}.tls: not set, so plain LDAP, as docker_auth reads it (LDAPS only on port 636): "
                "passwords cross the network unencrypted; set tls: starttls (or always, for an LDAPS port)",
            )
    if tls == "none":
        tls = "never"  # docker_auth's spelling of an unencrypted connection
    if tls not in TLS_MODES:
        c.bad(f"{path}.tls", f'expected one of: {", ".join(TLS_MODES)} (or docker_auth\'s "" or none)')
        tls = "always"
    skip_verify = _flag(c, raw, "insecure_tls_skip_verify", path)
    ca_certificate = _text(c, raw, "ca_certificate", path)
    if ca_certificate is not None and not Path(ca_certificate).is_file():
        c.bad(f"{path}.ca_certificate", f"{ca_certificate}: no such file")
    bind_dn = _text(c, raw, "bind_dn", path)
    password_file = _text(c, raw, "bind_password_file", path)
    bind_password = None
    if password_file is not None:
        try:
            # Trimmed as docker_auth trims it.
            bind_password = Path(password_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            c.bad(f"{path}.bind_password_file", f"{password_file}: cannot read: {exc}")
    initial_bind_as_user = _flag(c, raw, "initial_bind_as_user", path)
    if initial_bind_as_user:
        if password_file is not None:
            c.bad(
                f"{path}.bind_password_file", "not used with initial_bind_as_user (the user's password binds)"
            )
        if bind_dn is not None and "${account}" not in bind_dn:
            c.bad(f"{path}.bind_dn", "with initial_bind_as_user, a template containing ${account}")
    else:
        if bind_dn is not None and password_file is None:
            c.bad(f"{path}.bind_password_file", "required with bind_dn")
        if password_file is not None and bind_dn is None:
            c.bad(f"{path}.bind_dn", "required with bind_password_file")
    labels: dict[str, LabelSpec] = {}
    raw_labels = raw.get("labels") or {}
    if not isinstance(raw_labels, dict):
        c.bad(f"{path}.labels", "expected a mapping of label names to {attribute, parse_cn, lower_case}")
        raw_labels = {}
    for name, spec in raw_labels.items():
        where = f"{path}.labels.{name}"
        if not isinstance(spec, dict):
            c.bad(where, "expected a mapping with attribute, parse_cn, lower_case")
            continue
        for key in spec:
            if key not in LABEL_KEYS:
                c.bad(f"{where}.{key}", f"unknown key (expected one of: {', '.join(LABEL_KEYS)})")
        attribute = _text(c, spec, "attribute", where, required=True)
        if attribute is not None:
            labels[str(name)] = LabelSpec(
                attribute, _flag(c, spec, "parse_cn", where), _flag(c, spec, "lower_case", where)
            )
    connections = raw.get("max_connections", 8)
    if isinstance(connections, bool) or not isinstance(connections, int) or not 1 <= connections <= 256:
        c.bad(f"{path}.max_connections", "expected a whole number from 1 to 256")
        connections = 8
    settings = LdapSettings(
        addr=addr or "",
        base=base or "",
        filter=filter_ or "",
        tls=tls,
        insecure_tls_skip_verify=skip_verify,
        ca_certificate=ca_certificate,
        bind_dn=bind_dn,
        bind_password=bind_password,
        bind_password_file=password_file,
        labels=MappingProxyType(labels),
        initial_bind_as_user=initial_bind_as_user,
        connect_timeout=_seconds(c, raw, "connect_timeout", path, 5.0),
        operation_timeout=_seconds(c, raw, "operation_timeout", path, 5.0),
        max_connections=connections,
    )
    if len(getattr(c, "problems", [])) != problems_before:
        return None
    return settings


# --- the directory ------------------------------------------------------------------------------


# The steps of a login, for saying which one failed.
SERVICE_BIND, SEARCH, USER_BIND = "binding as the service account", "searching", "binding as the user"


class DirectoryUnavailable(Exception):
    """A step of a login the directory did not complete, in words that name the setting concerned.
    `misconfigured`: the directory answered and refused the configuration itself (the service
    account's bind), rather than not answering."""

    def __init__(self, message: str, misconfigured: bool = False) -> None:
        super().__init__(message)
        self.misconfigured = misconfigured


class LdapSource:
    """Logins against one directory. Never blocks the event loop (bonsai's asyncio connections),
    at most `max_connections` at once, every connect and operation under its timeout."""

    name = "ldap"
    lasting = False  # a directory vouches for a login it verified, while it is cached

    def __init__(self, settings: LdapSettings) -> None:
        import bonsai  # an optional extra: imported only when a directory is configured

        self._bonsai = bonsai
        self.settings = settings
        self._slots = asyncio.Semaphore(settings.max_connections)
        self._idle: list[Any] = []  # service-account connections between searches
        self.last_problem: str | None = None
        if settings.insecure_tls_skip_verify and settings.tls != "never":
            log.warning(
                "ldap_auth.insecure_tls_skip_verify is true: the directory's certificate is NOT verified; "
                "anyone who can intercept the connection to %s can read every password",
                settings.addr,
            )

    def _failure(self, step: str, exc: BaseException) -> DirectoryUnavailable:
        """Why `step` failed, naming the keys to look at: a refused service account is its
        bind_dn and password file (not a user's password), a silent directory is the timeout it
        ran out of (bonsai's TimeoutError says nothing more)."""
        bonsai = self._bonsai
        settings = self.settings
        detail = str(exc).strip()
        if isinstance(exc, bonsai.TimeoutError | TimeoutError):
            if step == SEARCH:
                seconds = settings.operation_timeout
                return DirectoryUnavailable(
                    f"no answer to the search within ldap_auth.operation_timeout ({seconds:g} s)"
                )
            return DirectoryUnavailable(
                f"no answer within ldap_auth.connect_timeout ({settings.connect_timeout:g} s) "
                f"connecting to {settings.url} ({step})"
            )
        if step == SERVICE_BIND and isinstance(exc, bonsai.AuthenticationError):
            if settings.bind_dn is None:
                return DirectoryUnavailable(
                    f"the directory refuses an anonymous search ({detail}): set ldap_auth.bind_dn and "
                    "ldap_auth.bind_password_file",
                    misconfigured=True,
                )
            return DirectoryUnavailable(
                f"the directory refused the service account ({detail}): check ldap_auth.bind_dn "
                f"({settings.bind_dn}) and the password in ldap_auth.bind_password_file "
                f"({settings.bind_password_file}); this is not about the user's password",
                misconfigured=True,
            )
        if isinstance(exc, bonsai.ConnectionError):
            hint = ""
            if settings.tls == "always" and "TLS" in detail:
                # It answered, but not with TLS: most likely a plain-LDAP port (389).
                hint = "; if that port speaks plain LDAP, set ldap_auth.tls: starttls (tls: always is LDAPS)"
            where = f"ldap_auth.addr, tls: {settings.tls}; {step}"
            return DirectoryUnavailable(f"cannot connect to {settings.url} ({where}): {detail}{hint}")
        return DirectoryUnavailable(f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__)

    def _client(self, dn: str | None, password: str | None) -> Any:
        bonsai = self._bonsai
        settings = self.settings
        client = bonsai.LDAPClient(settings.url, tls=settings.tls == "starttls")
        if settings.tls != "never":
            client.set_cert_policy("never" if settings.insecure_tls_skip_verify else "demand")
            if settings.ca_certificate is not None:
                client.set_ca_cert(settings.ca_certificate)
        if dn is not None:
            client.set_credentials("SIMPLE", user=dn, password=password or "")
        return client

    async def _connect(self, dn: str | None, password: str | None, step: str) -> Any:
        """A connection bound as `dn`. A user's wrong password is bonsai's AuthenticationError,
        for the caller to decide; every other failure is DirectoryUnavailable."""
        bonsai = self._bonsai
        try:
            client = self._client(dn, password)
            return await client.connect(is_async=True, timeout=self.settings.connect_timeout)
        except bonsai.AuthenticationError as exc:
            if step == USER_BIND:
                raise
            raise self._failure(step, exc) from None
        except (bonsai.LDAPError, OSError, TimeoutError) as exc:
            raise self._failure(step, exc) from None

    async def _service_connection(self) -> Any:
        """A connection bound as the service account (or anonymous): pooled, since every login
        searches with the same identity."""
        while self._idle:
            connection = self._idle.pop()
            if not connection.closed:
                return connection
        return await self._connect(self.settings.bind_dn, self.settings.bind_password, SERVICE_BIND)

    def _return(self, connection: Any, healthy: bool) -> None:
        if healthy and not connection.closed and len(self._idle) < self.settings.max_connections:
            self._idle.append(connection)
        else:
            connection.close()

    async def _find(self, user: str, search_as: tuple[str, str] | None) -> list[Any]:
        """The entries the filter finds for `user`: searched as the service account (pooled), or
        as `search_as` (initial_bind_as_user; its wrong password is bonsai's AuthenticationError).
        Raises DirectoryUnavailable."""
        bonsai = self._bonsai
        settings = self.settings
        failures = (bonsai.LDAPError, OSError, TimeoutError)

        async def search(connection: Any) -> list[Any]:
            try:
                found: list[Any] = await connection.search(
                    settings.base,
                    bonsai.LDAPSearchScope.SUBTREE,
                    user_filter(settings.filter, user),
                    attrlist=[
                        *(spec.attribute for spec in settings.labels.values()),
                        *account_attributes(settings.filter),
                    ]
                    or ["1.1"],
                    timeout=settings.operation_timeout,
                )
            except BaseException:
                connection.close()
                raise
            return found

        if search_as is not None:
            connection = await self._connect(*search_as, USER_BIND)
            try:
                return await search(connection)
            except failures as exc:
                raise self._failure(SEARCH, exc) from None
            finally:
                connection.close()
        pooled = bool(self._idle)
        connection = await self._service_connection()
        try:
            entries = await search(connection)
        except bonsai.ConnectionError as exc:
            if not pooled:
                raise self._failure(SEARCH, exc) from None
            # A pooled connection the directory dropped (it restarted): once more, on a new one.
            connection = await self._connect(settings.bind_dn, settings.bind_password, SERVICE_BIND)
            try:
                entries = await search(connection)
            except failures as retried:
                raise self._failure(SEARCH, retried) from None
        except failures as exc:
            raise self._failure(SEARCH, exc) from None
        self._return(connection, healthy=True)
        return entries

    @staticmethod
    def _attributes(entry: Any) -> dict[str, list[str]]:
        return {str(key): [str(v) for v in values] for key, values in entry.items() if key != "dn"}

    def _labels(self, entry: Any) -> Labels:
        return entry_labels(self._attributes(entry), self.settings.labels)

    async def verify(self, user: str, password: str) -> Verdict:
        if not password:
            # A simple bind with an empty password is an unauthenticated bind, which succeeds.
            return Rejected()
        bonsai = self._bonsai
        settings = self.settings
        async with self._slots:
            try:
                try:
                    entries = await self._find(
                        user,
                        (user_bind_dn(settings.bind_dn, user), password)
                        if settings.initial_bind_as_user
                        else None,
                    )
                except bonsai.AuthenticationError:
                    return Rejected()  # initial_bind_as_user: the user's own bind, refused
                self.last_problem = None
                if not entries:
                    return Unknown()
                if len(entries) > 1:
                    log.warning("ldap_auth.filter matches %d entries for %r: refused", len(entries), user)
                    return Rejected()
                entry = entries[0]
                if not names_entry(self._attributes(entry), account_attributes(settings.filter), user):
                    log.info("ldap_auth: %r is not the directory's spelling of that name: refused", user)
                    return Rejected()
                try:
                    user_connection = await self._connect(str(entry.dn), password, USER_BIND)
                except bonsai.AuthenticationError:
                    return Rejected()
                user_connection.close()
                return Verified(user, self._labels(entry), self.name)
            except DirectoryUnavailable as exc:
                self.last_problem = str(exc)
                return Unavailable(f"directory {settings.addr} unavailable: {exc}")

    async def lookup(self, user: str) -> tuple[str, Labels] | Unknown | Unavailable:
        """The entry's DN and labels, found as the service account, with no password check (for
        `policy explain`)."""
        if self.settings.initial_bind_as_user:
            return Unavailable("initial_bind_as_user: the directory is searched only with a user's password")
        try:
            entries = await self._find(user, None)
        except DirectoryUnavailable as exc:
            return Unavailable(f"directory {self.settings.addr} unavailable: {exc}")
        if len(entries) != 1:
            return Unknown()
        if not names_entry(self._attributes(entries[0]), account_attributes(self.settings.filter), user):
            return Unknown()
        return str(entries[0].dn), self._labels(entries[0])

    async def close(self) -> None:
        while self._idle:
            self._idle.pop().close()

    async def check(self) -> DirectoryUnavailable | None:
        """None when the directory answers a bind as the service account (or anonymously, with
        initial_bind_as_user or no bind_dn), else why not."""
        bind_dn = None if self.settings.initial_bind_as_user else self.settings.bind_dn
        try:
            connection = await self._connect(bind_dn, self.settings.bind_password, SERVICE_BIND)
        except DirectoryUnavailable as exc:
            return exc
        except Exception as exc:  # any failure is the answer here
            return self._failure(SERVICE_BIND, exc)
        connection.close()
        return None

    async def probe(self) -> str | None:
        """None when the directory answers a bind as the service account (or anonymously)."""
        problem = await self.check()
        self.last_problem = None if problem is None else str(problem)
        return self.last_problem
