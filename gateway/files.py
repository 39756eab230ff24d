"""The files the gateway reads and appends to: why one cannot be read or written, in words an
operator can act on, and whether one changed since last looked at (every file it follows is polled
this way); and how the files it writes (htpasswd, token keys) are replaced.

The container runs as uid 10001: an htpasswd file made under umask 077 (mode 0600, owned by
root) is unreadable to it, and "[Errno 13] Permission denied" alone does not say who needs access.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from pathlib import Path

# Inode, size, modification and change times: an editor's rename, a rewrite in place and a
# chmod all change it.
Signature = tuple[int, int, int, int] | None


def signature(path: Path | None) -> Signature:
    if path is None:
        return None
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def describe_read_error(path: Path, exc: OSError | UnicodeDecodeError) -> str:
    if isinstance(exc, UnicodeDecodeError):
        return f"{path}: not UTF-8 text"
    if isinstance(exc, FileNotFoundError):
        return f"no such file: {path}"
    if isinstance(exc, IsADirectoryError):
        return f"{path} is a directory, not a file"
    if isinstance(exc, PermissionError):
        try:
            st = path.stat()
            owner = f"mode {stat.S_IMODE(st.st_mode):04o}, owner uid {st.st_uid} gid {st.st_gid}"
        except OSError:
            owner = "its folder is not searchable"
        return (
            f"{path}: permission denied for {_runs_as()} ({owner}); make it readable by that user,"
            f" for example: chmod 644 {path}"
        )
    return f"{path}: cannot read: {exc.strerror or exc}"


def _exists(path: Path) -> bool:
    """Whether `path` exists; False too when a directory on the way cannot be searched."""
    try:
        return path.exists()
    except OSError:
        return False


def _runs_as() -> str:
    return f"uid {os.geteuid()} (gid {os.getegid()}), which the gateway runs as"


def describe_write_error(path: Path, exc: OSError) -> str:
    """Why `path` cannot be opened to append to, from the error that opening it raised."""
    if isinstance(exc, FileNotFoundError):
        return f"no such directory: {path.parent} (create it, or choose a path in a directory that exists)"
    if isinstance(exc, NotADirectoryError):
        return f"{path.parent} is not a directory"
    if isinstance(exc, IsADirectoryError):
        return f"{path} is a directory, not a file"
    if isinstance(exc, PermissionError):
        if _exists(path):
            return f"{path}: permission denied for {_runs_as()}; make the file writable by that user"
        return (
            f"cannot create {path}: permission denied for {_runs_as()}; make {path.parent} writable"
            " by that user"
        )
    return f"{path}: cannot write: {exc.strerror or exc}"


def append_problem(path: Path) -> str | None:
    """Why the gateway could not append to `path` (creating it if missing), in words, or None.

    Leaves no trace, since `check-config` asks too: an existing file is opened for appending and
    closed unchanged; for a missing one only its directory is looked at, and the file is not made.
    """
    try:
        if _exists(path):
            path.open("ab").close()
            return None
        directory = path.parent
        if not directory.exists():
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(path))
        if not directory.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(path))
        # The effective ids, as open() would use them (a setuid start, or a container's --user).
        if not os.access(directory, os.W_OK | os.X_OK, effective_ids=os.access in os.supports_effective_ids):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
    except OSError as exc:
        return describe_write_error(path, exc)
    return None


def replace_atomically(path: Path, data: bytes, *, mode: int | None = None, new_mode: int = 0o640) -> None:
    """`path` holds `data` at once: readers see the old file or the new one, never a part, and a
    crash leaves one of them whole (file and folder fsynced). The file gets `mode`, or keeps the
    mode it had (`new_mode` when new), set before a byte is written; an existing file keeps its
    owner, as far as we may set it: a key owned by the container's user and rotated by root must
    stay readable to that user. A symlink is followed: the file it points to is replaced, and the
    link stays a link (an htpasswd file linked from a shared folder)."""
    target = Path(os.path.realpath(path))
    try:
        st: os.stat_result | None = target.stat()
    except FileNotFoundError:
        st = None
    if mode is None:
        mode = stat.S_IMODE(st.st_mode) if st is not None else new_mode
    fd, temporary = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)  # mode 0600
    try:
        with os.fdopen(fd, "wb") as out:
            os.fchmod(out.fileno(), mode)
            if st is not None:
                # Not ours to set (not root, or an owner a user namespace does not map): left,
                # and then the group's bits go, as they would be another group's.
                with contextlib.suppress(OSError):
                    os.fchown(out.fileno(), st.st_uid, st.st_gid)
                if os.fstat(out.fileno()).st_gid != st.st_gid:
                    os.fchmod(out.fileno(), mode & ~0o070)
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    folder = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
