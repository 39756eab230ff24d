"""Run a command with its own view of /etc/registry-gateway, leaving the machine's alone.

    python tests/etc_view.py --scratch EMPTY --decoy DIR -- COMMAND...  # /etc/registry-gateway is DIR
    python tests/etc_view.py --scratch EMPTY --absent -- COMMAND...     # there is none
    python tests/etc_view.py --hosts FILE -- COMMAND...                 # /etc/hosts is FILE

The command runs (as root) in a private mount namespace: /etc is an overlay whose upper layer is
a tmpfs of this namespace's own (mounted on the empty folder EMPTY), holding either an empty
folder (DIR is then bind-mounted on it) or a whiteout that hides the folder. So it works whether
or not the machine has the folder, never creates, changes or removes anything in the real /etc,
and every mount vanishes with the command. With --hosts, FILE is bind-mounted on /etc/hosts
in that namespace: a name the command (a private dockerd) resolves to an address of our choice.
What the tests use to prove that the suite neither reads nor writes an installed gateway's files,
and to see the CLI's defaults on a machine without them.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import stat
import subprocess
import sys
from pathlib import Path

CLONE_NEWNS = 0x00020000
FOLDER = Path("/etc/registry-gateway")


def _mount(*args: str) -> None:
    done = subprocess.run(["mount", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"etc_view: mount {' '.join(args)}: {done.stderr.strip()}")


def _mount_points() -> list[str]:
    """Mount points in mount order, unescaped as the kernel escapes them in mountinfo."""
    lines = Path("/proc/self/mountinfo").read_text().splitlines()
    return [line.split()[4].encode().decode("unicode_escape") for line in lines]


def enter_private_namespace() -> None:
    # Unshared in this process, not by a wrapper: nothing below can ever run in the caller's
    # namespace, where these mounts would change the machine's /etc.
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNS) != 0:
        error = ctypes.get_errno()
        raise SystemExit(f"etc_view: unshare(CLONE_NEWNS): {os.strerror(error)} (needs root)")
    _mount("--make-rprivate", "/")


def overlay_etc(layer: Path, decoy: Path | None) -> None:
    # Overlay's upper layer cannot be on an overlay (a container's root often is): a tmpfs of
    # this namespace's own, on `layer`, an empty folder of the caller's.
    _mount("-t", "tmpfs", "-o", "mode=0755", "etc-view", str(layer))
    upper, work, kept = layer / "upper", layer / "work", layer / "kept"
    for folder in (upper, work, kept):
        folder.mkdir()
    # Files mounted inside /etc (a container's /etc/hosts, /etc/resolv.conf) are not in the
    # lower layer: keep them aside and put them back on top of the overlay.
    submounts = [p for p in _mount_points() if p.startswith("/etc/") and not p.startswith(f"{FOLDER}/")]
    submounts = [p for p in submounts if p != str(FOLDER)]
    for index, point in enumerate(submounts):
        aside = kept / str(index)
        if Path(point).is_dir():
            aside.mkdir()
        else:
            aside.touch()
        _mount("--bind", point, str(aside))
    target = upper / FOLDER.name
    if decoy is None:
        os.mknod(target, stat.S_IFCHR | 0o600, os.makedev(0, 0))  # overlay's whiteout: "absent"
    else:
        target.mkdir()
    _mount("-t", "overlay", "overlay", "-o", f"lowerdir=/etc,upperdir={upper},workdir={work}", "/etc")
    for index, point in enumerate(submounts):
        _mount("--move", str(kept / str(index)), point)
    if decoy is not None:
        _mount("--bind", str(decoy), str(FOLDER))


def command(scratch: Path, decoy: Path | None) -> list[str]:
    """The command line to prefix a command with: /etc/registry-gateway is `decoy`, or absent
    when None. `scratch` (created) is where this view's own layer is mounted."""
    scratch.mkdir(parents=True, exist_ok=True)
    chosen = ["--decoy", str(decoy)] if decoy is not None else ["--absent"]
    return [sys.executable, str(Path(__file__).resolve()), "--scratch", str(scratch), *chosen, "--"]


def hosts_command(hosts: Path) -> list[str]:
    """The command line to prefix a command with: its /etc/hosts is `hosts`."""
    return [sys.executable, str(Path(__file__).resolve()), "--hosts", str(hosts.resolve()), "--"]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--scratch", type=Path, help="an empty folder to mount a tmpfs on")
    choice = parser.add_mutually_exclusive_group(required=True)
    choice.add_argument("--decoy", type=Path, help="folder to show as /etc/registry-gateway")
    choice.add_argument("--absent", action="store_true", help="show no /etc/registry-gateway")
    choice.add_argument("--hosts", type=Path, help="file to show as /etc/hosts")
    parser.add_argument("command", nargs="+")
    args = parser.parse_args(argv)
    if (args.hosts is None) == (args.scratch is None):
        parser.error("--scratch goes with --decoy and --absent, and not with --hosts")
    enter_private_namespace()
    if args.hosts is not None:
        _mount("--bind", str(args.hosts.resolve()), "/etc/hosts")
    else:
        overlay_etc(args.scratch.resolve(), args.decoy.resolve() if args.decoy is not None else None)
    os.execvp(args.command[0], args.command)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
