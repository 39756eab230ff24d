"""Ordinary mistakes an operator makes: each gets a message that names the problem and the way out,
and an exit status, never a traceback."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from tests import etc_view
from tests.conftest import (
    Registry,
    free_port,
    htpasswd_add,
    http_request,
    require,
    start_gateway,
    stop,
)
from tests.test_operations import issue_cert, make_ca

ROOT = Path(__file__).parent.parent


def gateway_cli(
    *args: str,
    env: dict[str, str] | None = None,
    stdin: str = "",
    timeout: float = 60,
    wrapper: Sequence[str] = (),
) -> tuple[int, str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    environment.update(env or {})
    done = subprocess.run(
        [*wrapper, sys.executable, "-m", "gateway", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=environment,
        timeout=timeout,
    )
    output = done.stdout + done.stderr
    assert "Traceback" not in output, output
    return done.returncode, output


@pytest.fixture
def users(tmp_path: Path) -> Path:
    path = tmp_path / "htpasswd"
    htpasswd_add(path, "admin", "admin-pw")
    return path


@pytest.fixture
def listening() -> Iterator[str]:
    """An address something else already listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield f"127.0.0.1:{sock.getsockname()[1]}"


@pytest.mark.parametrize("key", ["listen", "metrics_listen", "redirect_listen"])
def test_port_in_use_is_one_line_naming_the_setting(
    tmp_path: Path, users: Path, listening: str, key: str
) -> None:
    env = {"GATEWAY_HTPASSWD": str(users), "GATEWAY_UPSTREAM": "http://127.0.0.1:9"}
    env["GATEWAY_LISTEN"] = f"127.0.0.1:{free_port()}"
    env[f"GATEWAY_{key.upper()}"] = listening
    if key == "redirect_listen":
        make_ca(tmp_path)
        issue_cert(tmp_path, "server", "01")
        env.update(
            GATEWAY_TLS_CERT=str(tmp_path / "server.crt"), GATEWAY_TLS_KEY=str(tmp_path / "server.key")
        )
    status, output = gateway_cli("serve", env=env)
    assert status == 2
    assert f"{key}: cannot listen on {listening}" in output and "address already in use" in output
    assert "Unclosed" not in output


def test_a_first_worker_that_cannot_start_stops_the_supervisor_with_its_line(
    users: Path, listening: str
) -> None:
    """With workers, the address is bound by each worker: the first that cannot start stops them
    all, and the supervisor exits 2 with that worker's one line, as a single process would."""
    env = {"GATEWAY_HTPASSWD": str(users), "GATEWAY_UPSTREAM": "http://127.0.0.1:9"}
    env.update(GATEWAY_LISTEN=listening, GATEWAY_WORKERS="2")
    status, output = gateway_cli("serve", env=env)
    assert status == 2
    assert f"listen: cannot listen on {listening}" in output and "address already in use" in output
    assert "a worker could not start: stopping all workers" in output
    assert "Traceback" not in output


def test_demo_refuses_busy_ports_and_names_the_option(tmp_path: Path, listening: str) -> None:
    require("docker-registry")
    status, output = gateway_cli(
        "demo",
        "--data",
        str(tmp_path / "demo"),
        "--registry-listen",
        listening,
        "--listen",
        f"127.0.0.1:{free_port()}",
    )
    assert status == 2 and f"{listening} is in use" in output and "--registry-listen" in output
    status, output = gateway_cli(
        "demo",
        "--data",
        str(tmp_path / "demo"),
        "--registry-listen",
        f"127.0.0.1:{free_port()}",
        "--listen",
        listening,
    )
    assert status == 2 and f"{listening} is in use" in output and "--listen" in output


IMPOSSIBLE_DATE = """\
acl:
  - match: {account: "alice"}
    actions: ["pull"]
accounts:
  alice: {expires: 2027-13-31}
"""


def test_impossible_date_is_a_key_path_error(tmp_path: Path, users: Path) -> None:
    policy = tmp_path / "policy.yml"
    policy.write_text(IMPOSSIBLE_DATE)
    status, output = gateway_cli("policy", "check", "--policy", str(policy))
    assert status == 2 and "accounts.alice.expires: expected a date" in output
    status, output = gateway_cli(
        "serve", "--htpasswd", str(users), "--policy", str(policy), "--listen", f"127.0.0.1:{free_port()}"
    )
    assert status == 2 and "accounts.alice.expires" in output


def test_reload_of_an_impossible_date_names_the_policy_and_counts(
    tmp_path: Path, registry: Registry, users: Path
) -> None:
    policy = tmp_path / "policy.yml"
    policy.write_text(IMPOSSIBLE_DATE.replace("2027-13-31", "2027-12-31"))
    metrics = f"127.0.0.1:{free_port()}"
    gateway = start_gateway(
        tmp_path, registry.url, users, "--policy", str(policy), "--metrics-listen", metrics
    )
    try:
        policy.write_text(IMPOSSIBLE_DATE)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and "reload refused" not in gateway.log.read_text():
            time.sleep(0.1)
        log = gateway.log.read_text()
        assert (
            f"reload refused, keeping the last good users and rules: {policy}: accounts.alice.expires" in log
        )
        assert "Traceback" not in log and "htpasswd reload failed" not in log
        with urllib.request.urlopen(f"http://{metrics}/metrics") as response:
            text = response.read().decode()
        assert 'registry_gateway_reloads_total{result="failure"} 1.0' in text
        assert http_request(gateway.host, "GET", "/v2/", ("admin", "admin-pw"))[0] == 200
    finally:
        stop(gateway.process)


