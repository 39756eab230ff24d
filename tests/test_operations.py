"""Operations against the real registry: audit log, metrics and health, lockout, TLS, faults."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.client
import json
import os
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from gateway.audit import AuditLog, AuditLogError, AuditRecord, new_record
from gateway.runtime import run_each
from gateway.sample_image import write_image
from tests.conftest import (
    USERS,
    Gateway,
    Registry,
    free_port,
    http_request,
    require,
    skopeo_copy,
    start_gateway,
    start_registry,
    stop,
    write_authfile,
)


def auth_file(path: Path, host: str, user: str) -> Path:
    return write_authfile(path, host, (user, USERS[user]))


def copy(src: str, dst: str, auth: Path, *tls: str) -> subprocess.CompletedProcess[str]:
    return skopeo_copy(src, dst, auth, *tls)


def call(
    gateway: Gateway,
    method: str,
    path: str,
    user: str | None = None,
    password: str | None = None,
    body: bytes | None = None,
) -> tuple[int, dict[str, str], bytes]:
    credentials = None if user is None else (user, USERS.get(user, "") if password is None else password)
    return http_request(gateway.host, method, path, credentials, body)


def test_audit_log_records_push_and_pull_without_secrets(
    tmp_path: Path, registry: Registry, users_file: Path
) -> None:
    audit = tmp_path / "audit.jsonl"
    metrics_port = free_port()
    gw = start_gateway(
        tmp_path,
        registry.url,
        users_file,
        "--audit-log",
        str(audit),
        "--metrics-listen",
        f"127.0.0.1:{metrics_port}",
    )
    try:
        image = tmp_path / "image"
        manifest_digest = write_image(image, "v1", layers=2, layer_bytes=50_000)
        layer_bytes = sum(p.stat().st_size for p in (image / "blobs" / "sha256").iterdir())
        pushed = copy(
            f"oci:{image}:v1",
            f"docker://{gw.host}/audited/app:v1",
            auth_file(tmp_path / "a.json", gw.host, "admin"),
        )
        assert pushed.returncode == 0, pushed.stderr
        pulled = copy(
            f"docker://{gw.host}/audited/app:v1",
            f"oci:{tmp_path / 'out'}:v1",
            auth_file(tmp_path / "b.json", gw.host, "alice"),
        )
        assert pulled.returncode == 0, pulled.stderr
        assert call(gw, "PUT", "/v2/audited/app/manifests/nope", "alice", body=b"{}")[0] == 403

        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics") as response:
            exposition = response.read().decode()
    finally:
        stop(gw.process)

    records = [json.loads(line) for line in audit.read_text().splitlines()]
    pushes = [r for r in records if r["operation"] == "push" and r["user"] == "admin"]
    manifest_put = [r for r in pushes if r["method"] == "PUT" and "/manifests/" in r["path"]]
    assert len(manifest_put) == 1
    assert manifest_put[0]["reference"] == "v1"
    assert manifest_put[0]["digest"] == manifest_digest
    assert manifest_put[0]["status"] == 201 and manifest_put[0]["repository"] == "audited/app"
    assert manifest_put[0]["decision"] == "allow"
    # Every byte of the image went up, and is accounted for in the upload records.
    assert sum(r["bytes_in"] for r in pushes) == layer_bytes
    pulls = [r for r in records if r["operation"] == "pull" and r["user"] == "alice" and r["method"] == "GET"]
    assert sum(r["bytes_out"] for r in pulls if "/blobs/" in r["path"]) > 100_000
    denied = [r for r in records if r["status"] == 403]
    assert denied and denied[0]["decision"] == "deny" and denied[0]["user"] == "alice"
    assert all(r["client"] == "127.0.0.1" and r["duration_ms"] >= 0 for r in records)
    assert all(round(r["duration_ms"], 3) == r["duration_ms"] for r in records)  # in microseconds at most
    assert all("?" not in r["path"] for r in records)  # no query strings (signed upload state)

    everything = audit.read_text() + gw.log.read_text() + exposition
    for secret in USERS.values():
        assert secret not in everything
        assert base64.b64encode(secret.encode()).decode()[:12] not in everything
    assert "Authorization" not in audit.read_text()

    assert 'registry_gateway_requests_total{decision="allow",operation="push",status="201"}' in exposition
    assert 'registry_gateway_requests_total{decision="deny",operation="push",status="403"}' in exposition
    assert 'registry_gateway_credential_cache_total{result="hit"}' in exposition
    assert "registry_gateway_upstream_latency_seconds_bucket" in exposition
    assert "registry_gateway_in_flight_requests" in exposition
    assert "alice" not in exposition and "audited" not in exposition  # low-cardinality labels


def test_registry_down_at_start_then_up(tmp_path: Path, users_file: Path) -> None:
    registry_port = free_port()
    metrics_port = free_port()
    gw = start_gateway(
        tmp_path,
        f"http://127.0.0.1:{registry_port}",
        users_file,
        "--metrics-listen",
        f"127.0.0.1:{metrics_port}",
    )
    try:
        health = f"http://127.0.0.1:{metrics_port}"
        with urllib.request.urlopen(f"{health}/healthz") as response:
            assert response.status == 200
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(f"{health}/readyz")
        assert info.value.code == 503
        assert json.loads(info.value.read())["status"] == "unavailable"
        info.value.close()
        status, headers, body = call(gw, "GET", "/v2/a/manifests/x", "alice")
        assert status == 502
        assert json.loads(body)["errors"][0]["code"] == "UNAVAILABLE"
        assert headers["Docker-Distribution-Api-Version"] == "registry/2.0"

        # The registry comes up on that port: the gateway is ready without a restart.
        late = start_registry(tmp_path, registry_port, name="late").process
        try:
            with urllib.request.urlopen(f"{health}/readyz") as response:
                assert response.status == 200
            assert call(gw, "GET", "/v2/", "alice")[0] == 200
        finally:
            stop(late)
    finally:
        stop(gw.process)


def test_lockout_after_failed_logins_spares_other_users(
    tmp_path: Path, registry: Registry, users_file: Path
) -> None:
    gw = start_gateway(tmp_path, registry.url, users_file, env={"GATEWAY_LOCKOUT_ATTEMPTS": "5"})
    try:
        # The same wrong password again is one guess (clients retry, containerd asks twice) ...
        for _ in range(5):
            assert call(gw, "GET", "/v2/", "alice", "guess")[0] == 401
        assert call(gw, "GET", "/v2/", "alice", "guess")[0] == 401
        # ... different ones are counted: the fifth locks the pair.
        for attempt in range(4):
            assert call(gw, "GET", "/v2/", "alice", f"guess-{attempt}")[0] == 401
        for _ in range(1000):  # answered without bcrypt: cheap for us, useless for the guesser
            status, headers, body = call(gw, "GET", "/v2/", "alice", "guess")
            assert status == 429
        assert int(headers["Retry-After"]) > 0
        assert json.loads(body)["errors"][0]["code"] == "TOOMANYREQUESTS"
        # The right password does not get through a locked pair either, not even one the
        # gateway verified before (tests/test_guards.py tries every path) ...
        assert call(gw, "GET", "/v2/", "alice")[0] == 429
        # ... while another user carries on, pushing as usual.
        image = tmp_path / "image"
        write_image(image, "1", layers=1, layer_bytes=10_000)
        pushed = copy(
            f"oci:{image}:1",
            f"docker://{gw.host}/still/works:1",
            auth_file(tmp_path / "a.json", gw.host, "admin"),
        )
        assert pushed.returncode == 0, pushed.stderr
    finally:
        stop(gw.process)


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run([require("openssl"), *args], cwd=cwd, check=True, capture_output=True)


def make_ca(directory: Path) -> None:
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "2",
        "-subj",
        "/CN=gateway test CA",
        cwd=directory,
    )


def issue_cert(directory: Path, name: str, serial: str) -> None:
    (directory / "san.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        f"{name}.key.new",
        "-out",
        f"{name}.csr",
        "-subj",
        "/CN=127.0.0.1",
        cwd=directory,
    )
    _openssl(
        "x509",
        "-req",
        "-in",
        f"{name}.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-set_serial",
        serial,
        "-days",
        "2",
        "-extfile",
        "san.cnf",
        "-out",
        f"{name}.crt.new",
        cwd=directory,
    )
    os.replace(directory / f"{name}.key.new", directory / f"{name}.key")
    os.replace(directory / f"{name}.crt.new", directory / f"{name}.crt")


def issue_cert_aside(pki: Path, directory: Path, serial: str) -> Path:
    """`directory`, holding a server pair from the CA in `pki`, to be moved in a file at a time."""
    directory.mkdir()
    for name in ("ca.crt", "ca.key"):
        (directory / name).write_bytes((pki / name).read_bytes())
    issue_cert(directory, "server", serial)
    return directory


def served_serial(host: str, ca: Path) -> int:
    context = ssl.create_default_context(cafile=str(ca))
    address, port = host.split(":")
    with (
        socket.create_connection((address, int(port)), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=address) as tls,
    ):
        cert = tls.getpeercert()
        assert cert is not None
        return int(str(cert["serialNumber"]), 16)


def test_tls_push_pull_and_certificate_renewal(tmp_path: Path, registry: Registry, users_file: Path) -> None:
    pki = tmp_path / "pki"
    pki.mkdir()
    make_ca(pki)
    issue_cert(pki, "server", "1001")
    redirect_port = free_port()
    gw = start_gateway(
        tmp_path,
        registry.url,
        users_file,
        "--tls-cert",
        str(pki / "server.crt"),
        "--tls-key",
        str(pki / "server.key"),
        scheme="https",
        env={"GATEWAY_HSTS_MAX_AGE": "600", "GATEWAY_REDIRECT_LISTEN": f"127.0.0.1:{redirect_port}"},
    )
    try:
        # Plain HTTP on the redirect port sends clients to the same path over HTTPS.
        status, headers, _ = http_request(f"127.0.0.1:{redirect_port}", "GET", "/v2/tls/app/tags/list?n=1")
        assert status == 301
        assert headers["Location"] == f"https://127.0.0.1:{gw.host.split(':')[1]}/v2/tls/app/tags/list?n=1"
        certs = tmp_path / "certs"
        certs.mkdir()
        (certs / "ca.crt").write_bytes((pki / "ca.crt").read_bytes())
        image = tmp_path / "image"
        # Layers of 3 MB: pulled through the registry client's blocks (upstream._BlockReader),
        # whose views go to the TLS transport, and skopeo checks every layer's digest.
        digest = write_image(image, "1", layers=2, layer_bytes=3_000_000)
        pushed = copy(
            f"oci:{image}:1",
            f"docker://{gw.host}/tls/app:1",
            auth_file(tmp_path / "a.json", gw.host, "admin"),
            "--dest-cert-dir",
            str(certs),
        )
        assert pushed.returncode == 0, pushed.stderr
        out = tmp_path / "out"
        pulled = copy(
            f"docker://{gw.host}/tls/app:1",
            f"oci:{out}:1",
            auth_file(tmp_path / "b.json", gw.host, "alice"),
            "--src-cert-dir",
            str(certs),
        )
        assert pulled.returncode == 0, pulled.stderr
        assert json.loads((out / "index.json").read_text())["manifests"][0]["digest"] == digest

        context = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        conn = http.client.HTTPSConnection(gw.host, context=context, timeout=10)
        conn.request("GET", "/v2/")
        response = conn.getresponse()
        response.read()
        assert response.status == 401
        assert response.getheader("Strict-Transport-Security") == "max-age=600"
        # Logged in (the full path), then the same request again on the connection (the fast
        # path): the gateway's own HSTS on each answer, once.
        basic = "Basic " + base64.b64encode(f"alice:{USERS['alice']}".encode()).decode()
        asked = {"Authorization": basic, "Accept": "application/vnd.oci.image.manifest.v1+json"}
        for _ in range(2):
            conn.request("HEAD", "/v2/tls/app/manifests/1", headers=asked)
            response = conn.getresponse()
            response.read()
            assert response.status == 200
            assert response.headers.get_all("Strict-Transport-Security") == ["max-age=600"]
        conn.close()
        assert served_serial(gw.host, pki / "ca.crt") == 1001
        issue_cert(pki, "server", "1002")  # a renewal: new files, same names
        deadline = time.monotonic() + 10
        while served_serial(gw.host, pki / "ca.crt") != 1002:
            assert time.monotonic() < deadline, "renewed certificate never served"
            time.sleep(0.2)
        # A renewal caught half-way: the new certificate is there, its key not yet. The pair in
        # use keeps serving, handshake after handshake, until the key comes.
        renewal = issue_cert_aside(pki, tmp_path / "renewal", "1003")
        os.replace(renewal / "server.crt", pki / "server.crt")
        deadline = time.monotonic() + 10
        while b"TLS certificate not reloaded" not in gw.log.read_bytes():
            assert time.monotonic() < deadline, "the half-done renewal was never tried"
            time.sleep(0.2)
        assert served_serial(gw.host, pki / "ca.crt") == 1002
        conn = http.client.HTTPSConnection(gw.host, context=context, timeout=10)
        conn.request("HEAD", "/v2/tls/app/manifests/1", headers=asked)
        assert conn.getresponse().status == 200
        conn.close()
        os.replace(renewal / "server.key", pki / "server.key")
        deadline = time.monotonic() + 10
        while served_serial(gw.host, pki / "ca.crt") != 1003:
            assert time.monotonic() < deadline, "the completed renewal was never served"
            time.sleep(0.2)
    finally:
        stop(gw.process)


def test_registry_killed_mid_upload_and_mid_download(
    tmp_path: Path, registry: Registry, users_file: Path
) -> None:
    gw = start_gateway(tmp_path, registry.url, users_file)
    restarted: subprocess.Popen[bytes] | None = None
    try:
        token = base64.b64encode(f"admin:{USERS['admin']}".encode()).decode()
        admin = {"Authorization": f"Basic {token}"}
        blob = os.urandom(64 * 1024 * 1024)
        digest = "sha256:" + hashlib.sha256(blob).hexdigest()

        # Upload: the registry dies while a chunked PATCH streams through the gateway.
        status, headers, _ = call(gw, "POST", "/v2/faults/app/blobs/uploads/", "admin", body=b"")
        assert status == 202
        location = headers["Location"].removeprefix(f"http://{gw.host}")
        address, port = gw.host.split(":")
        with socket.create_connection((address, int(port)), timeout=10) as sock:
            sock.sendall(
                f"PATCH {location} HTTP/1.1\r\nHost: {gw.host}\r\nAuthorization: Basic {token}\r\n"
                "Transfer-Encoding: chunked\r\n\r\n".encode()
            )
            for index in range(0, 8 * 1024 * 1024, 1024 * 1024):
                sock.sendall(b"100000\r\n" + blob[index : index + 0x100000] + b"\r\n")
            registry.process.kill()
            registry.process.wait()
            answer = b""
            with contextlib.suppress(OSError):
                for index in range(8 * 1024 * 1024, 16 * 1024 * 1024, 1024 * 1024):
                    sock.sendall(b"100000\r\n" + blob[index : index + 0x100000] + b"\r\n")
                sock.sendall(b"0\r\n\r\n")
            with contextlib.suppress(OSError):
                answer = sock.recv(65536)
        # Either an error answer in registry format or a cut connection; never a success.
        assert not answer.startswith((b"HTTP/1.1 2", b"HTTP/1.0 2")), answer[:200]
        if answer:
            assert answer.startswith(b"HTTP/1.1 502") and b'"UNAVAILABLE"' in answer, answer[:300]

        # The gateway serves the next request: 502 while the registry is down ...
        status, _, body = call(gw, "GET", "/v2/faults/app/tags/list", "admin")
        assert status == 502 and json.loads(body)["errors"][0]["code"] == "UNAVAILABLE"
        # ... and once it is back, the interrupted upload is not a blob anyone can fetch.
        restarted = start_registry(tmp_path).process  # same configuration and storage
        assert call(gw, "HEAD", f"/v2/faults/app/blobs/{digest}", "admin")[0] == 404

        # Download: put the blob in, then kill the registry after the first bytes went out.
        status, headers, _ = call(gw, "POST", "/v2/faults/app/blobs/uploads/", "admin", body=b"")
        location = headers["Location"].removeprefix(f"http://{gw.host}")
        conn = http.client.HTTPConnection(gw.host, timeout=30)
        conn.request("PUT", f"{location}&digest={digest}", body=blob, headers=admin)
        assert conn.getresponse().status == 201
        conn.close()
        conn = http.client.HTTPConnection(gw.host, timeout=30)
        try:
            conn.request("GET", f"/v2/faults/app/blobs/{digest}", headers=admin)
            response = conn.getresponse()
            assert response.status == 200
            assert int(response.getheader("Content-Length") or 0) == len(blob)
            received = response.read(1024 * 1024)
            restarted.kill()
            restarted.wait()
            with contextlib.suppress(http.client.IncompleteRead, ConnectionError):
                while chunk := response.read(1024 * 1024):
                    received += chunk
            # Cut short of its Content-Length: every HTTP client reports the transfer failed.
            assert 0 < len(received) < len(blob)
            assert received == blob[: len(received)]
        finally:
            conn.close()
        status, _, body = call(gw, "GET", "/v2/", "admin")  # still serving, registry down again
        assert status == 502 and json.loads(body)["errors"][0]["code"] == "UNAVAILABLE"
        assert "Traceback" not in gw.log.read_text()
    finally:
        if restarted is not None:
            stop(restarted)
        stop(gw.process)


def test_client_aborts_leak_nothing(tmp_path: Path, registry: Registry, users_file: Path) -> None:
    gw = start_gateway(tmp_path, registry.url, users_file)
    try:
        token = base64.b64encode(f"admin:{USERS['admin']}".encode()).decode()
        address, port = gw.host.split(":")

        def abort_one() -> None:
            status, headers, _ = call(gw, "POST", "/v2/aborts/app/blobs/uploads/", "admin", body=b"")
            assert status == 202
            location = headers["Location"].removeprefix(f"http://{gw.host}")
            with socket.create_connection((address, int(port)), timeout=10) as sock:
                sock.sendall(
                    f"PATCH {location} HTTP/1.1\r\nHost: {gw.host}\r\nAuthorization: Basic {token}\r\n"
                    "Transfer-Encoding: chunked\r\nContent-Type: application/octet-stream\r\n\r\n".encode()
                )
                sock.sendall(b"10000\r\n" + os.urandom(0x10000) + b"\r\n")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")

        for _ in range(20):  # warm up
            abort_one()
        time.sleep(1)
        fds_before = len(os.listdir(f"/proc/{gw.process.pid}/fd"))
        rss_before = gw.rss_kib()
        for _ in range(200):
            abort_one()
        time.sleep(2)
        fds_after = len(os.listdir(f"/proc/{gw.process.pid}/fd"))
        assert fds_after <= fds_before + 5, (fds_before, fds_after)
        assert gw.rss_kib() - rss_before < 20 * 1024
        assert call(gw, "GET", "/v2/", "admin")[0] == 200
    finally:
        stop(gw.process)


def handshake_serial(context: ssl.SSLContext, ca: Path) -> int:
    """The serial of the certificate `context` serves, from a handshake in memory."""
    client_in, client_out, server_in, server_out = (ssl.MemoryBIO() for _ in range(4))
    client = ssl.create_default_context(cafile=str(ca)).wrap_bio(
        client_in, client_out, server_hostname="127.0.0.1"
    )
    server = context.wrap_bio(server_in, server_out, server_side=True)
    for _ in range(10):
        try:
            client.do_handshake()
        except ssl.SSLWantReadError:
            pass
        else:
            cert = client.getpeercert()
            assert cert is not None
            return int(str(cert["serialNumber"]), 16)
        server_in.write(client_out.read())
        with contextlib.suppress(ssl.SSLWantReadError):
            server.do_handshake()
        client_in.write(server_out.read())
    raise AssertionError("no handshake")


def test_tls_context_is_modern_and_bad_renewals_keep_the_old_pair(tmp_path: Path) -> None:
    from gateway.tls import TlsContext

    make_ca(tmp_path)
    issue_cert(tmp_path, "server", "7")
    tls = TlsContext(tmp_path / "server.crt", tmp_path / "server.key")
    assert tls.context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert all(c["protocol"] in ("TLSv1.2", "TLSv1.3") for c in tls.context.get_ciphers())
    key = (tmp_path / "server.key").read_bytes()
    (tmp_path / "server.key").write_text("half-written\n")
    assert not tls.reload_if_changed()  # logged, old pair still served
    assert handshake_serial(tls.context, tmp_path / "ca.crt") == 7
    # A certificate that does not belong to the key: OpenSSL would install it, then refuse the
    # key; loaded into the context in use, no handshake would succeed after it.
    (tmp_path / "server.key").write_bytes(key)
    other = issue_cert_aside(tmp_path, tmp_path / "other", "8")
    os.replace(other / "server.crt", tmp_path / "server.crt")
    assert not tls.reload_if_changed()
    assert handshake_serial(tls.context, tmp_path / "ca.crt") == 7
    os.replace(other / "server.key", tmp_path / "server.key")
    assert tls.reload_if_changed()
    assert handshake_serial(tls.context, tmp_path / "ca.crt") == 8


def test_json_diagnostic_log(tmp_path: Path, registry: Registry, users_file: Path) -> None:
    gw = start_gateway(tmp_path, registry.url, users_file, env={"GATEWAY_LOG_FORMAT": "json"})
    try:
        assert call(gw, "GET", "/v2/", "alice", "wrong")[0] == 401
    finally:
        stop(gw.process)
    entries = [json.loads(line) for line in gw.log.read_text().splitlines()]
    assert {"time", "level", "logger", "message"} <= set(entries[0])
    assert any("failed login for user 'alice'" in e["message"] for e in entries)
    assert all("wrong" not in e["message"] for e in entries)


def test_audit_log_reopened_on_sighup(tmp_path: Path, registry: Registry, users_file: Path) -> None:
    audit = tmp_path / "audit.jsonl"
    gw = start_gateway(tmp_path, registry.url, users_file, "--audit-log", str(audit))
    try:
        assert call(gw, "GET", "/v2/", "alice")[0] == 200
        audit.rename(tmp_path / "audit.jsonl.1")  # what logrotate does
        gw.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while not audit.exists():
            assert time.monotonic() < deadline, "audit log not reopened"
            time.sleep(0.05)
        assert call(gw, "GET", "/v2/_catalog", "alice")[0] == 200
    finally:
        stop(gw.process)
    rotated = [json.loads(line) for line in (tmp_path / "audit.jsonl.1").read_text().splitlines()]
    fresh = [json.loads(line) for line in audit.read_text().splitlines()]
    assert {r["operation"] for r in rotated} == {"login"}  # the start-up probe and alice's login
    assert [r["operation"] for r in fresh] == ["catalog"]


def test_redirects_name_the_published_https_port(
    tmp_path: Path, registry: Registry, users_file: Path
) -> None:
    """compose.tls.yml: HTTPS on 8443 inside the container, published as 443."""
    make_ca(tmp_path)
    issue_cert(tmp_path, "server", "01")
    redirect_port = free_port()
    env = {
        "GATEWAY_TLS_CERT": str(tmp_path / "server.crt"),
        "GATEWAY_TLS_KEY": str(tmp_path / "server.key"),
        "GATEWAY_REDIRECT_LISTEN": f"127.0.0.1:{redirect_port}",
        "GATEWAY_REDIRECT_TO_PORT": "443",
    }
    gw = start_gateway(tmp_path, registry.url, users_file, env=env, scheme="https")
    try:
        status, headers, _ = http_request(f"127.0.0.1:{redirect_port}", "GET", "/v2/_catalog?n=1")
        assert status == 301 and headers["Location"] == "https://127.0.0.1/v2/_catalog?n=1"
    finally:
        stop(gw.process)


def test_the_same_wrong_password_is_one_guess() -> None:
    from gateway.lockout import REPEAT_WINDOW, Lockout

    lockout = Lockout(attempts=3, window=300)
    for _ in range(10):
        lockout.failed("10.0.0.1", "alice", 100.0, b"same")
    assert lockout.retry_after("10.0.0.1", "alice", 101.0) is None
    lockout.failed("10.0.0.1", "alice", 101.0, b"other")
    lockout.failed("10.0.0.1", "alice", 101.0 + REPEAT_WINDOW, b"other")  # again, but later: counted
    assert lockout.retry_after("10.0.0.1", "alice", 120.0) is not None


def test_a_checked_password_forgets_failures_and_a_lock_ends_with_its_window() -> None:
    from gateway.lockout import Lockout

    lockout = Lockout(attempts=2, window=300)
    assert lockout.locked("10.0.0.1", "alice", 100.0) is None and lockout.count() == 0
    lockout.failed("10.0.0.1", "alice", 100.0, b"a")
    lockout.failed("10.0.0.2", "bob", 100.0, b"a")
    lockout.failed("10.0.0.2", "bob", 100.0, b"b")  # locked
    lockout.succeeded("10.0.0.1", "alice")
    lockout.failed("10.0.0.1", "alice", 102.0, b"b")  # counts from zero again: one failure
    assert lockout.retry_after("10.0.0.1", "alice", 103.0) is None
    assert lockout.locked("10.0.0.2", "bob", 103.0) == 297.0
    assert lockout.locked("10.0.0.2", "bob", 400.0) is None  # the window has passed
    lockout.failed("10.0.0.2", "bob", 401.0, b"b")  # a new window: one failure
    assert lockout.locked("10.0.0.2", "bob", 401.0) is None


@pytest.mark.parametrize(
    ("failed_from", "asked_from", "shared"),
    [
        ("10.1.2.3", "::ffff:10.1.2.3", True),  # one address, two spellings
        ("2001:db8::1", "2001:DB8:0:0::ffff", True),  # one IPv6 /64
        ("2001:db8::1", "2001:db8:0:1::1", False),  # the next /64
        ("10.1.2.3", "10.1.2.4", False),
    ],
)
def test_the_lockout_counts_an_address_as_policy_reads_it(
    failed_from: str, asked_from: str, shared: bool
) -> None:
    from gateway.addresses import canonical_ip
    from gateway.lockout import Lockout

    lockout = Lockout(attempts=1, window=300)
    lockout.failed(canonical_ip(failed_from), "alice", 100.0, b"a")
    assert (lockout.locked(canonical_ip(asked_from), "alice", 101.0) is not None) is shared


def test_a_full_lockout_table_evicts_unlocked_pairs_before_locks() -> None:
    from gateway.lockout import PROBE, Lockout

    lockout = Lockout(attempts=2, window=300, slots=PROBE)  # one probe window: every pair collides
    lockout.failed("10.0.0.1", "victim-of-a-guess", 100.0, b"a")
    lockout.failed("10.0.0.1", "victim-of-a-guess", 100.0, b"b")  # locked
    for address in range(100):  # a spray of single failures from many addresses
        lockout.failed(f"192.0.2.{address}", "alice", 101.0 + address, b"a")
    assert lockout.count() == PROBE
    assert lockout.locked("10.0.0.1", "victim-of-a-guess", 250.0) is not None


def _record(path: str) -> AuditRecord:
    return new_record("192.0.2.7", "GET", path)


def test_audit_log_that_cannot_be_opened_at_start_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(AuditLogError, match=f"no such directory: {tmp_path / 'nodir'}"):
        AuditLog(str(tmp_path / "nodir" / "audit.log"))
    with pytest.raises(AuditLogError, match=f"{tmp_path} is a directory, not a file"):
        AuditLog(str(tmp_path))


def test_failed_audit_reopen_keeps_writing_to_the_open_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    directory = tmp_path / "adir"
    directory.mkdir()
    audit = AuditLog(str(directory / "audit.log"))
    audit.write(_record("/v2/before"))
    directory.rename(tmp_path / "adir-moved")  # the directory moved away, then SIGHUP
    assert not audit.reopen()
    assert f"audit log {directory / 'audit.log'} not reopened" in caplog.text
    assert f"no such directory: {directory}" in caplog.text
    audit.write(_record("/v2/after"))
    moved = [
        json.loads(line)["path"] for line in (tmp_path / "adir-moved" / "audit.log").read_text().splitlines()
    ]
    assert moved == ["/v2/before", "/v2/after"] and audit.lost == 0
    directory.mkdir()  # put right: the next reopen takes the new file
    assert audit.reopen()
    audit.write(_record("/v2/fresh"))
    audit.close()
    assert [json.loads(line)["path"] for line in (directory / "audit.log").read_text().splitlines()] == [
        "/v2/fresh"
    ]


def test_audit_writes_survive_a_closed_or_failing_stream(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    audit = AuditLog(str(tmp_path / "audit.log"))
    audit._stream.close()  # type: ignore[union-attr]  # what a reopen that failed half-way left
    for _ in range(3):
        audit.write(_record("/v2/"))  # neither raises nor logs a line per record
    assert audit.lost == 3
    assert caplog.text.count("audit log write failed") == 1
    full = AuditLog("/dev/full")  # every write fails: no space left on device
    full.write(_record("/v2/"))
    full.write(_record("/v2/"))
    assert full.lost == 2 and caplog.text.count("audit log write failed") == 2
    full.target = str(tmp_path / "audit.log")
    assert full.reopen()
    full.write(_record("/v2/back"))
    assert "audit log writes succeed again; 2 record(s) lost so far" in caplog.text
    full.close()
    assert json.loads((tmp_path / "audit.log").read_text())["path"] == "/v2/back"


def test_a_failing_reload_step_does_not_skip_the_others(caplog: pytest.LogCaptureFixture) -> None:
    ran: list[str] = []

    def failing() -> None:
        ran.append("audit")
        raise RuntimeError("broken")

    run_each(
        [("first", lambda: ran.append("users")), ("second", failing), ("third", lambda: ran.append("tls"))]
    )
    assert ran == ["users", "audit", "tls"]
    assert "second failed; the other steps went on" in caplog.text and "RuntimeError: broken" in caplog.text


def test_failed_audit_reopen_on_sighup_keeps_records_and_reloads_tls(
    tmp_path: Path, registry: Registry, users_file: Path
) -> None:
    """logrotate's SIGHUP after the audit log's directory moved: before, the reopen closed the
    file, failed, and raised out of the signal handler: the TLS certificate was never reloaded and
    every later record was a traceback instead of a line."""
    pki = tmp_path / "pki"
    pki.mkdir()
    make_ca(pki)
    issue_cert(pki, "server", "2001")
    directory = tmp_path / "adir"
    directory.mkdir()
    metrics_port = free_port()
    gw = start_gateway(
        tmp_path,
        registry.url,
        users_file,
        "--audit-log",
        str(directory / "audit.log"),
        "--tls-cert",
        str(pki / "server.crt"),
        "--tls-key",
        str(pki / "server.key"),
        "--metrics-listen",
        f"127.0.0.1:{metrics_port}",
        scheme="https",
        env={"GATEWAY_RELOAD_INTERVAL": "3600"},  # the certificate is taken on SIGHUP only
    )
    context = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    basic = "Basic " + base64.b64encode(f"alice:{USERS['alice']}".encode()).decode()

    def get(path: str) -> int:
        conn = http.client.HTTPSConnection(gw.host, context=context, timeout=10)
        try:
            conn.request("GET", path, headers={"Authorization": basic})
            response = conn.getresponse()
            response.read()
            return response.status
        finally:
            conn.close()

    try:
        assert get("/v2/") == 200
        issue_cert(pki, "server", "2002")  # a renewal, taken at the same SIGHUP
        directory.rename(tmp_path / "adir-moved")
        gw.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while served_serial(gw.host, pki / "ca.crt") != 2002:
            assert time.monotonic() < deadline, "the renewed certificate was not taken on SIGHUP"
            time.sleep(0.2)
        assert [get("/v2/_catalog") for _ in range(3)] == [200, 200, 200]
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as page:
            exposition = page.read().decode()
        assert "registry_gateway_audit_records_lost_total 0.0" in exposition
    finally:
        stop(gw.process)
    log = gw.log.read_text()
    assert f"audit log {directory / 'audit.log'} not reopened" in log
    assert f"no such directory: {directory}" in log
    assert "Traceback" not in log and "error handling request" not in log
    records = [json.loads(line) for line in (tmp_path / "adir-moved" / "audit.log").read_text().splitlines()]
    assert [r["path"] for r in records if r["operation"] == "catalog"] == ["/v2/_catalog"] * 3
