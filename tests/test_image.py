"""The container image and compose.yml, built and run as operators run them.

Built into the tests' private dockerd. `python:3.11-slim` and `registry:2` are used when present
or pullable; otherwise (no Docker Hub here) ../shared/tools/docker-standins.sh (or its copy in
tests/tools) builds faithful stand-ins first (about a minute). Marked `image`:
`pytest -m "not image"` leaves these out.
"""

from __future__ import annotations

import base64
import functools
import json
import os
import secrets
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import ldap_server
from tests.conftest import Registry, free_port, htpasswd_add, http_request, require
from tests.dockerd import Docker
from tests.image_build import IMAGE, ROOT
from tests.ldap_server import PASSWORDS as LDAP_PASSWORDS
from tests.test_ldap import ACL, ldap_section

pytestmark = pytest.mark.image

PASSWORDS = {"admin": "admin-secret-pw", "alice": "alice-secret-pw"}


def users_folder(mode: int = 0o644) -> Path:
    """A folder to mount at /etc/registry-gateway, with an htpasswd made as the README says."""
    folder = Path(tempfile.mkdtemp(prefix="gw-config-"))
    folder.chmod(0o755)
    for user, password in PASSWORDS.items():
        subprocess.run(
            [
                require("htpasswd"),
                "-i",
                "-B",
                "-C",
                "10",
                *(["-c"] if user == "admin" else []),
                str(folder / "htpasswd"),
                user,
            ],
            input=password.encode(),
            check=True,
            capture_output=True,
        )
    (folder / "htpasswd").chmod(mode)
    return folder


