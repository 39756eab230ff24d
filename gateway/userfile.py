"""Changing an htpasswd file safely: locked against concurrent runs, written atomically, lines kept.

Every change takes an exclusive lock on a `FILE.lock` beside the file (the file itself is replaced
on each write, so a lock on it would not serialise writers), re-reads the file under the lock,
changes only the line of the user concerned, and replaces the file atomically with its mode and
ownership kept (files.replace_atomically; a symlinked file is replaced where it lies). Comments,
blank lines and lines we do not understand are kept as they were.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import bcrypt

from gateway import htpasswd
from gateway.files import replace_atomically

# Go's bcrypt.DefaultCost and what distribution's docs use: about 50 ms a check on a 2-core
# machine. The gateway caches verified logins, so the cost is paid once per login, not per request;
# `htpasswd -B` defaults to 5, which is too cheap to slow down an offline guesser.
DEFAULT_COST = 10
MIN_COST, MAX_COST = 4, 17  # the range Apache's htpasswd accepts
_NAME = re.compile(r"[^:\s\x00-\x1f\x7f#][^:\x00-\x1f\x7f]{0,254}")


class UserFileError(Exception):
    pass


def check_name(name: str) -> None:
    if not _NAME.fullmatch(name) or name != name.strip():
        raise UserFileError(
            f"invalid user name {name!r}: 1-255 characters, no colon, no control characters, "
            "no leading '#' or surrounding spaces"
        )


def check_password(password: str) -> None:
    if not password:
        raise UserFileError("empty password")
    if len(password.encode("utf-8")) > htpasswd.BCRYPT_MAX_PASSWORD_BYTES:
        raise UserFileError("bcrypt reads only the first 72 bytes of a password: choose a shorter one")


def hash_password(password: str, cost: int = DEFAULT_COST) -> str:
    if not MIN_COST <= cost <= MAX_COST:
        raise UserFileError(f"cost must be between {MIN_COST} and {MAX_COST}")
    check_password(password)
    return bcrypt.hashpw(password.encode("utf-8"), bcrypt.gensalt(cost)).decode("ascii")


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    # Beside the file itself, not beside a symlink to it: every writer takes the same lock.
    real = Path(os.path.realpath(path))
    lock_path = real.with_name(real.name + ".lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _user_of(line: str) -> str | None:
    stripped = line.strip()
    if not stripped or stripped.startswith("#") or ":" not in stripped:
        return None
    return stripped.partition(":")[0]


def change(path: Path, edit: Callable[[list[str]], list[str]], *, create: bool = False) -> None:
    """Apply `edit` to the file's lines under the lock, and write the result atomically."""
    with locked(path):
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            if not create:
                raise UserFileError(f"{path}: no such file (add a first user to create it)") from None
            text = ""
        lines = text.splitlines()
        new_lines = edit(lines)
        replace_atomically(path, "".join(line + "\n" for line in new_lines).encode("utf-8"))


def set_user(path: Path, name: str, hashed: str, *, must_exist: bool | None) -> None:
    """Add or replace a user's line. must_exist: True (passwd), False (add), None (either)."""

    def edit(lines: list[str]) -> list[str]:
        found = False
        out = []
        for line in lines:
            if _user_of(line) == name:
                if must_exist is False:
                    raise UserFileError(f"user {name!r} already exists (use passwd to change it)")
                if not found:
                    out.append(f"{name}:{hashed}")
                found = True
            else:
                out.append(line)
        if not found:
            if must_exist:
                raise UserFileError(f"no user {name!r}")
            out.append(f"{name}:{hashed}")
        return out

    change(path, edit, create=must_exist is not True)


def remove_user(path: Path, name: str) -> None:
    def edit(lines: list[str]) -> list[str]:
        out = [line for line in lines if _user_of(line) != name]
        if len(out) == len(lines):
            raise UserFileError(f"no user {name!r}")
        return out

    change(path, edit)


def read_users(path: Path) -> htpasswd.HtpasswdFile:
    try:
        return htpasswd.parse(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserFileError(f"{path}: no such file") from None
    except (htpasswd.HtpasswdError, UnicodeDecodeError) as exc:
        raise UserFileError(f"{path}: {exc}") from None
