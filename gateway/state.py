"""Users and rules as one immutable snapshot, rebuilt when their files change.

Reload is parse → validate → swap one reference: a request holds the snapshot it started with,
and a change that fails to load keeps the last good snapshot (and says why in the log).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import NamedTuple

from gateway import htpasswd, policyfile, robots
from gateway.files import Signature, describe_read_error, signature
from gateway.robots import Robot

log = logging.getLogger(__name__)

DEFAULT_DUMMY_COST = 10
# Apache's htpasswd rewrites its file in place (opened with O_TRUNC, then written): a file read
# half-written can be a valid one with users missing. A changed file is read once it has held
# still this long; one still changing is left to the next poll.
SETTLE_SECONDS = 0.1
FORCED_SETTLE_TRIES = 10


@dataclass(frozen=True)
class Snapshot:
    users: Mapping[str, htpasswd.StoredHash]
    policy: policyfile.Policy | None  # None: the default admin-prefix policy
    generation: int
    dummy: htpasswd.StoredHash = field(repr=False)
    robots: Mapping[str, Robot] = field(default_factory=dict)  # by account, robot+NAME
    # Users' and robots' stored secrets together: who may hold a token, and what a refresh
    # token's fingerprint is of. Made from the two.
    credentials: Mapping[str, htpasswd.StoredHash] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        robots_hashes = {account: robot.stored_hash() for account, robot in self.robots.items()}
        object.__setattr__(self, "credentials", MappingProxyType({**self.users, **robots_hashes}))

    def account(self, user: str) -> policyfile.Account:
        """The account's labels and expiry: a robot's own, or the policy's `users:` entry."""
        robot = self.robots.get(user)
        if robot is not None:
            return policyfile.Account(robot.account_labels(), robot.expires)
        return self.policy.account(user) if self.policy is not None else policyfile.NO_ACCOUNT


