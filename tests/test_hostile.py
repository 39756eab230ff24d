# ruff: noqa: E501  (the corpus and the raw requests are wire bytes, easier to read unsplit)
"""Requests that mean one thing to a proxy and another to the registry, tried against the real one.

Each test attacks the gateway in front of Debian's docker-registry 2.8 the way the review that
found these defects did, asserts it could not get in, and reads the registry's storage afterwards.
The DoS shapes run against small limits (4 upstream connections, a 3 s header and body timeout)
and check that an admin is still served while they are held open.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import hashlib
import json
import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import (
    Gateway,
    Registry,
    htpasswd_add,
    http_request,
    start_gateway,
    start_registry,
    stop,
)

PASSWORDS = {"admin": "admin-secret-pw", "alice": "alice-secret-pw", "reader": "reader-secret-pw"}
POLICY = """\
acl:
  - match: {account: "admin"}
    actions: ["*"]
  - match: {account: "alice", name: "alice/*"}
    actions: ["pull", "push"]
  - match: {account: "reader"}
    actions: ["pull"]
  - match: {account: "", name: "public/*"}
    actions: ["pull"]
"""
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
STORAGE_LEAKS = (b"/docker/registry", b"DriverName", b'"Path"', b"filesystem")


def auth(user: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{PASSWORDS[user]}".encode()).decode()


def creds(user: str) -> tuple[str, str]:
    return user, PASSWORDS[user]


@dataclass
class Setup:
    registry: Registry
    gateway: Gateway
    secret_blob: str  # a digest linked only in secret/hidden
    public_blob: str  # a layer of public/app
    public_manifest: str

    def linked(self, repository: str, digest: str) -> bool:
        algorithm, hex_digest = digest.split(":")
        root = self.registry.storage / "docker/registry/v2/repositories" / repository
        return (root / "_layers" / algorithm / hex_digest / "link").exists()


def push_blob(host: str, repository: str, data: bytes, user: str = "admin") -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    status, headers, _ = http_request(host, "POST", f"/v2/{repository}/blobs/uploads/", creds(user))
    assert status == 202, status
    location = headers["Location"]
    location = location[location.index("/v2/") :]
    status, _, body = http_request(
        host,
        "PUT",
        f"{location}&digest={digest}",
        creds(user),
        data,
        {"Content-Type": "application/octet-stream"},
    )
    assert status == 201, (status, body)
    return digest


def push_image(host: str, repository: str, tag: str) -> tuple[str, str]:
    config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers"}}).encode()
    layer = f"layer of {repository} {time.time()}".encode()
    config_digest = push_blob(host, repository, config)
    layer_digest = push_blob(host, repository, layer)
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": config_digest,
                "size": len(config),
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": layer_digest,
                    "size": len(layer),
                }
            ],
        }
    ).encode()
    status, headers, body = http_request(
        host,
        "PUT",
        f"/v2/{repository}/manifests/{tag}",
        creds("admin"),
        manifest,
        {"Content-Type": OCI_MANIFEST},
    )
    assert status == 201, (status, body)
    return layer_digest, headers["Docker-Content-Digest"]


def gateway_with_policy(
    tmp_path: Path, registry: Registry, *flags: str, env: dict[str, str] | None = None
) -> Gateway:
    users = tmp_path / "htpasswd"
    if not users.exists():
        for user, password in PASSWORDS.items():
            htpasswd_add(users, user, password)
    policy = tmp_path / "policy.yml"
    policy.write_text(POLICY)
    return start_gateway(tmp_path, registry.url, users, "--policy", str(policy), *flags, env=env)


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    registry = start_registry(tmp_path)
    gateway = None
    try:
        registry_host = registry.url.removeprefix("http://")
        secret = push_blob(registry_host, "secret/hidden", f"secret layer {time.time()}".encode())
        public_blob, public_manifest = push_image(registry_host, "public/app", "1")
        gateway = gateway_with_policy(tmp_path, registry)
        yield Setup(registry, gateway, secret, public_blob, public_manifest)
    finally:
        if gateway is not None:
            stop(gateway.process)
        stop(registry.process)


def exchange(host: str, data: bytes, timeout: float = 5, *, until_close: bool = False) -> bytes:
    """Send raw bytes on a fresh connection; what came back once one response is complete (or the
    peer closed, or `timeout` passed)."""
    address, port = host.split(":")
    received = b""
    deadline = time.monotonic() + timeout
    with socket.create_connection((address, int(port)), timeout=timeout) as sock:
        sock.sendall(data)
        while time.monotonic() < deadline:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = sock.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not chunk:
                break
            received += chunk
            if not until_close and _complete(received):
                break
    return received


def _complete(data: bytes) -> bool:
    head, sep, rest = data.partition(b"\r\n\r\n")
    if not sep or head.startswith(b"HTTP/1.1 100"):
        return False
    match = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    return match is not None and len(rest) >= int(match.group(1))


def statuses(data: bytes) -> list[int]:
    return [int(code) for code in re.findall(rb"(?m)^HTTP/1\.[01] (\d{3})", data)]


def closed_by_peer(sock: socket.socket, within: float) -> bool:
    sock.settimeout(within)
    try:
        while sock.recv(65536):
            pass
        return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def storage_state(registry: Registry) -> dict[str, str]:
    root = registry.storage
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


# 1. Cross-repository mounts hidden in a form body: distribution's r.FormValue reads them.


def test_mount_in_a_form_body_is_refused_and_links_nothing(setup: Setup) -> None:
    host, secret = setup.gateway.host, setup.secret_blob
    # The control: the same mount in the query, by a user who may pull the source, does link the
    # blob; so a variant below that linked it would be caught.
    status, _, _ = http_request(
        host, "POST", f"/v2/admin/copy/blobs/uploads/?mount={secret}&from=secret%2Fhidden", creds("admin")
    )
    assert status == 201 and setup.linked("admin/copy", secret)

    multipart = (
        f'--XX\r\nContent-Disposition: form-data; name="mount"\r\n\r\n{secret}\r\n'
        '--XX\r\nContent-Disposition: form-data; name="from"\r\n\r\nsecret/hidden\r\n--XX--\r\n'
    )
    mount_only = f'--XX\r\nContent-Disposition: form-data; name="mount"\r\n\r\n{secret}\r\n--XX--\r\n'
    form = "application/x-www-form-urlencoded"
    variants = [
        ("", f"mount={secret}&from=secret/hidden", form),
        ("", f"mount={secret}&from=secret%2Fhidden", form + "; charset=utf-8"),
        ("", f"mount={secret}&from=secret/hidden", "Application/X-WWW-Form-URLEncoded"),
        ("?from=secret%2Fhidden", f"mount={secret}", form),
        (f"?mount={secret}", "from=secret/hidden", form),
        # A pullable `from` in the query, overridden by the one in the body (Go reads the body first).
        (f"?mount={secret}&from=alice%2Fx", "from=secret/hidden", form),
        ("", multipart, "multipart/form-data; boundary=XX"),
        ("?from=secret%2Fhidden", mount_only, "multipart/form-data; boundary=XX"),
    ]
    for query, body, content_type in variants:
        status, _, answer = http_request(
            host,
            "POST",
            f"/v2/alice/x/blobs/uploads/{query}",
            creds("alice"),
            body.encode(),
            {"Content-Type": content_type},
        )
        assert status == 415, (query, body, status, answer)
        assert json.loads(answer)["errors"][0]["code"] == "UNSUPPORTED"
    assert not setup.linked("alice/x", secret)
    status, _, _ = http_request(host, "HEAD", f"/v2/alice/x/blobs/{secret}", creds("alice"))
    assert status == 404
    # A mount from a repository alice may not pull, in the query, is an ordinary upload: 202, never
    # the 201 that would also tell her the digest exists there.
    status, _, _ = http_request(
        host, "POST", f"/v2/alice/x/blobs/uploads/?mount={secret}&from=secret%2Fhidden", creds("alice")
    )
    assert status == 202 and not setup.linked("alice/x", secret)


def test_mount_without_from_starts_an_ordinary_upload(setup: Setup) -> None:
    """OCI conformance: `?mount=<digest>` alone starts an upload (202), as the registry does."""
    status, headers, _ = http_request(
        setup.gateway.host, "POST", f"/v2/alice/x/blobs/uploads/?mount={setup.secret_blob}", creds("alice")
    )
    assert status == 202 and "/blobs/uploads/" in headers["Location"]
    assert not setup.linked("alice/x", setup.secret_blob)


# 3b. Content-Encoding: the registry stores the bytes as sent; so do we, byte for byte.


def test_content_encoded_bodies_are_stored_as_sent(setup: Setup) -> None:
    host = setup.gateway.host
    for body in (gzip.compress(b"x" * 10000), b"this is not gzip at all"):
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        status, headers, _ = http_request(host, "POST", "/v2/alice/enc/blobs/uploads/", creds("alice"))
        location = headers["Location"][headers["Location"].index("/v2/") :]
        status, _, answer = http_request(
            host,
            "PUT",
            f"{location}&digest={digest}",
            creds("alice"),
            body,
            {"Content-Encoding": "gzip", "Content-Type": "application/octet-stream"},
        )
        assert status == 201, answer
        hex_digest = digest.split(":")[1]
        stored = (
            setup.registry.storage / f"docker/registry/v2/blobs/sha256/{hex_digest[:2]}/{hex_digest}/data"
        )
        assert stored.read_bytes() == body


# 5 and 7. The catalog: total parsing, and no 1-bit leak of what sorts after the last name shown.


def test_catalog_paging_never_fails_and_never_leaks(setup: Setup) -> None:
    host = setup.gateway.host
    for query in ("n=%C2%B2", "n=" + "9" * 5000, "n=%EF%BC%91", "last=name%0A", "n=-1", "last=%E2%80%AE"):
        status, _, body = http_request(host, "GET", f"/v2/_catalog?{query}")
        assert 400 <= status < 500, (query, status, body)
    registry_host = setup.registry.url.removeprefix("http://")
    for hidden in ("zz/hidden", "public0/hidden"):  # both sort after public/app
        push_image(registry_host, hidden, "1")
    status, headers, body = http_request(host, "GET", "/v2/_catalog?n=1")
    assert status == 200 and json.loads(body)["repositories"] == ["public/app"]
    assert "Link" not in headers  # hidden repositories follow, and the answer must not say so
    push_image(registry_host, "public/zz", "1")
    status, headers, body = http_request(host, "GET", "/v2/_catalog?n=1")
    assert json.loads(body)["repositories"] == ["public/app"]
    assert headers["Link"] == '</v2/_catalog?last=public%2Fapp&n=1>; rel="next"'
    status, headers, body = http_request(host, "GET", "/v2/_catalog?last=public%2Fapp&n=1")
    assert json.loads(body)["repositories"] == ["public/zz"] and "Link" not in headers


# 6. Registry 500s (with its storage paths) never reach a client.


def test_references_the_registry_would_500_on(setup: Setup) -> None:
    host = setup.gateway.host
    references = ["sha256:" + "a" * 32, "foo:" + "a" * 64, "sha256+b64:" + "a" * 64, "sha256:" + "A" * 64]
    for credentials in (None, creds("reader")):
        for reference in references:
            for method in ("GET", "HEAD"):
                status, _, body = http_request(
                    host, method, f"/v2/public/app/manifests/{reference}", credentials
                )
                # Anonymous clients are challenged first, as for any request that names no operation.
                assert status == (400 if credentials else 401), (reference, status, body)
                assert not any(leak in body for leak in STORAGE_LEAKS)
                if method == "GET" and credentials:
                    assert json.loads(body)["errors"][0]["code"] == "DIGEST_INVALID"
        # The digest of a layer asked for as a manifest: the registry answers 500; it is not one.
        for method in ("GET", "HEAD"):
            status, _, body = http_request(
                host,
                method,
                f"/v2/public/app/manifests/{setup.public_blob}",
                credentials,
                headers={"Accept": OCI_MANIFEST},
            )
            assert status == 404, (method, status, body)
            assert not any(leak in body for leak in STORAGE_LEAKS)
    # ...while the registry itself does answer 500 with its storage path: what the gateway hides.
    status, _, body = http_request(
        setup.registry.url.removeprefix("http://"), "GET", "/v2/public/app/manifests/sha256:" + "a" * 32
    )
    assert status == 500 and b"/docker/registry/v2/repositories" in body


# 8 and conformance: the smaller ones.


def test_small_protocol_defects(setup: Setup) -> None:
    host = setup.gateway.host
    # Requests aiohttp's parser refuses: HTTP/1.1, registry format, no software versions.
    answer = exchange(host, b"GET /v2/ HTTP/9\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400"), answer
    assert b"aiohttp" not in answer and b"Python" not in answer and b"Server: registry-gateway" in answer
    # A Host whose port does not exist is not reflected into Location.
    answer = exchange(
        host,
        f"POST /v2/alice/x/blobs/uploads/ HTTP/1.1\r\nHost: x:99999\r\nAuthorization: {auth('alice')}\r\n\r\n".encode(),
    )
    assert statuses(answer) == [400] and b"99999" not in answer
    # Upgrade: h2c with a pipelined second request: the first answered, the connection closed, no hang.
    started = time.monotonic()
    answer = exchange(
        host,
        f"GET /v2/ HTTP/1.1\r\nHost: x\r\nAuthorization: {auth('reader')}\r\nConnection: Upgrade, HTTP2-Settings\r\n"
        f"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n"
        f"GET /v2/ HTTP/1.1\r\nHost: x\r\nAuthorization: {auth('reader')}\r\n\r\n".encode(),
        timeout=20,
        until_close=True,
    )
    assert statuses(answer)[0] == 200 and b"Connection: close" in answer
    assert time.monotonic() - started < 15  # closed by the gateway, not by our timeout
    # The registry's plain-text 404 (no referrers API in 2.8) comes back in its JSON error format.
    status, headers, body = http_request(host, "GET", f"/v2/public/app/referrers/{setup.public_manifest}")
    assert status == 404 and headers["Content-Type"].startswith("application/json")
    assert json.loads(body)["errors"][0]["code"] == "NOT_FOUND"


def test_unknown_reference_is_a_404_after_authentication(setup: Setup) -> None:
    """OCI conformance: a reference no route takes is the registry's 404, in JSON; and like any
    request it is answered only once the client authenticated."""
    host = setup.gateway.host
    for method in ("GET", "HEAD"):
        for repository in ("alice/x", "public/app"):  # anonymous users may pull public/*
            status, headers, _ = http_request(
                host, method, f"/v2/{repository}/manifests/.INVALID_MANIFEST_NAME"
            )
            assert status == 401 and headers["WWW-Authenticate"].startswith("Basic")
        status, headers, body = http_request(
            host, method, "/v2/alice/x/manifests/.INVALID_MANIFEST_NAME", creds("alice")
        )
        assert status == 404 and headers["Content-Type"].startswith("application/json")
        if method == "GET":
            assert json.loads(body)["errors"][0]["code"] == "MANIFEST_UNKNOWN"
    status, _, _ = http_request(host, "GET", "/v2/alice/x/manifests/.bad", ("alice", "wrong"))
    assert status == 401


def test_expect_continue_only_after_authorization(setup: Setup) -> None:
    host = setup.gateway.host
    _, headers, _ = http_request(host, "POST", "/v2/alice/x/blobs/uploads/", creds("alice"))
    location = headers["Location"][headers["Location"].index("/v2/") :]
    head = f"PATCH {location} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 5\r\nExpect: 100-continue\r\n"
    # Not authenticated, or not allowed: refused before the client sends a byte of its body.
    for extra in ("", f"Authorization: {auth('reader')}\r\n"):
        answer = exchange(host, (head + extra + "\r\n").encode())
        assert b"100 Continue" not in answer and statuses(answer)[0] in (401, 403), answer
        assert b"Connection: close" in answer
    # Allowed: 100 Continue, then the body, then the registry's answer.
    address, port = host.split(":")
    with socket.create_connection((address, int(port)), timeout=10) as sock:
        sock.sendall((head + f"Authorization: {auth('alice')}\r\n\r\n").encode())
        interim = sock.recv(1024)
        assert interim.startswith(b"HTTP/1.1 100 Continue"), interim
        sock.sendall(b"hello")
        final = sock.recv(65536)
        assert final.startswith(b"HTTP/1.1 202"), final


# 2, 3a, 4: each DoS shape, held open, while an admin is still served.


def test_dos_shapes_do_not_starve_others(tmp_path: Path, registry: Registry) -> None:
    dos_shapes_against(tmp_path, registry)


def dos_shapes_against(tmp_path: Path, registry: Registry) -> None:
    registry_host = registry.url.removeprefix("http://")
    _, manifest = push_image(registry_host, "public/app", "1")
    gw = gateway_with_policy(
        tmp_path,
        registry,
        env={
            "GATEWAY_UPSTREAM_CONNECTIONS": "4",
            "GATEWAY_HEADER_TIMEOUT": "3",
            "GATEWAY_BODY_TIMEOUT": "3",
            "GATEWAY_MAX_CONNECTIONS": "200",
        },
    )
    address, port = gw.host.split(":")
    held: list[socket.socket] = []
    stop_trickling = threading.Event()

    def connect() -> socket.socket:
        sock = socket.create_connection((address, int(port)), timeout=10)
        held.append(sock)
        return sock

    def upload_location(user: str) -> str:
        _, headers, _ = http_request(gw.host, "POST", f"/v2/{user}/dos/blobs/uploads/", creds(user))
        return headers["Location"][headers["Location"].index("/v2/") :]

    try:
        # (2) A complete request, then the next head one byte at a time.
        slow_heads = []
        for _ in range(8):
            sock = connect()
            sock.sendall(f"GET /v2/ HTTP/1.1\r\nHost: x\r\nAuthorization: {auth('reader')}\r\n\r\n".encode())
            assert sock.recv(4096).startswith(b"HTTP/1.1 200")
            slow_heads.append(sock)

        def trickle() -> None:
            for byte in b"GET /v2/ HTTP/1.1\r\nHost: x\r\n":
                for sock in slow_heads:
                    with contextlib.suppress(OSError):
                        sock.sendall(bytes([byte]))
                if stop_trickling.wait(0.5):
                    return

        trickler = threading.Thread(target=trickle, daemon=True)
        trickler.start()
        # (3a) Anonymous catalog GETs announcing a body that never comes.
        catalog = [connect() for _ in range(8)]
        for sock in catalog:
            sock.sendall(b"GET /v2/_catalog HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\n")
        # (4) Anonymous GETs of a public manifest declaring a long body, sent a byte at a time.
        declared = [connect() for _ in range(8)]
        for sock in declared:
            sock.sendall(
                b"GET /v2/public/app/manifests/1 HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\na"
            )
        # (4) Uploads that stall mid-body, and one whose chunking is malformed after a pause.
        stalled = []
        for _ in range(6):
            # The upload is started before its socket opens: the POST may wait for a registry
            # connection held by the uploads already stalled, longer than header_timeout, and a
            # socket opened first would be closed as a slow head (a bare close, not a 408).
            location = upload_location("alice")
            sock = connect()
            sock.sendall(
                f"PATCH {location} HTTP/1.1\r\nHost: x\r\nAuthorization: {auth('alice')}\r\n"
                "Content-Length: 100000\r\n\r\nabc".encode()
            )
            stalled.append(sock)
        location = upload_location("alice")
        bad_chunk = connect()
        bad_chunk.sendall(
            f"PATCH {location} HTTP/1.1\r\nHost: x\r\nAuthorization: {auth('alice')}\r\n"
            "Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n".encode()
        )
        time.sleep(0.5)
        bad_chunk.sendall(b"zz\r\n")

        # Meanwhile an admin pulls and pushes, each request answered at once.
        for _ in range(3):
            status, _, _ = http_request(
                gw.host,
                "GET",
                f"/v2/public/app/manifests/{manifest}",
                creds("admin"),
                headers={"Accept": OCI_MANIFEST},
            )
            assert status == 200
        push_blob(gw.host, "admin/still-works", f"pushed during the attack {time.time()}".encode())

        # Each shape got a 4xx or was cut off, within a few seconds of its limit.
        for sock in catalog + declared:
            answer = sock.recv(65536)
            assert statuses(answer) == [400], answer
        for index, sock in enumerate(stalled):
            sock.settimeout(10)
            answer = sock.recv(65536)
            # On failure, the gateway's log says what it did with this upload.
            assert statuses(answer) == [408], (index, answer, gw.log.read_text()[-4000:])
        bad_chunk.settimeout(10)
        answer = bad_chunk.recv(65536)
        assert statuses(answer) == [400] and b"malformed request body" in answer
        assert all(closed_by_peer(sock, within=10) for sock in slow_heads)
    finally:
        stop_trickling.set()
        for sock in held:
            sock.close()
        stop(gw.process)
    assert "Traceback" not in gw.log.read_text()


def test_head_size_is_capped_in_total(tmp_path: Path, registry: Registry) -> None:
    """128 header lines of 16 KiB each pass the per-line limit; the head as a whole may not."""
    head_size_capped(tmp_path, registry)


def head_size_capped(tmp_path: Path, registry: Registry) -> None:
    gw = gateway_with_policy(tmp_path, registry)
    try:
        lines = b"".join(b"X-Filler-%d: %s\r\n" % (i, b"a" * 8000) for i in range(100))
        address, port = gw.host.split(":")
        with socket.create_connection((address, int(port)), timeout=10) as sock:
            try:
                sock.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n" + lines)
                answer = sock.recv(65536)
                assert answer == b"" or answer.startswith(b"HTTP/1.1 431"), answer
            except (ConnectionResetError, BrokenPipeError):
                pass  # cut off while still sending: refused all the same
            assert closed_by_peer(sock, within=5)
        assert http_request(gw.host, "GET", "/v2/", creds("reader"))[0] == 200
    finally:
        stop(gw.process)


# Acceptance 2: a corpus of hostile requests, as a read-only and as an anonymous user.

DIGEST = "sha256:" + "b" * 64
UPLOADS = "/v2/public/app/blobs/uploads/"
CORPUS: list[bytes] = [
    # Smuggling shapes: two framings, obfuscated Transfer-Encoding, bad lengths.
    b"POST UPLOADS HTTP/1.1\r\nHost: H\r\nAUTHContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /v2/ HTTP/1.1\r\nHost: H\r\n\r\n",
    b"POST UPLOADS HTTP/1.1\r\nHost: H\r\nAUTHTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n",
    b"POST UPLOADS HTTP/1.1\r\nHost: H\r\nAUTHTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
    b"POST UPLOADS HTTP/1.1\r\nHost: H\r\nAUTHTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
    b"POST UPLOADS HTTP/1.1\r\nHost: H\r\nAUTHTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
    b"POST UPLOADS HTTP/1.1\r\nHost: H\r\nAUTHTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"POST UPLOADS HTTP/1.1\r\nHost: H\r\nAUTHTransfer-Encoding:\tchunked\r\n\r\n0\r\n\r\n",
    b"POST UPLOADS HTTP/1.1\r\nHost: H\r\nAUTHContent-Length: 1, 1\r\n\r\nx",
    b"POST UPLOADS HTTP/1.1\r\nHost: H\r\nAUTHContent-Length: -1\r\n\r\n",
    b"POST UPLOADS HTTP/1.1\r\nHost: H\r\nAUTHContent-Length: 0\r\nContent-Length: 5\r\n\r\nhello",
    b"POST UPLOADS HTTP/1.1\r\nHost: H\r\nAUTHContent-Length: 99999999999999999999999\r\n\r\n",
    b"POST UPLOADS HTTP/1.1\r\nHost: H\r\nAUTHTransfer-Encoding: chunked\r\n\r\nffffffffffffffffffff\r\nx\r\n0\r\n\r\n",
    b'POST UPLOADS HTTP/1.1\r\nHost: H\r\nAUTHTransfer-Encoding: chunked\r\n\r\n5;ext="\r\n"\r\nhello\r\n0\r\n\r\n',
    b"POST UPLOADS HTTP/1.1\nHost: H\nAUTHContent-Length: 0\n\n",
    b"POST UPLOADS HTTP/1.1\r\nHost: H\r\n AUTHContent-Length: 0\r\n\r\n",
    b"POST UPLOADS HTTP/1.1\r\nHost: H\r\nAUTHX: a\rb\r\nContent-Length: 0\r\n\r\n",
    b"POST UPLOADS HTTP/1.0\r\nHost: H\r\nAUTHTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"GET /v2/ HTTP/1.1\r\nHost: H\r\nAUTHContent-Length: 5\r\n\r\nGET /v2/_catalog HTTP/1.1\r\n\r\n",
    # Methods.
    b"PUT /v2/public/app/manifests/x HTTP/1.1\r\nHost: H\r\nAUTHContent-Type: application/vnd.oci.image.manifest.v1+json\r\nContent-Length: 2\r\n\r\n{}",
    b"DELETE /v2/public/app/manifests/DIGEST HTTP/1.1\r\nHost: H\r\nAUTH\r\n",
    b"DELETE /v2/public/app/blobs/DIGEST HTTP/1.1\r\nHost: H\r\nAUTH\r\n",
    b"PATCH /v2/public/app/blobs/uploads/abc HTTP/1.1\r\nHost: H\r\nAUTHContent-Length: 3\r\n\r\nabc",
    b"PUT /v2/public/app/blobs/uploads/abc?digest=DIGEST HTTP/1.1\r\nHost: H\r\nAUTHContent-Length: 0\r\n\r\n",
    b"CONNECT H:5000 HTTP/1.1\r\nHost: H\r\nAUTH\r\n",
    b"TRACE /v2/ HTTP/1.1\r\nHost: H\r\nAUTH\r\n",
    b"OPTIONS * HTTP/1.1\r\nHost: H\r\nAUTH\r\n",
    b"PROPFIND /v2/public/app/tags/list HTTP/1.1\r\nHost: H\r\nAUTH\r\n",
    b"get /v2/ HTTP/1.1\r\nHost: H\r\nAUTH\r\n",
    b"POST /v2/public/app/manifests/x HTTP/1.1\r\nHost: H\r\nAUTHContent-Length: 0\r\n\r\n",
    # Paths.
    b"POST /v2/public/app/../../alice/x/blobs/uploads/ HTTP/1.1\r\nHost: H\r\nAUTH\r\n",
    b"POST /v2/public/app/%2e%2e/%2e%2e/alice/x/blobs/uploads/ HTTP/1.1\r\nHost: H\r\nAUTH\r\n",
    b"POST /v2/alice%2Fx/blobs/uploads/ HTTP/1.1\r\nHost: H\r\nAUTH\r\n",
    b"POST //v2/alice/x/blobs/uploads/ HTTP/1.1\r\nHost: H\r\nAUTH\r\n",
    b"POST /v2/alice/x/blobs/uploads/#frag HTTP/1.1\r\nHost: H\r\nAUTH\r\n",
    b"POST http://H/v2/alice/x/blobs/uploads/ HTTP/1.1\r\nHost: H\r\nAUTH\r\n",
    b"GET /v2/public/app/manifests/sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa HTTP/1.1\r\nHost: H\r\nAUTH\r\n",
    b"GET /v2/public/app/manifests/foo:" + b"a" * 64 + b" HTTP/1.1\r\nHost: H\r\nAUTH\r\n",
    b"GET /v2/" + b"a" * 300 + b"/tags/list HTTP/1.1\r\nHost: H\r\nAUTH\r\n",
    b"GET /v2/public/app/manifests/latest\x00 HTTP/1.1\r\nHost: H\r\nAUTH\r\n",
    b"GET /v2/public/app/manifests/\xc3\xa9 HTTP/1.1\r\nHost: H\r\nAUTH\r\n",
    # Queries.
    b"POST /v2/public/app/blobs/uploads/?mount=DIGEST&from=secret%2Fhidden HTTP/1.1\r\nHost: H\r\nAUTH\r\n",
    b"POST /v2/public/app/blobs/uploads/?mount=DIGEST;from=secret%2Fhidden HTTP/1.1\r\nHost: H\r\nAUTH\r\n",
    b"POST /v2/public/app/blobs/uploads/?mount=DIGEST&from=a&from=secret%2Fhidden HTTP/1.1\r\nHost: H\r\nAUTH\r\n",
    b"POST /v2/public/app/blobs/uploads/?mount=DIGEST&fr%6Fm=secret%2Fhidden HTTP/1.1\r\nHost: H\r\nAUTH\r\n",
    b"GET /v2/_catalog?n=%C2%B2 HTTP/1.1\r\nHost: H\r\nAUTH\r\n",
    b"GET /v2/_catalog?n=99999999999999999999999999 HTTP/1.1\r\nHost: H\r\nAUTH\r\n",
    b"GET /v2/_catalog?last=a%0A HTTP/1.1\r\nHost: H\r\nAUTH\r\n",
    b"GET /v2/public/app/tags/list?n=%zz HTTP/1.1\r\nHost: H\r\nAUTH\r\n",
    b"GET /v2/public/app/tags/list?n=1#x HTTP/1.1\r\nHost: H\r\nAUTH\r\n",
    b"PATCH /v2/public/app/blobs/uploads/abc HTTP/1.1\r\nHost: H\r\nAUTHContent-Type: text/plain\r\nContent-Length: 3\r\n\r\nabc",
    # Bodies.
    b"POST UPLOADS HTTP/1.1\r\nHost: H\r\nAUTHContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 28\r\n\r\nmount=x&from=secret%2Fhidden",
    b"POST UPLOADS HTTP/1.1\r\nHost: H\r\nAUTHContent-Type: multipart/form-data; boundary=B\r\nContent-Length: 4\r\n\r\n--B-",
    b"POST UPLOADS HTTP/1.1\r\nHost: H\r\nAUTHContent-Encoding: gzip\r\nContent-Length: 5\r\n\r\nhello",
    b"POST UPLOADS HTTP/1.1\r\nHost: H\r\nAUTHContent-Encoding: deflate\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    # Headers.
    b"GET /v2/ HTTP/1.1\r\nHost: H:99999\r\nAUTH\r\n",
    b"GET /v2/ HTTP/1.1\r\nHost: H\r\nHost: evil\r\nAUTH\r\n",
    b"GET /v2/ HTTP/1.1\r\nHost: evil/x\r\nAUTH\r\n",
    b"GET /v2/ HTTP/1.1\r\nAUTH\r\n",
    b"POST UPLOADS HTTP/1.1\r\nHost: H\r\nAUTHX-Forwarded-Host: evil.example\r\nForwarded: host=evil\r\nX-Forwarded-Proto: gopher\r\n\r\n",
    b"POST UPLOADS HTTP/1.1\r\nHost: H\r\nAUTHExpect: 100-continue\r\nContent-Length: 5\r\n\r\nhello",
    b"POST UPLOADS HTTP/1.1\r\nHost: H\r\nAUTHExpect: 999-nonsense\r\nContent-Length: 0\r\n\r\n",
    b"GET /v2/ HTTP/1.1\r\nHost: H\r\nAUTHConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: x\r\nSec-WebSocket-Version: 13\r\n\r\n",
    b"GET /v2/ HTTP/1.1\r\nHost: H\r\nAUTHConnection: Upgrade\r\nUpgrade: h2c\r\n\r\nGET /v2/_catalog HTTP/1.1\r\nHost: H\r\n\r\n",
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
    b"GET /v2/ HTTP/1.1\r\nHost: H\r\nAuthorization: Basic !!!!\r\n\r\n",
    b"GET /v2/ HTTP/1.1\r\nHost: H\r\nAuthorization: Bearer abc.def.ghi\r\n\r\n",
    b"GET /v2/ HTTP/1.1\r\nHost: H\r\nAUTHAuthorization: Basic YWRtaW46d3Jvbmc=\r\n\r\n",
]


def test_hostile_corpus_changes_nothing_and_never_answers_5xx(setup: Setup) -> None:
    host = setup.gateway.host
    before = storage_state(setup.registry)
    problems = []
    for role in ("reader", None):
        authorization = f"Authorization: {auth(role)}\r\n".encode() if role else b""
        for template in CORPUS:
            request = (
                template.replace(b"UPLOADS", UPLOADS.encode())
                .replace(b"DIGEST", setup.secret_blob.encode())
                .replace(b"Host: H", f"Host: {host}".encode())
                .replace(b"AUTH", authorization)
            )
            answer = exchange(host, request, timeout=4)
            codes = statuses(answer)
            if not codes or any(code >= 500 for code in codes):
                problems.append((role, template[:80], answer[:200]))
            if any(leak in answer for leak in STORAGE_LEAKS):
                problems.append((role, template[:80], b"storage path"))
            # Anonymous users may only pull public/* and see the filtered catalog.
            if (
                role is None
                and any(200 <= code < 300 for code in codes)
                and b"GET /v2/_catalog" not in request
            ):
                problems.append((role, template[:80], answer[:200]))
    assert problems == []
    assert storage_state(setup.registry) == before
    log = setup.gateway.log.read_text()
    assert "Traceback" not in log and "internal error" not in log


def test_parked_heads_hold_bounded_memory(tmp_path: Path, registry: Registry) -> None:
    """Each header line within max_header_size, 128 of them: about 1.5 MiB a head that aiohttp
    would buffer per connection. The total cap refuses each at max_head_size instead."""
    parked_heads_against(tmp_path, registry)


def parked_heads_against(tmp_path: Path, registry: Registry) -> None:
    gw = gateway_with_policy(tmp_path, registry)
    address, port = gw.host.split(":")
    head = b"GET /v2/ HTTP/1.1\r\nHost: x\r\n" + b"".join(
        b"X-Line-%d: %s\r\n" % (i, b"a" * 12000) for i in range(127)
    )
    held = []
    try:
        before = gw.rss_kib()
        for _ in range(100):
            sock = socket.create_connection((address, int(port)), timeout=5)
            held.append(sock)
            with contextlib.suppress(OSError):
                sock.sendall(head)  # never the blank line that would end it
        time.sleep(1)
        grown_mib = (gw.rss_kib() - before) / 1024
        assert grown_mib < 40, f"RSS grew by {grown_mib:.0f} MiB for 100 parked heads"
        assert all(closed_by_peer(sock, within=5) for sock in held)
        assert http_request(gw.host, "GET", "/v2/", creds("reader"))[0] == 200
    finally:
        for sock in held:
            sock.close()
        stop(gw.process)


def test_slow_readers_and_trickled_uploads_cannot_hold_the_registry(
    tmp_path: Path, registry: Registry
) -> None:
    """Clients that stop reading a big blob, or send a body a byte at a time, each hold a registry
    connection; with them all taken, others would wait forever."""
    slow_clients_against(tmp_path, registry)


def slow_clients_against(tmp_path: Path, registry: Registry) -> None:
    registry_host = registry.url.removeprefix("http://")
    big = push_blob(registry_host, "public/app", os.urandom(16 * 1024 * 1024))
    gw = gateway_with_policy(
        tmp_path,
        registry,
        env={
            "GATEWAY_UPSTREAM_CONNECTIONS": "2",
            "GATEWAY_BODY_TIMEOUT": "6",
            "GATEWAY_CONNECT_TIMEOUT": "2",
        },
    )
    address, port = gw.host.split(":")
    held: list[socket.socket] = []
    try:
        # Two anonymous readers (public/* may be pulled by anyone) take both registry connections.
        for _ in range(2):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect((address, int(port)))
            sock.sendall(f"GET /v2/public/app/blobs/{big} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            held.append(sock)
        time.sleep(0.5)
        # Meanwhile an admin is answered, not left waiting: 504 after connect_timeout (2 s) while
        # the readers hold every registry connection (until body_timeout, 6 s, cuts them).
        status, _, body = http_request(gw.host, "GET", "/v2/admin/x/tags/list", creds("admin"))
        assert status == 504, (status, body)
        assert b"every connection to it is busy" in body
        # Reading now would make them fast readers: stay silent past body_timeout first.
        time.sleep(9)
        assert all(closed_by_peer(sock, within=15) for sock in held)
        status, _, _ = http_request(gw.host, "GET", f"/v2/public/app/blobs/{big}", creds("admin"))
        assert status == 200

        # An upload sent a byte every half second: never idle for body_timeout, yet cut.
        _, headers, _ = http_request(gw.host, "POST", "/v2/alice/t/blobs/uploads/", creds("alice"))
        location = headers["Location"][headers["Location"].index("/v2/") :]
        trickle = socket.create_connection((address, int(port)), timeout=20)
        held.append(trickle)
        trickle.sendall(
            f"PATCH {location} HTTP/1.1\r\nHost: x\r\nAuthorization: {auth('alice')}\r\n"
            "Content-Length: 1000000\r\nContent-Type: application/octet-stream\r\n\r\n".encode()
        )
        answer = b""
        trickle.setblocking(False)
        for _ in range(30):
            with contextlib.suppress(OSError):
                trickle.sendall(b"x")
            time.sleep(0.5)
            with contextlib.suppress(BlockingIOError):
                answer += trickle.recv(65536)
            if answer:
                break
        assert statuses(answer) == [408], answer
    finally:
        for sock in held:
            sock.close()
        stop(gw.process)
    assert "client took no response bytes" in gw.log.read_text()


def test_a_partial_head_pipelined_after_a_request_is_timed_too(setup: Setup, tmp_path: Path) -> None:
    gw = gateway_with_policy(tmp_path, setup.registry, env={"GATEWAY_HEADER_TIMEOUT": "2"})
    try:
        address, port = gw.host.split(":")
        with socket.create_connection((address, int(port)), timeout=30) as sock:
            sock.sendall(
                b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\nGET /v2/ HTTP/1.1\r\nHost: x\r\n"
                + b"".join(b"X-P%d: %s\r\n" % (i, b"a" * 8000) for i in range(5))
            )
            started = time.monotonic()
            assert closed_by_peer(sock, within=20)
            assert time.monotonic() - started < 15  # header_timeout, not keepalive_timeout (75 s)
    finally:
        stop(gw.process)


def test_idle_kept_alive_connections_are_closed(tmp_path: Path, registry: Registry) -> None:
    """aiohttp's own default keeps an idle connection for an hour: keepalive_timeout does."""
    gw = gateway_with_policy(tmp_path, registry, env={"GATEWAY_KEEPALIVE_TIMEOUT": "1"})
    try:
        address, port = gw.host.split(":")
        with socket.create_connection((address, int(port)), timeout=30) as sock:
            sock.sendall(f"GET /v2/ HTTP/1.1\r\nHost: x\r\nAuthorization: {auth('reader')}\r\n\r\n".encode())
            assert sock.recv(4096).startswith(b"HTTP/1.1 200")
            started = time.monotonic()
            assert closed_by_peer(sock, within=20)
            assert time.monotonic() - started < 15  # keepalive_timeout, not aiohttp's hour
    finally:
        stop(gw.process)


def test_a_layer_digest_asked_as_a_manifest_is_404_with_one_registry_connection(
    tmp_path: Path, registry: Registry
) -> None:
    """The blob probe behind that 404 needs a registry connection of its own: with the pool at one,
    the answer it probes must not hold the only one (it would wait connect_timeout, then 500)."""
    blob, _ = push_image(registry.url.removeprefix("http://"), "public/app", "1")
    gw = gateway_with_policy(
        tmp_path, registry, env={"GATEWAY_UPSTREAM_CONNECTIONS": "1", "GATEWAY_CONNECT_TIMEOUT": "3"}
    )
    try:
        status, _, body = http_request(
            gw.host,
            "GET",
            f"/v2/public/app/manifests/{blob}",
            creds("admin"),
            headers={"Accept": OCI_MANIFEST},
        )
        assert status == 404 and json.loads(body)["errors"][0]["code"] == "MANIFEST_UNKNOWN", body
        # The registry's own 500 body (its storage path) is not shown.
        assert b"/docker/registry/v2" not in body
    finally:
        stop(gw.process)
