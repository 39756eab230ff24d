"""`registry-gateway user ...` and `policy ...` as an operator runs them."""

from __future__ import annotations

import os
import pty
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.conftest import htpasswd_add, require


def cli(*args: str, stdin: str = "", env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    environment.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        env=environment,
    )


def apache_verifies(path: Path, user: str, password: str) -> bool:
    result = subprocess.run(
        [require("htpasswd"), "-v", "-i", str(path), user], input=password.encode(), capture_output=True
    )
    return result.returncode == 0


def test_add_passwd_verify_remove_round_trip_with_apache(tmp_path: Path) -> None:
    users = tmp_path / "htpasswd"
    added = cli(
        "user", "add", "alice", "--file", str(users), "--password-stdin", "--cost", "5", stdin="first pw\n"
    )
    assert added.returncode == 0, added.stderr
    assert apache_verifies(users, "alice", "first pw")
    assert not apache_verifies(users, "alice", "other")

    again = cli("user", "add", "alice", "--file", str(users), "--password-stdin", stdin="x\n")
    assert again.returncode == 2 and "already exists" in again.stderr

    changed = cli(
        "user",
        "passwd",
        "alice",
        "--file",
        str(users),
        "--password-stdin",
        "--cost",
        "5",
        stdin="second pw\n",
    )
    assert changed.returncode == 0, changed.stderr
    assert apache_verifies(users, "alice", "second pw")
    assert (
        cli(
            "user", "verify", "alice", "--file", str(users), "--password-stdin", stdin="second pw\n"
        ).returncode
        == 0
    )
    assert (
        cli(
            "user", "verify", "alice", "--file", str(users), "--password-stdin", stdin="first pw\n"
        ).returncode
        == 1
    )

    assert (
        cli("user", "passwd", "nobody", "--file", str(users), "--password-stdin", stdin="x\n").returncode == 2
    )
    assert cli("user", "remove", "alice", "--file", str(users)).returncode == 0
    assert "alice" not in users.read_text()
    assert cli("user", "remove", "alice", "--file", str(users)).returncode == 2


def test_default_cost_is_ten_and_list_flags_weak_hashes(tmp_path: Path) -> None:
    users = tmp_path / "htpasswd"
    assert (
        cli("user", "add", "strong", "--file", str(users), "--password-stdin", stdin="pw\n").returncode == 0
    )
    assert users.read_text().startswith("strong:$2b$10$")
    htpasswd_add(users, "md5user", "pw", "-m")
    listed = cli("user", "list", "--file", str(users))
    assert listed.returncode == 0
    lines = dict(line.split("\t", 1) for line in listed.stdout.splitlines())
    assert lines["strong"] == "bcrypt cost 10"
    assert lines["md5user"].startswith("apr1") and "WEAK" in lines["md5user"]


def test_comments_unknown_lines_mode_and_owner_kept(tmp_path: Path) -> None:
    users = tmp_path / "htpasswd"
    htpasswd_add(users, "keep", "pw", "-B")
    users.write_text("# managed by ops\n" + users.read_text() + "\n# trailing note\n")
    users.chmod(0o604)
    before = users.stat()
    assert (
        cli(
            "user", "add", "new", "--file", str(users), "--password-stdin", "--cost", "4", stdin="pw\n"
        ).returncode
        == 0
    )
    text = users.read_text()
    assert text.startswith("# managed by ops\nkeep:$2y$")
    assert "# trailing note" in text
    after = users.stat()
    assert stat.S_IMODE(after.st_mode) == 0o604
    assert (after.st_uid, after.st_gid) == (before.st_uid, before.st_gid)
    assert after.st_ino != before.st_ino  # replaced by rename, never rewritten in place


def test_another_owner_and_a_symlinked_file_are_kept(tmp_path: Path) -> None:
    """An htpasswd file owned by the gateway's user (uid 10001 in the container), edited by root,
    stays that user's; a file reached through a symlink is replaced where it lies, the link kept."""
    shared = tmp_path / "shared"
    shared.mkdir()
    real = shared / "htpasswd"
    htpasswd_add(real, "keep", "pw", "-B")
    real.chmod(0o640)
    owner = (10001, 10001) if os.geteuid() == 0 else (os.getuid(), os.getgid())
    os.chown(real, *owner)
    link = tmp_path / "htpasswd"
    link.symlink_to(real)
    added = cli("user", "add", "new", "--file", str(link), "--password-stdin", "--cost", "4", stdin="pw\n")
    assert added.returncode == 0, added.stderr
    assert link.is_symlink() and link.resolve() == real
    assert apache_verifies(real, "new", "pw") and apache_verifies(real, "keep", "pw")
    after = real.stat()
    assert (after.st_uid, after.st_gid) == owner and stat.S_IMODE(after.st_mode) == 0o640
    assert sorted(p.name for p in shared.iterdir()) == ["htpasswd", "htpasswd.lock"]


