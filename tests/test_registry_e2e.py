"""End to end: skopeo through the gateway (a real process) to Debian's docker-registry binary."""

from __future__ import annotations

import base64
import json
import socket
import subprocess
import time
from pathlib import Path

import pytest

from gateway.sample_image import write_image
from tests.conftest import (
    USERS,
    Gateway,
    Registry,
    htpasswd_add,
    http_request,
    require,
    skopeo_copy,
    start_gateway,
    stop,
    write_authfile,
)

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def login(authfile: Path, host: str, user: str, password: str) -> None:
    write_authfile(authfile, host, (user, password))


def copy(src: str, dst: str, authfile: Path) -> subprocess.CompletedProcess[str]:
    return skopeo_copy(src, dst, authfile)


def raw_request(gateway: Gateway, data: bytes) -> bytes:
    host, port = gateway.host.split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(data)
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not chunk:
                break
            chunks.append(chunk)
            if b"\r\n\r\n" in b"".join(chunks) and b"Connection: close" not in data:
                head, _, rest = b"".join(chunks).partition(b"\r\n\r\n")
                length = [
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                ]
                if length and len(rest) >= length[0]:
                    break
        return b"".join(chunks)


def request(
    gateway: Gateway,
    method: str,
    path: str,
    user: str | None = None,
    password: str | None = None,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    credentials = None if user is None else (user, USERS[user] if password is None else password)
    return http_request(gateway.host, method, path, credentials, body, headers)


def test_push_as_admin_pull_as_reader_is_byte_identical(
    tmp_path: Path, gateway: Gateway, registry: Registry
) -> None:
    source = tmp_path / "image"
    manifest_digest = write_image(source, "v1", layers=4, layer_bytes=300_000)
    auth = tmp_path / "auth.json"

    login(auth, gateway.host, "admin", USERS["admin"])
    pushed = copy(f"oci:{source}:v1", f"docker://{gateway.host}/team/app:v1", auth)
    assert pushed.returncode == 0, pushed.stderr
    assert "team/app" in registry.repositories()

    login(auth, gateway.host, "alice", USERS["alice"])
    pulled_dir = tmp_path / "pulled"
    pulled = copy(f"docker://{gateway.host}/team/app:v1", f"oci:{pulled_dir}:v1", auth)
    assert pulled.returncode == 0, pulled.stderr

    index = json.loads((pulled_dir / "index.json").read_text())
    assert index["manifests"][0]["digest"] == manifest_digest
    for blob in (source / "blobs" / "sha256").iterdir():
        assert (pulled_dir / "blobs" / "sha256" / blob.name).read_bytes() == blob.read_bytes()

    # The registry's own view agrees: the digest it serves is the one we pushed.
    status, headers, _ = request(
        gateway, "HEAD", "/v2/team/app/manifests/v1", "alice", headers={"Accept": OCI_MANIFEST}
    )
    assert status == 200
    assert headers["Docker-Content-Digest"] == manifest_digest


def test_reader_push_refused_and_nothing_reaches_registry(
    tmp_path: Path, gateway: Gateway, registry: Registry
) -> None:
    source = tmp_path / "image"
    write_image(source, "v1", layers=2, layer_bytes=10_000)
    auth = tmp_path / "auth.json"
    login(auth, gateway.host, "alice", USERS["alice"])
    blobs_before = registry.blob_count()
    pushed = copy(f"oci:{source}:v1", f"docker://{gateway.host}/sneaky/app:v1", auth)
    assert pushed.returncode != 0
    assert "denied" in pushed.stderr
    assert "sneaky/app" not in registry.repositories()
    assert registry.blob_count() == blobs_before

    # And the 403 itself, as the registry's error format.
    status, headers, body = request(gateway, "POST", "/v2/sneaky/app/blobs/uploads/", "alice", body=b"")
    assert status == 403
    assert headers["Docker-Distribution-Api-Version"] == "registry/2.0"
    assert json.loads(body)["errors"][0]["code"] == "DENIED"
    assert "sneaky/app" not in registry.repositories()


def test_anonymous_and_wrong_password_get_challenge(tmp_path: Path, gateway: Gateway) -> None:
    for user, password in ((None, None), ("alice", "wrong"), ("nobody", "x")):
        status, headers, body = request(
            gateway, "GET", "/v2/library/busybox/manifests/latest", user, password
        )
        assert status == 401
        assert headers["WWW-Authenticate"] == 'Basic realm="Registry realm"'
        assert headers["Docker-Distribution-Api-Version"] == "registry/2.0"
        assert headers["Content-Type"].startswith("application/json")
        assert json.loads(body)["errors"][0]["code"] == "UNAUTHORIZED"

    auth = tmp_path / "auth.json"
    auth.write_text(json.dumps({"auths": {}}))
    pulled = copy(f"docker://{gateway.host}/library/busybox:latest", f"oci:{tmp_path / 'x'}:latest", auth)
    assert pulled.returncode != 0
    assert "authentication required" in pulled.stderr or "unauthorized" in pulled.stderr.lower()


def test_login_check_and_catalog(gateway: Gateway) -> None:
    status, headers, _ = request(gateway, "GET", "/v2/", "alice")
    assert status == 200
    assert headers["Docker-Distribution-Api-Version"] == "registry/2.0"  # the registry's, once
    status, _, body = request(gateway, "GET", "/v2/_catalog", "alice")
    assert status == 200 and json.loads(body) == {"repositories": []}


def test_apache_md5_and_bcrypt_users_and_live_add(tmp_path: Path, registry: Registry) -> None:
    users = tmp_path / "users"
    htpasswd_add(users, "bcrypt-user", "pw-one", "-B")
    htpasswd_add(users, "md5-user", "pw-two", "-m")
    gw = start_gateway(tmp_path, registry.url, users)
    try:
        assert request(gw, "GET", "/v2/", "bcrypt-user", "pw-one")[0] == 200
        assert request(gw, "GET", "/v2/", "md5-user", "pw-two")[0] == 200
        assert request(gw, "GET", "/v2/", "md5-user", "pw-one")[0] == 401
        assert request(gw, "GET", "/v2/", "late-user", "pw-three")[0] == 401

        htpasswd_add(users, "late-user", "pw-three", "-B")
        deadline = time.monotonic() + 10
        while request(gw, "GET", "/v2/", "late-user", "pw-three")[0] != 200:
            assert time.monotonic() < deadline, "user added to the file was never accepted"
            time.sleep(0.2)

        # Removing a user takes effect too, even though its login was cached.
        subprocess.run([require("htpasswd"), "-D", str(users), "late-user"], check=True, capture_output=True)
        deadline = time.monotonic() + 10
        while request(gw, "GET", "/v2/", "late-user", "pw-three")[0] != 401:
            assert time.monotonic() < deadline, "removed user still accepted"
            time.sleep(0.2)

        # A broken edit keeps the last good users.
        users.write_text(users.read_text() + "this line is broken\n")
        time.sleep(1.5)
        assert request(gw, "GET", "/v2/", "bcrypt-user", "pw-one")[0] == 200
        assert "keeping the last good users" in gw.log.read_text()
    finally:
        stop(gw.process)
    assert "pw-one" not in gw.log.read_text() and "pw-two" not in gw.log.read_text()


HOSTILE = [
    "/v2/a/../b/manifests/x",
    "/v2/a/%2e%2e/b/manifests/x",
    "/v2/team%2Fapp/manifests/v1",
    "/v2//team/app/manifests/v1",
    "/v2/Team/app/manifests/v1",
    "/v2/" + "a" * 300 + "/manifests/v1",
    "/v2/team/app/manifests/v1/../../../_catalog",
]


@pytest.mark.parametrize("path", HOSTILE)
def test_hostile_paths_refused_before_registry(gateway: Gateway, registry: Registry, path: str) -> None:
    data = f"GET {path} HTTP/1.1\r\nHost: {gateway.host}\r\nAuthorization: Basic {_b64('admin')}\r\n\r\n"
    response = raw_request(gateway, data.encode())
    status = int(response.split(b" ", 2)[1])
    assert status in (400, 404), response[:200]
    assert b"Docker-Distribution-Api-Version: registry/2.0" in response
    assert b'"errors"' in response
    assert path.split("?")[0] not in registry.log.read_text()


def _b64(user: str) -> str:
    return base64.b64encode(f"{user}:{USERS[user]}".encode()).decode()


MALFORMED = [
    b"GET /v2/ HTTP/1.1\r\nHost: h\r\nAuthorization: Basic !!!!\r\n\r\n",
    b"GET /v2/ HTTP/1.1\r\nHost: h\r\nAuthorization: Basic " + base64.b64encode(b"\xff\xfe:x") + b"\r\n\r\n",
    b"GET /v2/ HTTP/1.1\r\nHost: h\r\nAuthorization: Basic " + base64.b64encode(b"nocolon") + b"\r\n\r\n",
    b"GET /v2/ HTTP/1.1\r\nHost: h\r\nAuthorization: Bearer x.y.z\r\n\r\n",
    b"GET /v2/ HTTP/1.1\r\nHost: h\r\nAuthorization: Basic " + b"A" * 6000 + b"\r\n\r\n",
    b"GET /v2/ HTTP/1.1\r\nHost: h\r\nAuthorization: \xff\xfe\r\n\r\n",
    b"BREW /v2/ HTTP/1.1\r\nHost: h\r\n\r\n",
    b"G@T /v2/ HTTP/1.1\r\nHost: h\r\n\r\n",
    b"GET /v2/ HTTP/1.1\r\nHost: h\r\nX-Big: " + b"x" * 70000 + b"\r\n\r\n",
    b"GET /v2/" + b"a" * 70000 + b" HTTP/1.1\r\nHost: h\r\n\r\n",
    b"GET /v2/ HTTP/1.1\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(500)) + b"\r\n",
    b"GET /v2/ HTTP/1.1\r\nHost: bad host\r\n\r\n",
    b"GET /v2/ HTTP/1.1\r\n\r\n",
    b"GET /v2/ HTTP/9.9\r\nHost: h\r\n\r\n",
    b"GET v2 HTTP/1.1\r\nHost: h\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64,
    b"POST /v2/a/blobs/uploads/ HTTP/1.1\r\nHost: h\r\nContent-Length: -5\r\n\r\n",
    b"POST /v2/a/blobs/uploads/ HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n",
]


@pytest.mark.parametrize("data", MALFORMED, ids=range(len(MALFORMED)))
def test_malformed_requests_never_500(gateway: Gateway, data: bytes) -> None:
    response = raw_request(gateway, data)
    if response:
        status = int(response.split(b" ", 2)[1])
        assert 400 <= status < 500, response[:300]
        assert b"Docker-Distribution-Api-Version: registry/2.0" in response
        assert b'"errors"' in response
    # The gateway is still serving.
    assert request(gateway, "GET", "/v2/", "alice")[0] == 200
    assert "Traceback" not in gateway.log.read_text()


def test_location_urls_follow_trusted_proxies_only(
    tmp_path: Path, registry: Registry, users_file: Path
) -> None:
    forwarded = {
        "X-Forwarded-Proto": "https",
        "X-Forwarded-Host": "registry.example.com",
        "X-Forwarded-For": "203.0.113.5",
    }
    plain = start_gateway(tmp_path, registry.url, users_file)
    try:
        # An untrusted client cannot make the registry send the next PATCH elsewhere.
        status, headers, _ = request(
            plain, "POST", "/v2/loc/app/blobs/uploads/", "admin", body=b"", headers=forwarded
        )
        assert status == 202
        assert headers["Location"].startswith(f"http://{plain.host}/v2/loc/app/blobs/uploads/")
    finally:
        stop(plain.process)
    audit = tmp_path / "audit.jsonl"
    behind = start_gateway(
        tmp_path,
        registry.url,
        users_file,
        "--audit-log",
        str(audit),
        env={"GATEWAY_TRUSTED_PROXIES": "127.0.0.0/8"},
    )
    try:
        status, headers, _ = request(
            behind, "POST", "/v2/loc/app/blobs/uploads/", "admin", body=b"", headers=forwarded
        )
        assert status == 202
        assert headers["Location"].startswith("https://registry.example.com/v2/loc/app/blobs/uploads/")
    finally:
        stop(behind.process)
    assert json.loads(audit.read_text().splitlines()[-1])["client"] == "203.0.113.5"