def wait_healthy(docker: Docker, config: Path, container: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    status = ""
    while time.monotonic() < deadline:
        status = docker.run(
            config, "inspect", "--format", "{{.State.Health.Status}}", container
        ).stdout.strip()
        if status == "healthy":
            return
        time.sleep(0.5)
    logs = docker.run(config, "logs", container)
    raise AssertionError(f"{container} is {status!r}, not healthy:\n{logs.stdout}{logs.stderr}")


def run_with_own_settings(image: Docker, config: Path, folder: Path, name: str) -> None:
    """Start the image in the background with `folder` at /etc/registry-gateway and its
    gateway.yml as the settings (as docs/operations.md says to replace the image's); back once healthy."""
    started = image.run(
        config, "run", "-d", "--name", name, "--network", "host", "--health-interval", "1s",
        "-v", f"{folder}:/etc/registry-gateway:ro",
        "-e", "GATEWAY_CONFIG=/etc/registry-gateway/gateway.yml",
        IMAGE,
    )  # fmt: skip
    assert started.returncode == 0, started.stderr
    wait_healthy(image, config, name)


def basic(user: str) -> tuple[str, str]:
    return user, PASSWORDS[user]


def test_image_runs_healthy_as_its_own_user(image: Docker, tmp_path: Path, registry: Registry) -> None:
    config = tmp_path / "docker-config"
    folder = users_folder()
    name = f"gw-{secrets.token_hex(4)}"
    port, metrics = free_port(), free_port()
    try:
        started = image.run(
            config, "run", "-d", "--name", name, "--network", "host", "--health-interval", "1s",
            "-v", f"{folder}:/etc/registry-gateway:ro",
            "-e", f"GATEWAY_LISTEN=127.0.0.1:{port}", "-e", f"GATEWAY_METRICS_LISTEN=127.0.0.1:{metrics}",
            "-e", f"GATEWAY_UPSTREAM={registry.url}",
            IMAGE,
        )  # fmt: skip
        assert started.returncode == 0, started.stderr
        wait_healthy(image, config, name)
        whoami = image.run(config, "exec", name, "id").stdout
        assert "uid=10001(gateway) gid=10001(gateway)" in whoami
        leftovers = image.run(
            config, "exec", name, "sh", "-c", "ls /tmp /opt/registry-gateway; pip list 2>/dev/null"
        )
        assert "src" not in leftovers.stdout.split() and "egg-info" not in leftovers.stdout
        assert http_request(f"127.0.0.1:{port}", "GET", "/v2/", basic("alice"))[0] == 200
        status, _, body = http_request(
            f"127.0.0.1:{port}", "POST", "/v2/alice/x/blobs/uploads/", basic("alice")
        )
        assert status == 403, body  # the image's default policy: names starting with admin may push
        # The audit log goes to standard output, one JSON object a line.
        audit = [line for line in image.run(config, "logs", name).stdout.splitlines() if line.startswith("{")]
        assert any(json.loads(line).get("user") == "alice" for line in audit)
    finally:
        image.run(config, "rm", "-f", name)
        shutil.rmtree(folder)


def test_a_config_file_of_ones_own_replaces_the_image_settings(
    image: Docker, tmp_path: Path, registry: Registry
) -> None:
    """Before, the image's ENV beat any mounted file: `listen` was ignored and `workers: 4`
    refused because of a `metrics_listen` the user never set."""
    config = tmp_path / "docker-config"
    folder = users_folder()
    port = free_port()
    (folder / "gateway.yml").write_text(
        f"listen: 127.0.0.1:{port}\nupstream: {registry.url}\n"
        "htpasswd: /etc/registry-gateway/htpasswd\nworkers: 2\n"
    )
    name = f"gw-{secrets.token_hex(4)}"
    try:
        run_with_own_settings(image, config, folder, name)  # no metrics: the healthcheck probes the listener
        assert http_request(f"127.0.0.1:{port}", "GET", "/v2/", basic("admin"))[0] == 200
    finally:
        image.run(config, "rm", "-f", name)
        shutil.rmtree(folder)


def test_unreadable_htpasswd_says_which_user_needs_it(image: Docker, tmp_path: Path) -> None:
    config = tmp_path / "docker-config"
    folder = users_folder(mode=0o600)  # what htpasswd makes under umask 077, owned by root
    try:
        ran = image.run(
            config, "run", "--rm", "--network", "host", "-v", f"{folder}:/etc/registry-gateway:ro", IMAGE
        )
        assert ran.returncode == 2
        output = ran.stdout + ran.stderr
        assert "/etc/registry-gateway/htpasswd: permission denied for uid 10001 (gid 10001)" in output
        assert "chmod 644" in output and "Traceback" not in output
    finally:
        shutil.rmtree(folder)


def test_directory_users_log_in_through_the_image(image: Docker, tmp_path: Path, registry: Registry) -> None:
    """The image carries the LDAP client (compiled in a build stage): before, `ldap_auth` in the
    image only got `needs the LDAP client: pip install 'registry-gateway[ldap]'`."""
    config = tmp_path / "docker-config"
    folder = users_folder()
    directory = ldap_server.create(tmp_path / "slapd")
    port = free_port()
    policy = ACL + ldap_section(directory, folder, bind_password_file="/etc/registry-gateway/bind.pw")
    (folder / "bind.pw").chmod(0o644)
    (folder / "policy.yml").write_text(policy)
    (folder / "gateway.yml").write_text(
        f"listen: 127.0.0.1:{port}\nupstream: {registry.url}\n"
        "htpasswd: /etc/registry-gateway/htpasswd\npolicy: /etc/registry-gateway/policy.yml\n"
    )
    name = f"gw-{secrets.token_hex(4)}"
    try:
        run_with_own_settings(image, config, folder, name)
        carol = ("carol", LDAP_PASSWORDS["carol"])  # in the directory's group "backend", not in htpasswd
        host = f"127.0.0.1:{port}"
        assert http_request(host, "GET", "/v2/", carol)[0] == 200, image.run(config, "logs", name).stderr
        assert http_request(host, "GET", "/v2/", ("carol", "not-her-password"))[0] == 401
        assert http_request(host, "GET", "/v2/", ("nobody", LDAP_PASSWORDS["carol"]))[0] == 401
        status, _, body = http_request(host, "POST", "/v2/backend/app/blobs/uploads/", carol)
        assert status == 202, body  # her group's namespace
        status, _, body = http_request(host, "POST", "/v2/frontend/app/blobs/uploads/", carol)
        assert status == 403, body
        assert not (registry.storage / "docker/registry/v2/repositories/frontend").exists()
    finally:
        logs = image.run(config, "logs", name)
        image.run(config, "rm", "-f", name)
        directory.stop()
        shutil.rmtree(folder)
    assert "Traceback" not in logs.stdout + logs.stderr


def push_and_pull_with_the_docker_cli(image: Docker, config: Path, host: str) -> str:
    """The docker CLI through `host`: admin pushes, alice pulls, alice may not push; both logged
    out again. Returns the image pushed."""
    cli = functools.partial(image.cli, config)
    assert cli("login", "-u", "admin", "--password-stdin", host, stdin=PASSWORDS["admin"])[0] == 0
    tag = f"{host}/library/app:1"
    image.build_image(config, tag, {"a.bin": os.urandom(80_000), "b.bin": os.urandom(90_000)})
    status, output = cli("push", tag)
    assert status == 0, output
    assert cli("logout", host)[0] == 0
    assert cli("login", "-u", "alice", "--password-stdin", host, stdin=PASSWORDS["alice"])[0] == 0
    assert cli("rmi", tag)[0] == 0
    status, output = cli("pull", tag)
    assert status == 0, output
    other = f"{host}/library/other:1"
    assert cli("tag", tag, other)[0] == 0
    status, output = cli("push", other)
    assert status != 0 and "denied" in output
    assert cli("logout", host)[0] == 0
    return tag


def compose(
    image: Docker, config: Path, project: Path, name: str, *args: str, file: str = "compose.yml"
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require("docker-compose"), "-p", name, "-f", str(project / file), *args],
        cwd=project,
        env=image.env(config),
        capture_output=True,
        text=True,
        timeout=300,
    )


