"""The files the gateway reads: why one cannot be read, in words an operator can act on, and
whether one changed since last looked at (every file it follows is polled this way).

The container runs as uid 10001: an htpasswd file made under umask 077 (mode 0600, owned by
root) is unreadable to it, and "[Errno 13] Permission denied" alone does not say who needs access.
"""

from __future__ import annotations

import os
import stat
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
        uid, gid = os.geteuid(), os.getegid()
        try:
            st = path.stat()
            owner = f"mode {stat.S_IMODE(st.st_mode):04o}, owner uid {st.st_uid} gid {st.st_gid}"
        except OSError:
            owner = "its folder is not searchable"
        return (
            f"{path}: permission denied for uid {uid} (gid {gid}), which the gateway runs as "
            f"({owner}); make it readable by that user, for example: chmod 644 {path}"
        )
    return f"{path}: cannot read: {exc.strerror or exc}"