class StateError(ValueError):
    """Users and rules that cannot be used; each problem is tagged with its setting (htpasswd, policy)."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.by_key = problems
        self.problems = [message for _key, message in problems]
        super().__init__("; ".join(self.problems))


def _typical_bcrypt_cost(users: Mapping[str, htpasswd.StoredHash]) -> int:
    costs = Counter(c for h in users.values() if (c := h.bcrypt_cost) is not None)
    return costs.most_common(1)[0][0] if costs else DEFAULT_DUMMY_COST


class Built(NamedTuple):
    users: dict[str, htpasswd.StoredHash]
    policy: policyfile.Policy | None
    robots: dict[str, Robot]
    warnings: list[str]
    robots_problem: str | None  # the robots file could not be used (a reload): no robots run


def build(
    htpasswd_path: Path, policy_path: Path | None, robots_path: Path | None = None, robots_strict: bool = True
) -> Built:
    """Load the files and check them together. Raises StateError naming every problem. A robots
    file that cannot be used is one of them when `robots_strict` (at start, check-config);
    otherwise (a reload) it means no robots at all (`robots_problem`), while the other files
    load: a robots file unreadable to the gateway (made by root) must not keep a removed user,
    nor a hand-edit gone wrong keep a robot meant to be gone.

    The one place users and rules are loaded: at start-up, on reload, and by `check-config`.
    """
    problems: list[tuple[str, str]] = []
    warnings: list[str] = []
    users: dict[str, htpasswd.StoredHash] = {}
    try:
        parsed = htpasswd.parse(htpasswd_path.read_text(encoding="utf-8"))
        users.update(parsed.users)
        warnings.extend(f"{htpasswd_path}: {w}" for w in parsed.warnings)
    except (OSError, UnicodeDecodeError) as exc:
        problems.append(("htpasswd", describe_read_error(htpasswd_path, exc)))
    except htpasswd.HtpasswdError as exc:
        problems.append(("htpasswd", f"{htpasswd_path}: {exc}"))
    policy = None
    if policy_path is not None:
        try:
            policy = policyfile.load(policy_path)
            warnings.extend(f"{policy_path}: {w}" for w in policy.warnings)
        except policyfile.PolicyError as exc:
            problems.extend(("policy", f"{policy_path}: {p}") for p in exc.problems)
    if policy is not None:
        for name, stored in policy.users.items():
            if name in users:
                problems.append(("policy", f"{policy_path}: users.{name}: also in {htpasswd_path}; keep one"))
            users[name] = stored
    found: dict[str, Robot] = {}
    robots_problem = None
    if robots_path is not None:
        try:
            found = robots.read(robots_path)
        except robots.RobotsError as exc:
            if robots_strict:
                problems.append(("robots", str(exc)))
            else:
                robots_problem = str(exc)
    in_policy = {*policy.users, *policy.accounts} if policy is not None else set()
    for name in sorted({*users, *in_policy}):
        if robots.robot_name(name) is not None:
            where = "policy" if name in in_policy else "htpasswd"
            problems.append((where, f"{name!r}: names starting with {robots.PREFIX!r} are robots' alone"))
    if problems:
        raise StateError(problems)
    return Built(users, policy, found, warnings, robots_problem)


class AccessStore:
    """Holds the current Snapshot; `reload_if_changed` swaps in a new one when a file changed."""

    def __init__(
        self,
        htpasswd_path: Path,
        policy_path: Path | None = None,
        docker_auth_service: str | None = None,
        robots_path: Path | None = None,
    ) -> None:
        self.htpasswd_path = htpasswd_path
        self.policy_path = policy_path
        self.robots_path = robots_path
        # docker_auth matches `service` against what the client asked for: the registry's service,
        # which is token_service here. A docker_auth file without `service:` compares with that.
        self.docker_auth_service = docker_auth_service
        self._read_files: tuple[Path, ...] = ()  # what the policy read besides itself
        self._signatures = self._current_signatures()
        self._generation = 0
        # What runs, for the start-up log, /status and /readyz: when the files were last loaded,
        # what each was then (a hash of its bytes), and since when a refused reload left the
        # running configuration behind the files (None: it is what the files say).
        self.loaded_at = 0.0
        self.loaded_files: dict[str, tuple[Path, str]] = {}
        self.stale_since: float | None = None
        self.stale_problem: str | None = None
        self.snapshot = self._load(robots_strict=True)  # raises at start-up: refuse to run on bad files
        self._follow_read_files()
        self.reloads_ok = 0
        self.reloads_failed = 0
        # The watcher reloads from a thread, SIGHUP from the event loop: one at a time.
        self._reload_lock = threading.Lock()

    def _current_signatures(self) -> tuple[Signature, ...]:
        paths = (self.htpasswd_path, self.policy_path, self.robots_path, *self._read_files)
        return tuple(signature(path) for path in paths)

    def _follow_read_files(self) -> None:
        """After a load: the files the policy read are followed from now on. The three files' own
        signatures stay those taken before they were read, so a change while they were read is
        still seen as one."""
        self._signatures = self._signatures[:3] + tuple(signature(path) for path in self._read_files)

    def _settled(self, signatures: tuple[Signature, ...], force: bool) -> bool:
        """Whether the changed files have held still for SETTLE_SECONDS (in the watcher's thread:
        authn.Authenticator.reload_if_changed). A SIGHUP's reload waits a little longer for them,
        then reads them as they are: nothing else would ask again before the next poll."""
        for _ in range(FORCED_SETTLE_TRIES if force else 1):
            time.sleep(SETTLE_SECONDS)
            now = self._current_signatures()
            if now == signatures:
                return True
            signatures = now
        return force

    def _load(self, robots_strict: bool = False) -> Snapshot:
        users, policy, found, warnings, robots_problem = build(
            self.htpasswd_path, self.policy_path, self.robots_path, robots_strict
        )
        if (
            policy is not None
            and policy.docker_auth is not None
            and not policy.service_explicit
            and self.docker_auth_service is not None
        ):
            policy = dataclasses.replace(policy, service=self.docker_auth_service)
        for warning in warnings:
            log.warning("%s", warning)
        self._generation += 1
        self._read_files = policy.read_files if policy is not None else ()
        self.loaded_at = time.time()
        self.loaded_files = {
            key: (path, _content_hash(path))
            for key, path in (
                ("htpasswd", self.htpasswd_path),
                ("policy", self.policy_path),
                ("robots", self.robots_path),
            )
            if path is not None
        }
        self.stale_since = self.stale_problem = None
        if robots_problem is not None:
            # Loaded, but not what the robots file says: as stale as a refused reload.
            log.error("%s; no robot may log in until it is mended", robots_problem)
            self._went_stale(f"{self.robots_path}: cannot be used; no robots run until it is mended")
        dummy = htpasswd.make_dummy(_typical_bcrypt_cost(users))
        return Snapshot(MappingProxyType(users), policy, self._generation, dummy, MappingProxyType(found))

    def _went_stale(self, problem: str) -> None:
        self.stale_since = self.stale_since or time.time()
        self.stale_problem = problem

    def summary(self) -> str:
        """What runs, in words, for the start-up log (no secrets: counts and paths)."""
        snapshot = self.snapshot
        policy = snapshot.policy
        in_policy = len(policy.users) if policy is not None else 0
        said = [f"{len(snapshot.users) - in_policy} users from {self.htpasswd_path}"]
        if policy is None:
            said.append("the default policy (admin_prefix)")
        else:
            rules = f"{len(policy.acl)} rules, {len(policy.immutable)} immutable tag rules"
            said.append(f"{in_policy} static users, {rules} from {self.policy_path}")
        if self.robots_path is not None:
            said.append(f"{len(snapshot.robots)} robots from {self.robots_path}")
        return "; ".join(said)

    def use_docker_auth_service(self, service: str) -> None:
        """Once the settings are known (they may come from the docker_auth file itself)."""
        if self.docker_auth_service != service:
            self.docker_auth_service = service
            self.snapshot = self._load()

    def reload_if_changed(self, force: bool = False) -> bool:
        """Re-read the files if either changed (or when forced). True when a new snapshot is in place."""
        with self._reload_lock:
            return self._reload(force)

    def _reload(self, force: bool) -> bool:
        signatures = self._current_signatures()
        if signatures == self._signatures and not force:
            return False
        if signatures != self._signatures and not self._settled(signatures, force):
            log.info("a followed file is being written: read at the next check")
            return False
        signatures = self._current_signatures() if force else signatures
        self._signatures = signatures
        read_before = self._read_files
        try:
            snapshot = self._load()
        except StateError as exc:
            self.reloads_failed += 1
            self._went_stale("; ".join(exc.problems))
            for problem in exc.problems:
                log.error("reload refused, keeping the last good users and rules: %s", problem)
            return False
        except Exception as exc:  # a parser bug must not end the watcher, nor go uncounted
            self.reloads_failed += 1
            self._went_stale(f"{type(exc).__name__}: {exc}")
            files = str(self.htpasswd_path) + (f", {self.policy_path}" if self.policy_path else "")
            log.exception("reload of %s failed, keeping the last good users and rules: %s", files, exc)
            return False
        before = self.snapshot.policy.docker_auth if self.snapshot.policy is not None else None
        after = snapshot.policy.docker_auth if snapshot.policy is not None else None
        if before != after:
            # They stand for settings (listen, TLS, the token issuer...), which are set at start.
            log.warning(
                "%s: its server: and token: sections changed: they take effect at the next start "
                "(the rest of the file did now)",
                self.policy_path,
            )
        self.snapshot = snapshot
        if self._read_files != read_before:  # the policy now reads other files: follow those
            self._follow_read_files()
        self.reloads_ok += 1
        rules = "default policy" if snapshot.policy is None else f"{len(snapshot.policy.acl)} rules"
        log.info("reloaded: %d users, %s, %d robots", len(snapshot.users), rules, len(snapshot.robots))
        return True


def _content_hash(path: Path) -> str:
    """The first 16 hex digits of the file's SHA-256 (what /status shows as its signature); "-"
    when it cannot be read (a robots file not made yet)."""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    except OSError:
        return "-"