def test_duplicate_and_unknown_keys(tmp_path: Path, users: Path) -> None:
    settings = tmp_path / "gateway.yml"
    settings.write_text(f"htpasswd: {users}\nworkers: 1\nworkers: 2\n")
    # --htpasswd: a file that cannot be parsed names no htpasswd file; the default is the machine's.
    own_users = ("--htpasswd", str(users))
    status, output = gateway_cli("check-config", "--config", str(settings), *own_users)
    assert status == 1 and "duplicate key 'workers'" in output and str(settings) in output
    settings.write_text(f"htpasswd: {users}\nlisten_adress: 0.0.0.0:80\n")
    status, output = gateway_cli(
        "check-config", "--config", str(settings), *own_users, env={"GATEWAY_UPSTREEM": "x"}
    )
    assert status == 1
    assert "listen_adress: unknown key" in output and "did you mean 'listen'?" in output
    assert "GATEWAY_UPSTREEM: unknown environment variable (did you mean 'GATEWAY_UPSTREAM'?)" in output
    policy = tmp_path / "policy.yml"
    policy.write_text('acl:\n  - match: {acount: "alice"}\n    actions: ["pull"]\nacl: []\n')
    status, output = gateway_cli("policy", "check", "--policy", str(policy))
    assert status == 2 and "duplicate key 'acl'" in output
    policy.write_text('acl:\n  - match: {acount: "alice"}\n    actions: ["pull"]\n')
    status, output = gateway_cli("policy", "check", "--policy", str(policy))
    assert status == 2 and "acl[0].match.acount: unknown key (did you mean 'account'?)" in output


def test_tls_key_that_does_not_match_its_certificate(tmp_path: Path, users: Path) -> None:
    make_ca(tmp_path)
    issue_cert(tmp_path, "one", "01")
    issue_cert(tmp_path, "two", "02")
    env = {
        "GATEWAY_HTPASSWD": str(users),
        "GATEWAY_TLS_CERT": str(tmp_path / "one.crt"),
        "GATEWAY_TLS_KEY": str(tmp_path / "two.key"),
    }
    status, output = gateway_cli("check-config", env=env)
    assert (
        status == 1
        and f"the private key in {tmp_path / 'two.key'} does not belong to the certificate" in output
    )
    assert "PEM lib" not in output
    env["GATEWAY_TLS_KEY"] = str(users)
    status, output = gateway_cli("check-config", env=env)
    assert status == 1 and "holds no PEM private key" in output


@pytest.fixture
def open_folder() -> Iterator[Path]:
    """A folder of root's that any user may enter (pytest's own are root's alone)."""
    folder = Path(tempfile.mkdtemp(prefix="gw-perm-"))
    try:
        folder.chmod(0o755)
        yield folder
    finally:
        shutil.rmtree(folder)