def test_a_password_line_ending_in_crlf_is_read_as_docker_reads_it(tmp_path: Path) -> None:
    users = tmp_path / "htpasswd"
    added = cli("user", "add", "win", "--file", str(users), "--password-stdin", "--cost", "4", stdin="pw\r\n")
    assert added.returncode == 0, added.stderr
    assert apache_verifies(users, "win", "pw") and not apache_verifies(users, "win", "pw\r")


def test_password_never_from_argv_and_terminal_prompt(tmp_path: Path) -> None:
    users = tmp_path / "htpasswd"
    no_tty = cli("user", "add", "alice", "--file", str(users), stdin="")
    assert no_tty.returncode == 2 and "--password-stdin" in no_tty.stderr
    assert not users.exists()

    # On a terminal: asked twice, without echo; a mismatch is refused.
    pid, fd = pty.fork()
    if pid == 0:  # child: run the CLI on the pty
        os.execv(
            sys.executable,
            [sys.executable, "-m", "gateway", "user", "add", "bob", "--file", str(users), "--cost", "4"],
        )
    transcript = b""
    for answer in (b"tty secret\n", b"tty secret\n"):
        while b"assword: " not in transcript.split(b"\n")[-1]:
            transcript += os.read(fd, 1024)
        os.write(fd, answer)
        transcript += os.read(fd, 1024)
    while True:
        try:
            chunk = os.read(fd, 1024)
        except OSError:
            break
        if not chunk:
            break
        transcript += chunk
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, transcript
    assert b"tty secret" not in transcript  # not echoed
    assert apache_verifies(users, "bob", "tty secret")


def on_a_terminal(args: list[str], keys: list[bytes]) -> tuple[int, str]:
    """Run the CLI on a pty, typing each of `keys` once its next password prompt is shown; its
    exit status and all it showed on the terminal."""
    pid, fd = pty.fork()
    if pid == 0:  # child: run the CLI on the pty, Ctrl-C interrupting it whatever pytest inherited
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.execv(sys.executable, [sys.executable, "-m", "gateway", *args])
    transcript = b""
    deadline = time.monotonic() + 60
    try:
        for prompts, key in enumerate(keys, start=1):
            # Typed before its prompt, a key could be discarded (getpass flushes the terminal's input).
            while transcript.count(b"assword: ") < prompts:
                assert time.monotonic() < deadline, transcript
                if select.select([fd], [], [], 1)[0]:
                    transcript += os.read(fd, 1024)
            os.write(fd, key)
        while time.monotonic() < deadline:
            if not select.select([fd], [], [], 1)[0]:
                continue
            try:
                chunk = os.read(fd, 1024)
            except OSError:  # EIO: the child has exited and closed the terminal
                break
            if not chunk:
                break
            transcript += chunk
    finally:
        exited, status = os.waitpid(pid, os.WNOHANG)
        if exited == 0:
            os.kill(pid, signal.SIGKILL)  # a hung CLI fails the test, never the suite
            _, status = os.waitpid(pid, 0)
        os.close(fd)
    return os.waitstatus_to_exitcode(status), transcript.decode(errors="replace")


def test_ctrl_c_or_ctrl_d_at_the_password_prompt_is_one_line(tmp_path: Path) -> None:
    users = tmp_path / "htpasswd"
    add = ["user", "add", "bob", "--file", str(users), "--cost", "4"]
    # \x03 and \x04 are what the terminal turns Ctrl-C (SIGINT) and Ctrl-D (end of input) into.
    status, shown = on_a_terminal(add, [b"\x03"])
    assert status == 130, shown
    assert "Traceback" not in shown and "KeyboardInterrupt" not in shown
    assert "registry-gateway user: interrupted (Ctrl-C) at the password prompt: nothing changed" in shown
    status, shown = on_a_terminal(add, [b"a secret\n", b"\x04"])
    assert status == 1 and "Traceback" not in shown and "EOFError" not in shown, shown
    assert "registry-gateway user: end of input (Ctrl-D) at the password prompt: nothing changed" in shown
    assert not users.exists()

    htpasswd_add(users, "bob", "old-pw")
    before = users.read_bytes()
    passwd = ["user", "passwd", "bob", "--file", str(users), "--cost", "4"]
    for keys, expected in (([b"\x04"], 1), ([b"new secret\n", b"\x03"], 130)):
        status, shown = on_a_terminal(passwd, keys)
        assert status == expected and "Traceback" not in shown, shown
        assert shown.strip().splitlines()[-1].startswith("registry-gateway user: "), shown
    assert users.read_bytes() == before


def test_refuses_bad_names_and_long_passwords(tmp_path: Path) -> None:
    users = tmp_path / "htpasswd"
    for name in ("a:b", "", " lead", "#x", "tab\tname"):
        result = cli("user", "add", name, "--file", str(users), "--password-stdin", stdin="pw\n")
        assert result.returncode == 2, name
    long = cli("user", "add", "x", "--file", str(users), "--password-stdin", stdin="p" * 73 + "\n")
    assert long.returncode == 2 and "72 bytes" in long.stderr
    assert not users.exists() or "x:" not in users.read_text()


