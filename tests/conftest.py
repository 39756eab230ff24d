"""Real parts for the tests: Debian's docker-registry binary, Apache's htpasswd, the gateway as a process."""

from __future__ import annotations

import base64
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings

# CI runs once per submission: property tests there use a fixed sequence of examples, so a
# failure is reproducible and never a matter of luck; locally they explore anew each run.
settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

# One private dockerd, and one build of the gateway's image, for the whole session, whichever
# modules ask for them (a fixture imported into each module would be one per module).
pytest_plugins = ["tests.dockerd", "tests.image_build"]

REGISTRY_BIN = os.environ.get("REGISTRY_BIN", "/usr/bin/docker-registry")


@pytest.fixture(autouse=True)
def _no_operator_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """The GATEWAY_* variables of the shell that runs the tests (an operator's
    GATEWAY_CONFIG=/etc/registry-gateway/gateway.yml) reach no test and no process a test starts:
    each test names its own files, so none reads or writes the machine's configuration."""
    for name in list(os.environ):
        if name.startswith("GATEWAY_"):
            monkeypatch.delenv(name)


USERS = {
    "admin": "admin-secret-pw",
    "alice": "alice-secret-pw",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_http(url: str, process: subprocess.Popen[bytes], log: Path, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url}: process exited early:\n{log.read_text()}")
        try:
            urllib.request.urlopen(url, timeout=1).close()
            return
        except urllib.error.HTTPError:
            return  # it answers; a 401 is an answer
        except (urllib.error.URLError, OSError):
            time.sleep(0.05)
    raise RuntimeError(f"{url} did not come up:\n{log.read_text()}")


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def require(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        # Not a skip: these are the real parts the suite exists to exercise. .ci/run installs them.
        raise RuntimeError(f"{binary} is required (apt-get install docker-registry skopeo apache2-utils)")
    return path


def htpasswd_add(path: Path, user: str, password: str, flag: str = "-B") -> None:
    """Add a user with Apache's own htpasswd; the password goes through stdin, never argv."""
    create = [] if path.exists() else ["-c"]
    subprocess.run(
        [require("htpasswd"), "-i", *create, flag, str(path), user],
        input=password.encode(),
        check=True,
        capture_output=True,
    )


@dataclass
class Registry:
    url: str
    storage: Path
    process: subprocess.Popen[bytes]
    log: Path

    def repositories(self) -> set[str]:
        """Repositories present in the registry's storage, read from disk, not through any API."""
        root = self.storage / "docker" / "registry" / "v2" / "repositories"
        if not root.exists():
            return set()
        return {str(p.parent.relative_to(root)) for p in root.rglob("_manifests")} | {
            str(p.parent.relative_to(root)) for p in root.rglob("_uploads")
        }

    def blob_count(self) -> int:
        root = self.storage / "docker" / "registry" / "v2" / "blobs"
        return sum(1 for _ in root.rglob("data")) if root.exists() else 0


def start_registry(tmp_path: Path, port: int | None = None, name: str = "registry") -> Registry:
    """Debian's docker-registry on 127.0.0.1, storage in tmp_path; started again on the same
    configuration (and so storage) when `name` is reused."""
    require(REGISTRY_BIN)
    storage = tmp_path / f"{name}-storage"
    config = tmp_path / f"{name}.yml"
    if not config.exists():
        config.write_text(
            "version: 0.1\n"
            "log:\n  level: info\n"
            f"storage:\n  filesystem:\n    rootdirectory: {storage}\n  delete:\n    enabled: true\n"
            f"http:\n  addr: 127.0.0.1:{port or free_port()}\n"
        )
    address = re.search(r"addr: (\S+)", config.read_text())
    assert address is not None
    log = tmp_path / f"{name}.log"
    with log.open("ab") as out:
        process = subprocess.Popen([REGISTRY_BIN, "serve", str(config)], stdout=out, stderr=out)
    try:
        wait_for_http(f"http://{address.group(1)}/v2/", process, log)
    except RuntimeError:
        stop(process)
        raise
    return Registry(f"http://{address.group(1)}", storage, process, log)


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    started = start_registry(tmp_path)
    try:
        yield started
    finally:
        stop(started.process)


@pytest.fixture
def users_file(tmp_path: Path) -> Path:
    path = tmp_path / "htpasswd"
    for user, password in USERS.items():
        htpasswd_add(path, user, password, "-B")
    return path


@dataclass
class Gateway:
    url: str
    host: str
    process: subprocess.Popen[bytes]
    log: Path

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS")


def wait_for_port(host: str, port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"process exited early:\n{log.read_text()}")
        try:
            socket.create_connection((host, port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{host}:{port} did not come up:\n{log.read_text()}")


def start_gateway(
    tmp_path: Path,
    upstream: str,
    htpasswd: Path,
    *extra: str,
    env: dict[str, str] | None = None,
    scheme: str = "http",
    port: int | None = None,
    host: str = "127.0.0.1",
) -> Gateway:
    port = port or free_port()
    log = tmp_path / f"gateway-{port}.log"
    environment = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    environment.update(env or {})
    environment["GATEWAY_RELOAD_INTERVAL"] = environment.get("GATEWAY_RELOAD_INTERVAL", "0.5")
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gateway",
                "serve",
                "--listen",
                f"{host}:{port}",
                "--upstream",
                upstream,
                "--htpasswd",
                str(htpasswd),
                *extra,
            ],
            stdout=out,
            stderr=out,
            env=environment,
        )
    if scheme == "http":
        wait_for_http(f"http://{host}:{port}/v2/", process, log)
    else:
        wait_for_port(host, port, process, log)
    return Gateway(f"{scheme}://{host}:{port}", f"{host}:{port}", process, log)


@pytest.fixture
def gateway(tmp_path: Path, registry: Registry, users_file: Path) -> Iterator[Gateway]:
    gw = start_gateway(tmp_path, registry.url, users_file)
    try:
        yield gw
    finally:
        stop(gw.process)


Credentials = tuple[str, str] | None


def basic_header(credentials: tuple[str, str]) -> str:
    return "Basic " + base64.b64encode(f"{credentials[0]}:{credentials[1]}".encode()).decode()


def http_request(
    host: str,
    method: str,
    path: str,
    credentials: Credentials = None,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """One request on a fresh connection: status, headers, body."""
    all_headers = dict(headers or {})
    if credentials is not None:
        all_headers["Authorization"] = basic_header(credentials)
    conn = http.client.HTTPConnection(host, timeout=30)
    try:
        conn.request(method, path, body=body, headers=all_headers)
        response = conn.getresponse()
        data = response.read()
        return response.status, dict(response.getheaders()), data
    finally:
        conn.close()


def write_authfile(path: Path, host: str, credentials: Credentials) -> Path:
    """A containers-auth.json for skopeo, so credentials never appear on its command line."""
    auths = {} if credentials is None else {host: {"auth": basic_header(credentials).removeprefix("Basic ")}}
    path.write_text(json.dumps({"auths": auths}))
    return path


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll `condition` until it holds; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


def get_json(metrics: str, path: str) -> tuple[int, Any]:
    """The status and JSON body of GET `path` on a metrics listener HOST:PORT (/readyz, /status)."""
    try:
        with urllib.request.urlopen(f"http://{metrics}{path}", timeout=10) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read())


def metric(metrics: str, name: str) -> float:
    """The sum of a metric's samples (every label set) on a gateway's metrics_listen HOST:PORT."""
    with urllib.request.urlopen(f"http://{metrics}/metrics", timeout=10) as response:
        text = response.read().decode()
    found = re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M)
    assert found, f"{name} not in the metrics"
    return sum(float(value) for value in found)


def make_token_key(path: Path) -> Path:
    """A token signing key written by the gateway's own `token keygen`."""
    made = subprocess.run(
        [sys.executable, "-m", "gateway", "token", "keygen", "--key", str(path)], capture_output=True
    )
    assert made.returncode == 0, made.stderr
    return path


def users_with(path: Path, *extra: tuple[str, str]) -> Path:
    """An htpasswd file (bcrypt, Apache's htpasswd) with USERS and `extra`."""
    for user, password in [*USERS.items(), *extra]:
        htpasswd_add(path, user, password, "-B")
    return path


def skopeo_copy(src: str, dst: str, authfile: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    """`skopeo copy --preserve-digests`, plain HTTP unless `flags` say otherwise, no retries."""
    tls = list(flags) or ["--src-tls-verify=false", "--dest-tls-verify=false"]
    return subprocess.run(
        [
            require("skopeo"),
            "--insecure-policy",
            "copy",
            "--preserve-digests",
            "--retry-times",
            "0",
            *tls,
            "--authfile",
            str(authfile),
            src,
            dst,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
