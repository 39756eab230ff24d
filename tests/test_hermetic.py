"""The suite on a machine where the gateway is installed: it passes, and it neither reads nor writes
the machine's /etc/registry-gateway, nor runs whichever python3 PATH finds first.

The machine is simulated, never changed: tests/etc_view.py shows a decoy folder as
/etc/registry-gateway to one command, in a private mount namespace, whether or not the real one
exists. Linux's inotify reports every open, read and write of the decoy's files.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import struct
import subprocess
import sys
from pathlib import Path

from tests import etc_view
from tests.conftest import htpasswd_add

ROOT = Path(__file__).parent.parent

# The tests that run the CLI's commands that default to /etc/registry-gateway (user ... without
# --file, policy explain, check-config, healthcheck, serve), wherever they are, and the one that ran
# PATH's python3: chosen by name, so that a new test of these commands is in the selection too.
TESTS_THAT_RUN_THE_CLI = [
    "tests",
    f"--ignore={Path(__file__).relative_to(ROOT)}",
    "-m",
    "not image and not slow",
    "-k",
    "test_admin_cli or test_mistakes or test_config or explain or check_config or healthcheck or user_add",
]

IN_ALL_EVENTS = 0x00000FFF  # access, modify, attrib, open, close, create, delete, move
EVENT_NAMES = {
    0x1: "access",
    0x2: "modify",
    0x4: "attrib",
    0x8: "close-write",
    0x10: "close",
    0x20: "open",
    0x40: "moved-from",
    0x80: "moved-to",
    0x100: "create",
    0x200: "delete",
    0x400: "delete-self",
    0x800: "move-self",
}


class Watch:
    """What happens to the files of a folder (and the folder itself), as inotify reports it."""

    def __init__(self, folder: Path) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self.fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0 or libc.inotify_add_watch(self.fd, bytes(folder), IN_ALL_EVENTS) < 0:
            raise OSError(ctypes.get_errno(), "inotify")

    def events(self) -> list[str]:
        seen: list[str] = []
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return seen
            offset = 0
            while offset < len(data):
                _, mask, _, length = struct.unpack_from("iIII", data, offset)
                name = data[offset + 16 : offset + 16 + length].rstrip(b"\0").decode() or "."
                kinds = [kind for bit, kind in EVENT_NAMES.items() if mask & bit]
                seen.append(f"{name}: {'+'.join(kinds)}")
                offset += 16 + length

    def close(self) -> None:
        os.close(self.fd)


def contents(folder: Path) -> dict[str, str]:
    """Every file in `folder`, by name, as a hash of its bytes (and its mode)."""
    return {
        path.name: hashlib.sha256(path.read_bytes()).hexdigest() + f" {path.stat().st_mode:o}"
        for path in sorted(folder.iterdir())
    }


def the_machines_own() -> dict[str, str] | None:
    """The real /etc/registry-gateway, for a check that it too is left as it was. Stat, not read:
    a folder of an installed gateway may hold files root alone may read."""
    folder = etc_view.FOLDER
    if not folder.is_dir():
        return None
    return {
        path.name: f"{path.stat().st_size} {path.stat().st_mtime_ns} {path.stat().st_mode:o}"
        for path in sorted(folder.iterdir())
    }


def installed_gateway(folder: Path) -> Path:
    """A decoy of an installed gateway's folder: users the tests also use, with other passwords,
    and the settings file an operator's GATEWAY_CONFIG names."""
    folder.mkdir()
    users = folder / "htpasswd"
    for name in ("admin", "alice", "bob", "carol", "late"):
        htpasswd_add(users, name, f"{name}-installed-pw")
    users.chmod(0o640)
    (folder / "gateway.yml").write_text(
        "htpasswd: /etc/registry-gateway/htpasswd\nupstream: http://127.0.0.1:9\nworkers: 3\n"
    )
    return folder


def test_the_suite_leaves_an_installed_gateway_alone(tmp_path: Path) -> None:
    decoy = installed_gateway(tmp_path / "registry-gateway")
    before, machines = contents(decoy), the_machines_own()
    view = etc_view.command(tmp_path / "etc-view", decoy)
    # The shell of an operator of that machine: GATEWAY_CONFIG exported, a python3 first on PATH
    # without the gateway's packages (here one that fails, saying so).
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    for name in ("python3", "python"):
        (fake_bin / name).write_text('#!/bin/sh\necho "PATH\'s $0 ran: $*" >&2\nexit 97\n')
        (fake_bin / name).chmod(0o755)
    operator = {
        **os.environ,
        "GATEWAY_CONFIG": "/etc/registry-gateway/gateway.yml",
        "GATEWAY_HTPASSWD": "/etc/registry-gateway/htpasswd",
        "PATH": f"{fake_bin}:{os.environ['PATH']}",
    }
    watch = Watch(decoy)
    try:
        # The decoy is in place: the CLI with its defaults finds it, and the watch sees it read.
        listed = subprocess.run(
            [*view, sys.executable, "-m", "gateway", "user", "list"],
            env={k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert listed.returncode == 0, listed.stderr
        assert listed.stdout.splitlines()[0].startswith("admin\tbcrypt"), listed.stdout
        assert "htpasswd: open" in watch.events()

        pytest = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
        nested = subprocess.run(
            [*view, *pytest, "--basetemp", str(tmp_path / "nested"), *TESTS_THAT_RUN_THE_CLI],
            env=operator,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=900,
        )
        touched = watch.events()
    finally:
        watch.close()
    assert nested.returncode == 0, nested.stdout[-6000:] + nested.stderr[-2000:]
    assert touched == [], f"the tests opened, read or wrote the installed gateway's files: {touched}"
    assert contents(decoy) == before
    assert the_machines_own() == machines
