"""Robot accounts: machine credentials for CI, scoped, expiring and revocable.

A robot logs in wherever a user does, as `robot+NAME` with the secret `robot create` printed once.
What it may do is the intersection of its scopes (the token spec's form, with globs:
`repository:ci/*:pull,push`) and what the policy grants the account `robot+NAME` (whose labels
are the robot's own, with `robot: [NAME]`): a robot never gets more than a user with the same
name would, nor more than its scopes say.

The robots file (YAML, the setting `robots`) is written by the CLI under a lock, atomically, with
its owner and mode kept, and followed by the gateway like the htpasswd file: a revoked or rotated
robot is refused at the next reload (`reload_interval`), on every worker. Its secret is 32 random
bytes, stored as HMAC-SHA256 keyed with a random salt of its own: with that much entropy a slow
hash buys nothing against guessing (there is nothing to guess), while bcrypt would cost tens of
milliseconds per login on the request path and read only 72 bytes. The file never holds a secret,
and a secret is never logged or put in argv.

Parsing and checking are pure; the file operations (`create`, `rotate`, `revoke`) are the CLI's.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import hashlib
import hmac
import json
import os
import re
import secrets
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from gateway import acl, userfile, yaml_files
from gateway.files import replace_atomically
from gateway.htpasswd import StoredHash
from gateway.identity import Labels
from gateway.routes import valid_name
from gateway.tokens.scopes import Scope, parse_scope

PREFIX = "robot+"  # every account name starting with it is a robot's, and only a robot's
SECRET_PREFIX = "rgw_"  # what secret scanners can look for
_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
_DURATION = re.compile(r"(\d+)([smhdw])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
REPOSITORY_ACTIONS = frozenset({"pull", "push", "delete"})
MAX_LIFETIME_SECONDS = 10 * 366 * 86400
HEADER = (
    "# registry-gateway robots: written by `registry-gateway robot`, followed by the gateway.\n"
    "# No secrets here: keyed hashes of them. Edit with the CLI, which locks and writes atomically.\n"
)


class RobotsError(ValueError):
    """A robots file, name, scope or duration that cannot be used; the message says which."""


@dataclass(frozen=True)
class Robot:
    name: str  # without PREFIX
    salt: bytes = field(repr=False)
    digest: bytes = field(repr=False)
    scopes: tuple[Scope, ...]
    labels: Labels
    created: dt.datetime
    expires: dt.datetime | None

    @property
    def account(self) -> str:
        return PREFIX + self.name

    def expired(self, now: dt.datetime) -> bool:
        return self.expires is not None and now >= self.expires

    def matches(self, secret: str) -> bool:
        return hmac.compare_digest(_digest(self.salt, secret), self.digest)

    def allowed(self, type_: str, name: str, actions: frozenset[str]) -> frozenset[str]:
        """Which of `actions` on `name` its scopes allow (`*` in a scope: every action)."""
        have: set[str] = set()
        for scope in self.scopes:
            if scope.type == type_ and acl.compile_pattern(scope.name).fullmatch(name):
                have |= scope.actions
        if "*" in have:
            return actions
        return actions & frozenset(have)

    def stored_hash(self) -> StoredHash:
        """As the htpasswd file's users have theirs: what a refresh token's fingerprint is of, so
        that `rotate` voids the robot's refresh tokens as `user passwd` voids a user's."""
        return StoredHash("robot", f"{_b64(self.salt)}:{_b64(self.digest)}")

    def fingerprint(self) -> str:
        """Which secret a token was issued for (its `rgw_secret` claim): a token ends with the
        secret, at `rotate`, not when it expires. Tells nothing of the secret (a hash of a hash
        of 32 random bytes)."""
        return hashlib.sha256(b"registry-gateway robot secret\0" + self.salt + self.digest).hexdigest()[:32]

    def account_labels(self) -> Labels:
        """What the ACL sees as the account's labels: the robot's own, and `robot: [NAME]`."""
        return MappingProxyType({**self.labels, "robot": (self.name,)})


def robot_name(account: str) -> str | None:
    """NAME for `robot+NAME`; None for any other account."""
    return account[len(PREFIX) :] if account.startswith(PREFIX) else None


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise RobotsError(
            f"invalid robot name {name!r}: 1-63 of a-z, 0-9, '.', '_', '-', starting with a letter or digit"
        )
    return name


def parse_scopes(texts: Iterable[str]) -> tuple[Scope, ...]:
    """Scopes as the token spec writes them, the name a glob (`repository:ci/*:pull,push`,
    `registry:catalog:*`). Raises RobotsError naming the first that cannot be used."""
    scopes = []
    for text in texts:
        scope = parse_scope(text)
        if scope is None:
            raise RobotsError(f"scope {text!r}: expected TYPE:NAME:ACTIONS, e.g. repository:ci/*:pull,push")
        if scope.type == "registry" and (scope.name != "catalog" or not scope.actions <= {"*"}):
            raise RobotsError(f"scope {text!r}: the registry scope is registry:catalog:*")
        unknown = scope.actions - REPOSITORY_ACTIONS - {"*"}
        if scope.type == "repository" and unknown:
            raise RobotsError(
                f"scope {text!r}: unknown action {sorted(unknown)[0]!r} (pull, push, delete, *)"
            )
        problem = acl.validate_pattern(scope.name)
        if problem is not None or (
            scope.type == "repository" and not valid_name(scope.name.replace("*", "x"))
        ):
            raise RobotsError(f"scope {text!r}: {problem or 'not a repository name or glob'}")
        scopes.append(scope)
    if not scopes:
        raise RobotsError("a robot needs at least one --scope")
    return tuple(scopes)


def parse_duration(text: str) -> dt.timedelta | None:
    """`30d`, `12h`, `90m`, `2w`, `3600s`; `never` for no expiry (None)."""
    if text == "never":
        return None
    found = _DURATION.fullmatch(text.strip())
    seconds = int(found.group(1)) * _UNITS[found.group(2)] if found is not None else 0
    if not 0 < seconds <= MAX_LIFETIME_SECONDS:
        raise RobotsError(
            f"--expires {text!r}: expected a duration such as 30d, 12h, 90m, 2w (at most 10 years), or never"
        )
    return dt.timedelta(seconds=seconds)


def new_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def _digest(salt: bytes, secret: str) -> bytes:
    return hmac.digest(salt, secret.encode("utf-8"), "sha256")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _moment(value: object, where: str) -> dt.datetime:
    if not isinstance(value, str):
        raise RobotsError(f"{where}: expected a time such as 2026-12-31T23:59:59Z")
    try:
        moment = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise RobotsError(f"{where}: {value!r} is not a time such as 2026-12-31T23:59:59Z") from None
    if moment.tzinfo is None:
        raise RobotsError(f"{where}: {value!r} has no time zone (end it with Z)")
    return moment.astimezone(dt.UTC)


def _when(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse(text: str, source: str = "<robots>") -> dict[str, Robot]:
    """The robots in a robots file's text, by account (`robot+NAME`). Raises RobotsError naming
    every problem, each with its key path."""
    try:
        data = yaml_files.load(text, source) if text.strip() else {}
    except yaml.YAMLError as exc:
        raise RobotsError(f"{source}: {exc}") from None
    data = data or {}
    if not isinstance(data, dict) or set(data) - {"robots"}:
        raise RobotsError(f"{source}: expected a mapping with one key, robots")
    entries = data.get("robots") or {}
    if not isinstance(entries, dict):
        raise RobotsError(f"{source}: robots: expected a mapping of robot names")
    robots: dict[str, Robot] = {}
    problems: list[str] = []
    for name, entry in entries.items():
        try:
            robot = _robot(str(name), entry)
        except RobotsError as exc:
            problems.append(f"robots.{name}: {exc}")
            continue
        robots[robot.account] = robot
    if problems:
        raise RobotsError(f"{source}: " + f"; {source}: ".join(problems))
    return robots


def _robot(name: str, entry: Any) -> Robot:
    check_name(name)
    if not isinstance(entry, dict):
        raise RobotsError("expected a mapping (secret, scopes, created, expires)")
    unknown = set(entry) - {"secret", "scopes", "labels", "created", "expires"}
    if unknown:
        raise RobotsError(f"unknown key {sorted(unknown)[0]!r}")
    stored = entry.get("secret")
    scheme, _, rest = str(stored).partition(":")
    salt_text, _, digest_text = rest.partition(":")
    try:
        salt, digest = _unb64(salt_text), _unb64(digest_text)
    except ValueError:
        salt = digest = b""
    if scheme != "hmac-sha256" or len(salt) < 16 or len(digest) != 32:
        raise RobotsError("secret: expected hmac-sha256:SALT:DIGEST, as `robot create` writes it")
    scopes = entry.get("scopes")
    if not isinstance(scopes, list) or not all(isinstance(s, str) for s in scopes):
        raise RobotsError('scopes: expected a list such as ["repository:ci/*:pull,push"]')
    labels = entry.get("labels") or {}
    if not isinstance(labels, dict) or not all(isinstance(v, list | str) for v in labels.values()):
        raise RobotsError("labels: expected a mapping of names to lists of values")
    expires = entry.get("expires")
    return Robot(
        name=name,
        salt=salt,
        digest=digest,
        scopes=parse_scopes(scopes),
        labels=MappingProxyType(
            {str(k): tuple(str(x) for x in (v if isinstance(v, list) else [v])) for k, v in labels.items()}
        ),
        created=_moment(entry.get("created"), "created"),
        expires=None if expires is None else _moment(expires, "expires"),
    )


def render(robots: Mapping[str, Robot]) -> str:
    """The file's text: robots sorted by name."""
    entries: dict[str, object] = {}
    for robot in sorted(robots.values(), key=lambda r: r.name):
        entry: dict[str, object] = {
            "secret": f"hmac-sha256:{_b64(robot.salt)}:{_b64(robot.digest)}",
            "scopes": [str(scope) for scope in robot.scopes],
            "created": _when(robot.created),
            "expires": None if robot.expires is None else _when(robot.expires),
        }
        if robot.labels:
            entry["labels"] = {k: list(v) for k, v in robot.labels.items()}
        entries[robot.name] = entry
    return HEADER + yaml.safe_dump({"robots": entries}, sort_keys=False, default_flow_style=False)