def up_and_answering(
    image: Docker, config: Path, project: Path, name: str, host: str, file: str = "compose.yml"
) -> None:
    """`docker-compose up -d`, back once admin's login gets 200 through `host`."""
    up = compose(image, config, project, name, "up", "-d", file=file)
    assert up.returncode == 0, up.stderr
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if http_request(host, "GET", "/v2/", basic("admin"))[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.5)
    logs = compose(image, config, project, name, "logs", file=file)
    raise AssertionError(f"the stack did not answer on {host}:\n{logs.stdout}")


def test_compose_stack_serves_push_and_pull_and_drains_on_down(image: Docker, tmp_path: Path) -> None:
    config = tmp_path / "docker-config"
    project = Path(tempfile.mkdtemp(prefix="gw-compose-"))
    project.chmod(0o755)
    port = free_port()
    host = f"127.0.0.1:{port}"
    text = (ROOT / "compose.yml").read_text()
    assert '"8080:8080"' in text
    (project / "compose.yml").write_text(text.replace('"8080:8080"', f'"127.0.0.1:{port}:8080"'))
    (project / "config").mkdir(mode=0o755)
    for user, password in PASSWORDS.items():
        htpasswd_add(project / "config" / "htpasswd", user, password)  # htpasswd -B, stdin
    (project / "config" / "htpasswd").chmod(0o644)
    name = f"gwtest{secrets.token_hex(3)}"
    try:
        up_and_answering(image, config, project, name, host)

        push_and_pull_with_the_docker_cli(image, config, host)

        # `docker-compose down` while an upload is in flight: the gateway finishes it first.
        status, headers, _ = http_request(host, "POST", "/v2/library/slow/blobs/uploads/", basic("admin"))
        assert status == 202
        location = headers["Location"][headers["Location"].index("/v2/") :]
        result: dict[str, int] = {}

        def slow_upload() -> None:
            def body() -> Iterator[bytes]:
                for _ in range(8):
                    time.sleep(0.5)
                    yield b"x" * 1000

            import http.client

            connection = http.client.HTTPConnection(host, timeout=60)
            auth = base64.b64encode(f"admin:{PASSWORDS['admin']}".encode()).decode()
            connection.request(
                "PATCH",
                location,
                body=body(),
                headers={"Authorization": f"Basic {auth}"},
                encode_chunked=True,
            )
            result["status"] = connection.getresponse().status
            connection.close()

        uploader = threading.Thread(target=slow_upload)
        uploader.start()
        time.sleep(1)
        started = time.monotonic()
        down = compose(image, config, project, name, "down")
        uploader.join(timeout=60)
        assert down.returncode == 0, down.stderr
        assert result.get("status") == 202, result
        assert time.monotonic() - started >= 2  # down waited for the upload, it did not cut it
    finally:
        compose(image, config, project, name, "down", "-v")
        shutil.rmtree(project, ignore_errors=True)