def test_concurrent_adds_lose_no_user(tmp_path: Path) -> None:
    users = tmp_path / "htpasswd"
    names = [f"user{i}" for i in range(16)]

    def add(name: str) -> int:
        return cli(
            "user", "add", name, "--file", str(users), "--password-stdin", "--cost", "4", stdin=f"{name}-pw\n"
        ).returncode

    with ThreadPoolExecutor(max_workers=8) as pool:
        assert list(pool.map(add, names)) == [0] * len(names)
    for name in names:
        assert apache_verifies(users, name, f"{name}-pw"), name


def test_uses_configured_htpasswd(tmp_path: Path) -> None:
    users = tmp_path / "configured"
    result = cli(
        "user",
        "add",
        "carol",
        "--password-stdin",
        "--cost",
        "4",
        stdin="pw\n",
        env={"GATEWAY_HTPASSWD": str(users)},
    )
    assert result.returncode == 0, result.stderr
    assert apache_verifies(users, "carol", "pw")


POLICY = textwrap.dedent("""\
    acl:
      - match: {account: "/^admin/"}
        actions: ["*"]
        comment: admins
      - match: {account: "/.+/", name: "dev-${labels:team}/*"}
        actions: [pull, push]
        comment: team repositories
      - match: {account: "/.+/", name: "library/*"}
        actions: [pull]
        comment: everyone reads library
      - match: {account: "", name: "public/*"}
        actions: [pull]
    accounts:
      alice: {labels: {team: [x]}}
      gone: {expires: 2001-01-01}
""")


def test_policy_explain(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yml"
    policy.write_text(POLICY)
    cases = [
        (("alice", "dev-x/app", "push"), 0, "ALLOWED: alice push dev-x/app: by acl[1] (team repositories)"),
        (("alice", "dev-y/app", "push"), 1, "DENIED: alice push dev-y/app: no rule matched"),
        (
            ("alice", "library/busybox", "push"),
            1,
            "DENIED: alice push library/busybox: acl[2] (everyone reads library) matched"
            " but does not grant push",
        ),
        (("", "public/x", "pull"), 0, "ALLOWED: anonymous pull public/x: by acl[3]"),
        (("gone", "library/x", "pull"), 1, "DENIED: gone: account expired"),
    ]
    # explain looks the user up in the configured htpasswd file: this test's own, never the machine's.
    users = {"GATEWAY_HTPASSWD": str(tmp_path / "htpasswd")}
    for args, code, expected in cases:
        result = cli("policy", "explain", *args, "--policy", str(policy), env=users)
        assert result.returncode == code, (args, result.stdout, result.stderr)
        assert result.stdout.startswith(expected), (args, result.stdout)


def test_policy_check_reports_every_problem_and_dead_rules(tmp_path: Path) -> None:
    dead = tmp_path / "dead.yml"
    dead.write_text(
        "acl:\n  - match: {account: alice}\n    actions: [pull]\n"
        "  - match: {account: alice, name: 'x/*'}\n    actions: ['*']\n"
    )
    checked = cli("policy", "check", "--policy", str(dead))
    assert checked.returncode == 0
    assert "acl[1]: can never match: acl[0] matches every request it would" in checked.stderr

    bad = tmp_path / "bad.yml"
    bad.write_text(
        "acl:\n  - match: {name: '/(/'}\n    actions: [pull]\n  - match: {acount: x}\n    actions: [fly]\n"
    )
    result = cli("policy", "check", "--policy", str(bad))
    assert result.returncode == 2
    assert "acl[0].match.name: invalid regex" in result.stderr
    assert "acl[1].match.acount: unknown key" in result.stderr
    assert "acl[1].actions: unknown action 'fly'" in result.stderr

    via_env = cli("policy", "check", env={"GATEWAY_POLICY": str(dead)})
    assert via_env.returncode == 0


def test_a_group_that_cannot_be_kept_loses_its_bits(tmp_path: Path) -> None:
    """Replaced by a user who may not give the file its group back (not root, not a member), the
    file would have the same mode for the user's own group: the group's bits go instead."""
    if os.geteuid() != 0:
        raise AssertionError("needs root to make a file of another group")
    folder = Path(tempfile.mkdtemp(prefix="gateway-group-"))
    try:
        folder.chmod(0o777)
        secret = folder / "token.pem"
        secret.write_text("old\n")
        os.chown(secret, 65534, 0)  # owned by nobody, of root's group
        secret.chmod(0o640)
        script = (
            "import sys; from pathlib import Path; from gateway.files import replace_atomically; "
            "replace_atomically(Path(sys.argv[1]), b'new\\n')"
        )
        command = [require("setpriv"), "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable]
        root = Path(__file__).parent.parent
        done = subprocess.run([*command, "-c", script, str(secret)], capture_output=True, text=True, cwd=root)
        assert done.returncode == 0, done.stderr
        after = secret.stat()
        assert secret.read_text() == "new\n" and after.st_gid == 65534
        assert stat.S_IMODE(after.st_mode) == 0o600
    finally:
        shutil.rmtree(folder)