def read(path: Path) -> dict[str, Robot]:
    """The robots in the file; none when it does not exist yet."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as exc:
        raise RobotsError(f"{path}: {getattr(exc, 'strerror', None) or exc}") from None
    return parse(text, str(path))


def _change(path: Path, edit: Callable[[dict[str, Robot]], dict[str, Robot]]) -> None:
    """`edit` the robots under the file's lock (the same as the htpasswd file's: FILE.lock),
    re-read first, so that concurrent runs lose nothing; written atomically, owner and mode kept
    (0640 when new, as the htpasswd file: the gateway's user must be able to read it)."""
    with userfile.locked(path):
        robots = edit(read(path))
        replace_atomically(path, render(robots).encode("utf-8"))


def create(
    path: Path,
    name: str,
    scopes: tuple[Scope, ...],
    lifetime: dt.timedelta | None,
    labels: Labels,
    now: dt.datetime,
) -> str:
    """A new robot; its secret, returned once."""
    check_name(name)
    secret = new_secret()
    salt = secrets.token_bytes(16)
    robot = Robot(
        name, salt, _digest(salt, secret), scopes, labels, now, None if lifetime is None else now + lifetime
    )

    def edit(robots: dict[str, Robot]) -> dict[str, Robot]:
        if robot.account in robots:
            raise RobotsError(f"robot {name!r} exists already (rotate gives it a new secret)")
        return {**robots, robot.account: robot}

    _change(path, edit)
    return secret


def rotate(path: Path, name: str, now: dt.datetime) -> str:
    """A new secret for a robot (the old one stops working at the next reload); returned once.
    Scopes, labels and expiry stay."""
    secret = new_secret()
    salt = secrets.token_bytes(16)

    def edit(robots: dict[str, Robot]) -> dict[str, Robot]:
        robot = robots.get(PREFIX + check_name(name))
        if robot is None:
            raise RobotsError(f"no robot {name!r}")
        return {**robots, robot.account: replace(robot, salt=salt, digest=_digest(salt, secret), created=now)}

    _change(path, edit)
    return secret


def revoke(path: Path, name: str) -> None:
    def edit(robots: dict[str, Robot]) -> dict[str, Robot]:
        if PREFIX + check_name(name) not in robots:
            raise RobotsError(f"no robot {name!r}")
        return {account: robot for account, robot in robots.items() if robot.name != name}

    _change(path, edit)


def record_use(used: Path, name: str, now: dt.datetime) -> None:
    """Record in `used` (the setting robots_last_used) that robot `name` logged in at `now`.
    Raises OSError when it cannot be written. A new file is written beside it and renamed over
    it: a symlink put there is replaced, never followed (the gateway writes nothing but this
    file, wherever a link points). No lock (the gateway's user may not open the CLI's): two
    workers writing at once may drop one's line, which its next recording (a minute later) puts
    back."""
    known = read_uses(used)
    known[name] = now
    text = json.dumps({n: _when(m) for n, m in sorted(known.items())}, indent=1) + "\n"
    fd, temporary = tempfile.mkstemp(prefix=f".{used.name}.", dir=used.parent)
    try:
        os.fchmod(fd, 0o640)
        os.write(fd, text.encode("utf-8"))
        os.fsync(fd)
        os.close(fd)
        os.replace(temporary, used)
    except BaseException:
        with contextlib.suppress(OSError):
            os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def read_uses(used: Path | None) -> dict[str, dt.datetime]:
    """When each robot last logged in, as far as recorded in `used`; nothing when unknown."""
    if used is None:
        return {}
    try:
        data = json.loads(used.read_text(encoding="utf-8"))
        return {str(n): _moment(m, n) for n, m in data.items()} if isinstance(data, dict) else {}
    except (OSError, ValueError, RobotsError):
        return {}