def gateway_as_nobody(folder: Path, *args: str) -> tuple[int, str]:
    """The gateway as the container runs it, as a non-root uid (65534), in `folder`."""
    command = [require("setpriv"), "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable]
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    done = subprocess.run(
        [*command, "-m", "gateway", *args], capture_output=True, text=True, env=env, timeout=60, cwd=folder
    )
    output = done.stdout + done.stderr
    assert "Traceback" not in output, output
    return done.returncode, output


def test_unreadable_htpasswd_names_the_user_who_needs_it(users: Path, open_folder: Path) -> None:
    """As the container runs it: a non-root uid, a file made under umask 077."""
    secret = open_folder / "htpasswd"
    shutil.copy(users, secret)
    secret.chmod(0o600)
    status, output = gateway_as_nobody(open_folder, "check-config", "--htpasswd", str(secret))
    assert status == 1, output
    assert f"{secret}: permission denied for uid 65534 (gid 65534)" in output
    assert "mode 0600, owner uid 0" in output and f"chmod 644 {secret}" in output


def test_user_add_without_a_usable_file(tmp_path: Path) -> None:
    # The default location on a machine without it: seen in a private view of /etc, whatever this
    # machine's /etc/registry-gateway holds (a test never reads or writes an installed gateway's).
    no_default = etc_view.command(tmp_path / "etc-view", decoy=None)
    status, output = gateway_cli(
        "user", "add", "bob", "--password-stdin", stdin="a-long-password\n", wrapper=no_default
    )
    assert status == 2
    assert "/etc/registry-gateway/htpasswd (the htpasswd file, from the default) cannot be used" in output
    assert "--file PATH" in output and "mkdir -p /etc/registry-gateway" in output
    missing = tmp_path / "nowhere" / "htpasswd"
    status, output = gateway_cli(
        "user",
        "add",
        "bob",
        "--password-stdin",
        stdin="a-long-password\n",
        env={"GATEWAY_HTPASSWD": str(missing)},
    )
    assert status == 2 and "from GATEWAY_HTPASSWD" in output


def test_user_list_flags_cheap_bcrypt(tmp_path: Path) -> None:
    path = tmp_path / "htpasswd"
    htpasswd_add(path, "cheap", "pw-cheap", "-B")  # htpasswd -B: cost 5
    status, output = gateway_cli(
        "user", "add", "strong", "--file", str(path), "--password-stdin", stdin="pw-strong\n"
    )
    assert status == 0
    status, output = gateway_cli("user", "list", "--file", str(path))
    lines = dict(line.split("\t", 1) for line in output.strip().splitlines())
    assert "cost 5" in lines["cheap"] and "WEAK: cost below 10" in lines["cheap"]
    assert "cost 10" in lines["strong"] and "WEAK" not in lines["strong"]


def test_check_config_shows_origins_and_tries_the_registry(
    tmp_path: Path, registry: Registry, users: Path
) -> None:
    settings = tmp_path / "gateway.yml"
    settings.write_text(f"htpasswd: {users}\nworkers: 2\n")
    status, output = gateway_cli(
        "check-config", "--config", str(settings), env={"GATEWAY_UPSTREAM": registry.url}
    )
    assert status == 0
    assert f"upstream               {registry.url}  [environment GATEWAY_UPSTREAM]" in output
    assert (
        "workers                2  [file]" in output and "policy                 (none)  [default]" in output
    )
    assert f"the registry at {registry.url} answers" in output
    status, output = gateway_cli(
        "check-config", "--config", str(settings), env={"GATEWAY_UPSTREAM": f"http://127.0.0.1:{free_port()}"}
    )
    assert status == 0 and "warning: the registry" in output and "does not answer" in output


def test_sigterm_on_an_idle_gateway_exits_promptly(tmp_path: Path, registry: Registry, users: Path) -> None:
    gateway = start_gateway(tmp_path, registry.url, users)
    address, port = gateway.host.split(":")
    with socket.create_connection((address, int(port)), timeout=10) as idle:
        idle.sendall(f"GET /v2/ HTTP/1.1\r\nHost: {gateway.host}\r\n\r\n".encode())
        idle.recv(4096)  # an answered request; the connection stays open, kept alive
        started = time.monotonic()
        gateway.process.send_signal(signal.SIGTERM)
        gateway.process.wait(timeout=20)
        took = time.monotonic() - started
    assert gateway.process.returncode == 0
    assert took < 10, f"SIGTERM took {took:.1f} s on an idle gateway"
    assert "stopped after" in gateway.log.read_text()


def test_audit_log_that_cannot_be_written_is_refused_by_key(tmp_path: Path, users: Path) -> None:
    missing = tmp_path / "nodir" / "audit.log"
    base = ("--htpasswd", str(users), "--upstream", f"http://127.0.0.1:{free_port()}")
    status, output = gateway_cli("check-config", *base, "--audit-log", str(missing))
    assert status == 1, output
    assert f"audit_log (--audit-log): no such directory: {missing.parent}" in output
    assert "configuration OK" not in output
    status, output = gateway_cli(
        "serve", *base, "--listen", f"127.0.0.1:{free_port()}", "--audit-log", str(missing)
    )
    assert status == 2 and f"audit_log (--audit-log): no such directory: {missing.parent}" in output
    status, output = gateway_cli("check-config", *base, env={"GATEWAY_AUDIT_LOG": str(tmp_path)})
    assert status == 1 and f"audit_log (GATEWAY_AUDIT_LOG): {tmp_path} is a directory, not a file" in output
    status, output = gateway_cli("check-config", *base, "--audit-log", "-")  # standard output
    assert status == 0 and "audit_log              -  [flag --audit-log]" in output
    assert not missing.parent.exists()  # nothing made by the check


def test_audit_log_directory_not_writable_names_the_user(users: Path, open_folder: Path) -> None:
    """As the container runs it: a non-root uid, a log directory left to root."""
    readable = open_folder / "htpasswd"
    shutil.copy(users, readable)
    readable.chmod(0o644)
    audit = open_folder / "audit.log"
    check = ("check-config", "--htpasswd", str(readable), "--upstream", f"http://127.0.0.1:{free_port()}")
    status, output = gateway_as_nobody(open_folder, *check, "--audit-log", str(audit))
    assert status == 1, output
    assert f"audit_log (--audit-log): cannot create {audit}: permission denied for uid 65534" in output
    assert f"make {open_folder} writable by that user" in output
    assert not audit.exists()
    audit.touch(mode=0o644)  # there, but root's
    status, output = gateway_as_nobody(open_folder, *check, "--audit-log", str(audit))
    assert status == 1, output
    assert f"audit_log (--audit-log): {audit}: permission denied for uid 65534" in output
    assert audit.read_bytes() == b""
