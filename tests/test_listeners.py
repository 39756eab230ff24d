"""Every listener the gateway opens (listen, metrics_listen, redirect_listen) is hardened alike, and
/metrics can be guarded by a token; against the real gateway process."""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway import config
from tests.conftest import Gateway, Registry, free_port, http_request, start_gateway, stop
from tests.test_operations import issue_cert, make_ca

HEADER_TIMEOUT = 1.0
TOKEN = "metrics-scrape-token-7c1f0e2a9b"


def exchange(host: str, data: bytes, wait: float = 5.0) -> bytes:
    """The raw bytes `host` answers to `data`, until it closes the connection (or `wait` passes)."""
    address, port = host.split(":")
    with socket.create_connection((address, int(port)), timeout=wait) as sock:
        sock.sendall(data)
        answer = b""
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not chunk:
                break
            answer += chunk
        return answer


def status_and_headers(answer: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers, body


def closed_within(host: str, head_part: bytes, seconds: float) -> float | None:
    """Seconds until `host` closes a connection that sent only `head_part`, or None if it keeps it
    open longer than `seconds`."""
    address, port = host.split(":")
    with socket.create_connection((address, int(port)), timeout=seconds) as sock:
        sock.sendall(head_part)
        started = time.monotonic()
        try:
            while sock.recv(1024):
                pass
        except TimeoutError:
            return None
        except ConnectionResetError:
            pass
        return time.monotonic() - started


@pytest.fixture
def tls_gateway(tmp_path: Path, registry: Registry, users_file: Path) -> Iterator[tuple[Gateway, str, str]]:
    """The gateway over HTTPS with a metrics listener and a redirect listener, header_timeout 1 s."""
    make_ca(tmp_path)
    issue_cert(tmp_path, "server", "01")
    metrics, redirect = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    env = {
        "GATEWAY_TLS_CERT": str(tmp_path / "server.crt"),
        "GATEWAY_TLS_KEY": str(tmp_path / "server.key"),
        "GATEWAY_METRICS_LISTEN": metrics,
        "GATEWAY_REDIRECT_LISTEN": redirect,
        "GATEWAY_HEADER_TIMEOUT": str(HEADER_TIMEOUT),
        "GATEWAY_MAX_HEADER_SIZE": "2048",
        "GATEWAY_MAX_HEAD_SIZE": "4096",
    }
    gateway = start_gateway(tmp_path, registry.url, users_file, env=env, scheme="https")
    try:
        yield gateway, metrics, redirect
    finally:
        stop(gateway.process)


@pytest.mark.parametrize("listener", ["metrics", "redirect"])
def test_every_listener_has_the_main_ones_limits_errors_and_headers(
    tls_gateway: tuple[Gateway, str, str], listener: str
) -> None:
    """Before, the metrics and redirect listeners were bare aiohttp: `Server: Python/3.11
    aiohttp/...`, half-sent heads held open for 100 s and 40 s, absolute-form targets mangled into
    a redirect (or a 500), malformed requests answered in plain text with a traceback logged."""
    gateway, metrics, redirect = tls_gateway
    host = metrics if listener == "metrics" else redirect
    path = "/healthz" if listener == "metrics" else "/v2/"

    status, headers, _ = http_request(host, "GET", path)
    assert status == (200 if listener == "metrics" else 301)
    assert headers["Server"] == "registry-gateway"
    status, headers, _ = http_request(host, "GET", "/nothing/here" if listener == "metrics" else "/x")
    assert headers["Server"] == "registry-gateway"

    # A head sent in part is cut header_timeout after its first byte, as on the main listener.
    waited = closed_within(
        host, f"GET {path} HTTP/1.1\r\nHost: x\r\n".encode(), seconds=4 * HEADER_TIMEOUT + 2
    )
    assert waited is not None and waited < 4 * HEADER_TIMEOUT + 1

    # Requests the listener cannot serve get a clean 4xx in the registry's error format.
    hostile = [
        b"GET http://x/ HTTP/1.1\r\nHost: x\r\n\r\n",  # absolute-form target
        b"GET http://x/ HTTP/1.1\r\n\r\n",
        b"GET http://x HTTP/1.1\r\nHost: x\r\n\r\n",
        b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n",
        b"CONNECT x:80 HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET / HTTP/1.1\r\n\r\n",  # no Host
        b"GET /\x01 HTTP/1.1\r\nHost: x\r\n\r\n",
        b"G\x00T / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 3000 + b"\r\n\r\n",  # over max_header_size
        b"GET / HTTP/1.1\r\nHost: x\r\n"
        + b"X-Many: aaaaaaaaaaaaaaa\r\n" * 300
        + b"\r\n",  # over max_head_size
    ]
    for request in hostile:
        answer = exchange(host, request)
        status, headers, body = status_and_headers(answer)
        assert 400 <= status < 500, (request, answer)
        assert headers["server"] == "registry-gateway", (request, answer)
        assert "errors" in json.loads(body), (request, answer)
    # A TLS handshake on the plain port: refused too.
    answer = exchange(host, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40)
    assert answer == b"" or 400 <= status_and_headers(answer)[0] < 500

    # Still serving, and nothing above left a traceback.
    assert http_request(host, "GET", path)[0] in (200, 301)
    log = gateway.log.read_text()
    assert "Traceback" not in log and "Error handling request" not in log, log


def test_one_function_builds_every_listener() -> None:
    """The class of defect closed: run_server builds each listener with `listener_runner`, which
    gives it the limits, error handling and headers; no bare aiohttp runner or site is left."""
    import inspect

    from gateway import runtime

    source = inspect.getsource(runtime.run_server)
    assert "web.AppRunner" not in source and "web.TCPSite" not in source
    # The main listener, metrics_listen (or, in a worker, its metrics socket) and redirect_listen.
    assert "GatewayRunner" not in source and source.count("listener_runner(") == 4


def write_token(path: Path, token: str = TOKEN) -> Path:
    path.write_text(token + "\n")
    path.chmod(0o600)
    return path


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_metrics_token_guards_metrics_and_leaves_health_open(
    tmp_path: Path, registry: Registry, users_file: Path
) -> None:
    token_file = write_token(tmp_path / "metrics-token")
    metrics = f"127.0.0.1:{free_port()}"
    gateway = start_gateway(
        tmp_path,
        registry.url,
        users_file,
        "--metrics-listen",
        metrics,
        env={"GATEWAY_METRICS_TOKEN_FILE": str(token_file)},
    )
    try:
        status, headers, body = http_request(metrics, "GET", "/metrics")
        assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer")
        assert json.loads(body)["errors"][0]["code"] == "UNAUTHORIZED"
        assert b"registry_gateway" not in body
        for wrong in (
            "Bearer wrong",
            f"Bearer {TOKEN}x",
            f"Bearer {TOKEN[:-1]}",
            basic("prometheus", "wrong"),
            "Basic !!!",
            f"Token {TOKEN}",
        ):
            status, _, body = http_request(metrics, "GET", "/metrics", headers={"Authorization": wrong})
            assert status == 401 and b"registry_gateway" not in body, wrong
        # Prometheus: authorization.credentials_file (Bearer) or basic_auth.password_file.
        for right in (f"Bearer {TOKEN}", f"bearer {TOKEN}", basic("prometheus", TOKEN)):
            status, headers, body = http_request(metrics, "GET", "/metrics", headers={"Authorization": right})
            assert status == 200 and b"registry_gateway_requests" in body, right
            assert headers["Server"] == "registry-gateway"
        # Health checks need no token.
        assert http_request(metrics, "GET", "/healthz")[0] == 200
        assert http_request(metrics, "GET", "/readyz")[0] == 200
        # The image's HEALTHCHECK still passes.
        environment = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
        environment["GATEWAY_METRICS_LISTEN"] = metrics
        environment["GATEWAY_METRICS_TOKEN_FILE"] = str(token_file)
        probe = subprocess.run(
            [sys.executable, "-m", "gateway", "healthcheck"],
            env=environment,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert probe.returncode == 0, probe.stderr
        # A new token in the file is taken at the next scrape (no restart), the old one refused.
        write_token(token_file, TOKEN + "-rotated")
        assert (
            http_request(metrics, "GET", "/metrics", headers={"Authorization": f"Bearer {TOKEN}"})[0] == 401
        )
        rotated = {"Authorization": f"Bearer {TOKEN}-rotated"}
        assert http_request(metrics, "GET", "/metrics", headers=rotated)[0] == 200
        # A file that cannot be read any more keeps the last good token.
        token_file.unlink()
        assert http_request(metrics, "GET", "/metrics", headers=rotated)[0] == 200
    finally:
        stop(gateway.process)
    assert TOKEN not in gateway.log.read_text()


def load(tmp_path: Path, users_file: Path, text: str) -> config.Settings:
    file = tmp_path / "gateway.yml"
    file.write_text(text)
    return config.load(file, {}, {"htpasswd": str(users_file)})


def problems(tmp_path: Path, users_file: Path, text: str) -> list[str]:
    with pytest.raises(config.ConfigError) as raised:
        load(tmp_path, users_file, text)
    return raised.value.problems


def test_metrics_token_file_is_checked_at_start_up(tmp_path: Path, users_file: Path) -> None:
    token_file = write_token(tmp_path / "token")
    settings = load(
        tmp_path, users_file, f"metrics_listen: 127.0.0.1:9090\nmetrics_token_file: {token_file}\n"
    )
    assert settings.metrics_token_file == token_file
    assert load(tmp_path, users_file, "metrics_listen: 127.0.0.1:9090\n").metrics_token_file is None

    missing = problems(
        tmp_path, users_file, f"metrics_listen: 127.0.0.1:9090\nmetrics_token_file: {tmp_path / 'no'}\n"
    )
    assert (
        len(missing) == 1 and missing[0].startswith("metrics_token_file: ") and "no such file" in missing[0]
    )
    for content in ("", "\n", "short\n", "two words-and-more-text\n", "a-long-enough-token\nsecond-line\n"):
        (tmp_path / "bad").write_text(content)
        found = problems(
            tmp_path, users_file, f"metrics_listen: 127.0.0.1:9090\nmetrics_token_file: {tmp_path / 'bad'}\n"
        )
        assert len(found) == 1 and found[0].startswith("metrics_token_file: "), content
        assert content.strip() == "" or content.split()[0] not in found[0]  # never the token itself
    alone = problems(tmp_path, users_file, f"metrics_token_file: {token_file}\n")
    assert alone == ["metrics_token_file: only used with metrics_listen"]


def test_check_config_shows_the_token_file_not_the_token(tmp_path: Path, users_file: Path) -> None:
    token_file = write_token(tmp_path / "token")
    environment = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    environment.update(
        {
            "GATEWAY_HTPASSWD": str(users_file),
            "GATEWAY_METRICS_LISTEN": "127.0.0.1:9090",
            "GATEWAY_METRICS_TOKEN_FILE": str(token_file),
            "GATEWAY_UPSTREAM": f"http://127.0.0.1:{free_port()}",
        }
    )
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "check-config"],
        env=environment,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    assert "metrics_token_file" in done.stdout and str(token_file) in done.stdout
    assert TOKEN not in done.stdout + done.stderr


def test_the_image_keeps_metrics_inside_the_container(users_file: Path) -> None:
    """Before, the image bound metrics_listen to 0.0.0.0:9090: /metrics open to every container on
    the network. Now to the container's loopback, which its HEALTHCHECK reaches."""
    root = Path(__file__).parent.parent
    settings = config.load(root / "config" / "container.yml", {"GATEWAY_HTPASSWD": str(users_file)})
    assert settings.metrics_listen is not None and settings.metrics_listen[0] == "127.0.0.1"
