"""Bearer mode end to end: the gateway issues and checks tokens, in front of the real registry,
with the docker CLI (a private dockerd) and skopeo."""

from __future__ import annotations

import base64
import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import bcrypt
import pytest

from gateway.sample_image import write_image
from tests.conftest import (
    USERS,
    Gateway,
    Registry,
    free_port,
    htpasswd_add,
    http_request,
    require,
    skopeo_copy,
    start_gateway,
    start_registry,
    stop,
    write_authfile,
)
from tests.dockerd import Docker

POLICY = """\
acl:
  - match: {account: "admin"}
    actions: ["*"]
  - match: {account: "alice", name: "alice/*"}
    actions: ["pull", "push"]
  - match: {account: "", name: "public/*"}
    actions: ["pull"]
"""


@dataclass
class TokenStack:
    registry: Registry
    gateway: Gateway
    users: Path
    metrics: str
    tmp: Path

    def token(self, scope: str = "", user: str | None = None) -> tuple[int, dict[str, object]]:
        query = urllib.parse.urlencode({"service": "registry-gateway", **({"scope": scope} if scope else {})})
        credentials = (user, USERS[user]) if user else None
        status, _, body = http_request(self.gateway.host, "GET", f"/token?{query}", credentials)
        return status, json.loads(body)

    def password_checks(self) -> float:
        with urllib.request.urlopen(f"http://{self.metrics}/metrics") as response:
            text = response.read().decode()
        match = re.search(r"^registry_gateway_password_checks_total (\S+)$", text, re.M)
        assert match is not None, text
        return float(match.group(1))


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[TokenStack]:
    registry = start_registry(tmp_path)
    gateway = None
    try:
        users = tmp_path / "htpasswd"
        for user, password in USERS.items():
            htpasswd_add(users, user, password, "-B")
        policy = tmp_path / "policy.yml"
        policy.write_text(POLICY)
        metrics = f"127.0.0.1:{free_port()}"
        gateway = start_gateway(
            tmp_path,
            registry.url,
            users,
            "--policy",
            str(policy),
            "--metrics-listen",
            metrics,
            env={
                "GATEWAY_CHALLENGE": "bearer",
                "GATEWAY_AUDIT_LOG": str(tmp_path / "audit.log"),
                "GATEWAY_TRUSTED_PROXIES": "127.0.0.2",
            },
        )
        yield TokenStack(registry, gateway, users, metrics, tmp_path)
    finally:
        if gateway is not None:
            stop(gateway.process)
        stop(registry.process)


def bearer(token: object) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_challenge_and_token_responses_as_clients_read_them(stack: TokenStack) -> None:
    host = stack.gateway.host
    status, headers, _ = http_request(host, "GET", "/v2/")
    assert status == 401
    assert headers["WWW-Authenticate"] == f'Bearer realm="http://{host}/token",service="registry-gateway"'
    status, headers, _ = http_request(host, "POST", "/v2/alice/app/blobs/uploads/")
    assert headers["WWW-Authenticate"].endswith(',scope="repository:alice/app:pull,push"')

    status, answer = stack.token("repository:alice/app:pull,push repository:bob/app:pull", "alice")
    assert status == 200
    assert answer["token"] == answer["access_token"] and answer["expires_in"] == 300
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", str(answer["issued_at"]))
    token = str(answer["token"])
    payload = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))
    assert payload["access"] == [{"type": "repository", "name": "alice/app", "actions": ["pull", "push"]}]
    assert payload["sub"] == "alice" and payload["aud"] == "registry-gateway"

    # Wrong credentials: 401, never an anonymous token.
    status, _, _ = http_request(host, "GET", "/token?service=registry-gateway", ("alice", "wrong"))
    assert status == 401
    # Anonymous: the anonymous grant.
    status, answer = stack.token("repository:public/app:pull,push")
    assert status == 200
    anonymous = json.loads(base64.urlsafe_b64decode(str(answer["token"]).split(".")[1] + "=="))
    assert anonymous["sub"] == "" and anonymous["access"][0]["actions"] == ["pull"]
    # POST with a password grant (containerd); refresh tokens are not issued yet: containerd then GETs.
    grant = {"grant_type": "password", "username": "alice", "password": USERS["alice"]}
    grant.update(service="registry-gateway", scope="repository:alice/app:pull")
    form = urllib.parse.urlencode(grant).encode()
    form_type = {"Content-Type": "application/x-www-form-urlencoded"}
    status, _, body = http_request(host, "POST", "/token", None, form, form_type)
    assert status == 200 and json.loads(body)["access_token"]
    refresh = urllib.parse.urlencode({"grant_type": "refresh_token", "refresh_token": "x"}).encode()
    status, _, body = http_request(host, "POST", "/token", None, refresh, form_type)
    assert status == 400 and json.loads(body)["error"] == "unsupported_grant_type"

    # The audit log records token requests, never a token; metrics count them.
    records = [json.loads(line) for line in (stack.tmp / "audit.log").read_text().splitlines()]
    tokens = [r for r in records if r.get("operation") == "token"]
    alice = next(r for r in tokens if r["user"] == "alice" and r.get("scopes_requested"))
    assert alice["scopes_requested"] == ["repository:alice/app:pull,push", "repository:bob/app:pull"]
    assert alice["scopes_granted"] == ["repository:alice/app:pull,push"]
    assert "eyJ" not in (stack.tmp / "audit.log").read_text()  # no JWT anywhere
    with urllib.request.urlopen(f"http://{stack.metrics}/metrics") as response:
        text = response.read().decode()
    assert 'registry_gateway_tokens_total{reason="",result="issued"} 3.0' in text  # alice, anonymous, POST
    assert 'registry_gateway_tokens_total{reason="bad_credentials",result="rejected"} 1.0' in text


def test_realm_follows_the_client_view_behind_a_trusted_proxy(stack: TokenStack) -> None:
    address, port = stack.gateway.host.split(":")
    import socket

    with socket.create_connection((address, int(port)), timeout=10, source_address=("127.0.0.2", 0)) as sock:
        sock.sendall(
            b"GET /v2/ HTTP/1.1\r\nHost: internal:5000\r\nX-Forwarded-Proto: https\r\n"
            b"X-Forwarded-Host: registry.example.com\r\nConnection: close\r\n\r\n"
        )
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert b'Bearer realm="https://registry.example.com/token",service="registry-gateway"' in answer
    # An untrusted client's forwarding headers are ignored.
    status, headers, _ = http_request(
        stack.gateway.host, "GET", "/v2/", headers={"X-Forwarded-Host": "evil.example"}
    )
    assert status == 401 and "evil.example" not in headers["WWW-Authenticate"]


def test_a_token_is_checked_against_the_operation_and_the_users_of_now(stack: TokenStack) -> None:
    host = stack.gateway.host
    _, answer = stack.token("repository:alice/app:pull,push", "alice")
    token = str(answer["token"])
    status, _, _ = http_request(host, "GET", "/v2/alice/app/tags/list", headers=bearer(token))
    assert status == 404  # allowed: the repository does not exist yet
    # A token for alice/app is not one for alice/other, though the policy would allow that.
    status, headers, _ = http_request(host, "GET", "/v2/alice/other/tags/list", headers=bearer(token))
    assert status == 401 and 'error="insufficient_scope"' in headers["WWW-Authenticate"]
    assert 'scope="repository:alice/other:pull"' in headers["WWW-Authenticate"]
    status, headers, _ = http_request(host, "GET", "/v2/alice/app/tags/list", headers=bearer(token + "x"))
    assert status == 401 and 'error="invalid_token"' in headers["WWW-Authenticate"]
    # Removed from the htpasswd file: the token stops working at once, not at its expiry.
    stack.users.write_text(
        "\n".join(line for line in stack.users.read_text().splitlines() if not line.startswith("alice:"))
        + "\n"
    )
    for _ in range(50):
        status, headers, _ = http_request(host, "GET", "/v2/alice/app/tags/list", headers=bearer(token))
        if status == 401:
            break
        time.sleep(0.1)
    assert status == 401 and 'error="invalid_token"' in headers["WWW-Authenticate"]


def test_docker_cli_anonymous_pull_login_push_and_denials(stack: TokenStack, dockerd: Docker) -> None:
    host = stack.gateway.host
    config = stack.tmp / "docker-config"

    cli = functools.partial(dockerd.cli, config)

    def login(user: str, password: str | None = None) -> tuple[int, str]:
        return cli("login", "-u", user, "--password-stdin", host, stdin=(password or USERS[user]) + "\n")

    assert login("admin")[0] == 0
    public = f"{host}/public/app:1"
    dockerd.build_image(config, public, {f"l{i}": os.urandom(30_000 + i) for i in range(3)})
    status, output = cli("push", public)
    assert status == 0, output
    assert cli("logout", host)[0] == 0

    # Anonymous, without docker login: pull what the policy lets anyone pull; push nothing.
    assert cli("rmi", public)[0] == 0
    status, output = cli("pull", public)
    assert status == 0, output
    mine = f"{host}/public/mine:1"
    assert cli("tag", public, mine)[0] == 0
    status, output = cli("push", mine)
    assert status != 0 and ("denied" in output or "unauthorized" in output), output
    assert "public/mine" not in stack.registry.repositories()

    # A wrong password fails docker login; the right one works, and so does alice's push.
    status, output = login("alice", "wrong password")
    assert status != 0 and "unauthorized" in output
    assert login("alice")[0] == 0
    app = f"{host}/alice/app:1"
    dockerd.build_image(config, app, {f"a{i}": os.urandom(20_000 + i) for i in range(20)})
    checks_before = stack.password_checks()
    status, output = cli("push", app)
    assert status == 0, output
    # A push of 20 layers: the password is checked at most twice (token requests hit the cache,
    # the registry requests carry tokens).
    assert stack.password_checks() - checks_before <= 2
    bob = f"{host}/bob/app:1"
    assert cli("tag", app, bob)[0] == 0
    status, output = cli("push", bob)
    assert status != 0 and "denied" in output
    assert "bob/app" not in stack.registry.repositories()
    assert cli("logout", host)[0] == 0


def test_skopeo_anonymous_pull_and_user_push(stack: TokenStack) -> None:
    host = stack.gateway.host
    image = stack.tmp / "image"
    write_image(image, "1", layers=2, layer_bytes=20_000)
    admin = write_authfile(stack.tmp / "admin.json", host, ("admin", USERS["admin"]))
    anonymous = write_authfile(stack.tmp / "anonymous.json", host, None)
    alice = write_authfile(stack.tmp / "alice.json", host, ("alice", USERS["alice"]))
    assert skopeo_copy(f"oci:{image}:1", f"docker://{host}/public/lib:1", admin).returncode == 0
    pulled = skopeo_copy(f"docker://{host}/public/lib:1", f"oci:{stack.tmp / 'pulled'}:1", anonymous)
    assert pulled.returncode == 0, pulled.stderr
    refused = skopeo_copy(f"oci:{image}:1", f"docker://{host}/public/other:1", anonymous)
    assert refused.returncode != 0
    wrong = write_authfile(stack.tmp / "wrong.json", host, ("alice", "wrong password"))
    failed = skopeo_copy(f"oci:{image}:1", f"docker://{host}/alice/lib:1", wrong)
    assert failed.returncode != 0 and "alice/lib" not in stack.registry.repositories()
    pushed = skopeo_copy(f"oci:{image}:1", f"docker://{host}/alice/lib:1", alice)
    assert pushed.returncode == 0, pushed.stderr
    denied = skopeo_copy(f"oci:{image}:1", f"docker://{host}/bob/lib:1", alice)
    assert denied.returncode != 0 and "denied" in denied.stderr
    assert (
        "bob/lib" not in stack.registry.repositories() and "public/other" not in stack.registry.repositories()
    )


def test_docker_login_keeps_an_identity_token_that_outlives_restarts_not_passwords(
    tmp_path: Path, dockerd: Docker
) -> None:
    registry = start_registry(tmp_path)
    gateway = None
    try:
        users = tmp_path / "htpasswd"
        for user, password in USERS.items():
            htpasswd_add(users, user, password, "-B")
        policy = tmp_path / "policy.yml"
        policy.write_text(POLICY)
        key = tmp_path / "token.pem"
        done = subprocess.run(
            [sys.executable, "-m", "gateway", "token", "keygen", "--key", str(key)],
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, done.stderr
        env = {
            "GATEWAY_CHALLENGE": "bearer",
            "GATEWAY_TOKEN_KEY": str(key),
            "GATEWAY_REFRESH_TOKEN_LIFETIME": "86400",
        }

        def start() -> Gateway:
            return start_gateway(tmp_path, registry.url, users, "--policy", str(policy), env=env)

        gateway = start()
        host = gateway.host
        config = tmp_path / "docker-config"

        cli = functools.partial(dockerd.cli, config)

        assert cli("login", "-u", "alice", "--password-stdin", host, stdin=USERS["alice"] + "\n")[0] == 0
        stored = json.loads((config / "config.json").read_text())["auths"][host]
        # An identity token, and only the user name where the password would be ("alice:").
        assert stored.get("identitytoken")
        assert base64.b64decode(stored.get("auth", "")).decode() in ("", "alice:")
        assert USERS["alice"] not in (config / "config.json").read_text()
        app = f"{host}/alice/app:1"
        dockerd.build_image(config, app, {"a": os.urandom(40_000)})
        status, output = cli("push", app)
        assert status == 0, output

        # The gateway restarts with the same key: the identity token still works.
        stop(gateway.process)
        gateway = start()
        host2 = gateway.host  # a new port: log in to it with the same identity token
        stored_auths = json.loads((config / "config.json").read_text())
        stored_auths["auths"][host2] = stored_auths["auths"][host]
        (config / "config.json").write_text(json.dumps(stored_auths))
        app2 = f"{host2}/alice/app:1"
        assert cli("rmi", "-f", app)[0] == 0
        status, output = cli("pull", app2)
        assert status == 0, output

        # A key rotation keeps it working (its key stays in the file, after the new one); a second
        # rotation drops its key, and docker must log in again.
        def rotate() -> None:
            reloads = gateway.log.read_text().count("token key reloaded")
            done = subprocess.run(
                [sys.executable, "-m", "gateway", "token", "keygen", "--key", str(key), "--rotate"],
                capture_output=True,
                text=True,
            )
            assert done.returncode == 0, done.stderr
            for _ in range(100):  # reload_interval
                if gateway.log.read_text().count("token key reloaded") > reloads:
                    break
                time.sleep(0.1)
            else:
                raise AssertionError("the gateway did not reload the token key")

        rotate()
        assert cli("rmi", "-f", app2)[0] == 0
        status, output = cli("pull", app2)
        assert status == 0, output
        rotate()
        assert cli("rmi", "-f", app2)[0] == 0
        status, output = cli("pull", app2)
        assert status != 0 and ("unauthorized" in output or "denied" in output), output
        assert cli("login", "-u", "alice", "--password-stdin", host2, stdin=USERS["alice"] + "\n")[0] == 0
        status, output = cli("pull", app2)
        assert status == 0, output

        # A new password revokes it: docker must log in again.
        changed = subprocess.run(
            [
                sys.executable,
                "-m",
                "gateway",
                "user",
                "passwd",
                "alice",
                "--file",
                str(users),
                "--password-stdin",
            ],
            input="a-new-password\n",
            capture_output=True,
            text=True,
        )
        assert changed.returncode == 0, changed.stderr
        assert cli("rmi", "-f", app2)[0] == 0
        for _ in range(50):
            status, output = cli("pull", app2)
            if status != 0:
                break
            assert cli("rmi", "-f", app2)[0] == 0
            time.sleep(0.2)
        assert status != 0 and ("unauthorized" in output or "denied" in output), output
    finally:
        if gateway is not None:
            stop(gateway.process)
        stop(registry.process)


@pytest.mark.parametrize("x5c", [False, True], ids=["kid", "x5c"])
def test_registry_in_token_mode_trusts_the_gateway(tmp_path: Path, dockerd: Docker, x5c: bool) -> None:
    """docker_auth's job: the registry itself checks tokens the gateway issues (clients talk to the
    registry directly); distribution 2.8 finds the key by its libtrust kid, or from x5c."""
    users = tmp_path / "htpasswd"
    for user, password in USERS.items():
        htpasswd_add(users, user, password, "-B")
    policy = tmp_path / "policy.yml"
    policy.write_text(POLICY)
    key, cert = tmp_path / "token.pem", tmp_path / "token.crt"
    made = subprocess.run(
        [sys.executable, "-m", "gateway", "token", "keygen", "--key", str(key)], capture_output=True
    )
    assert made.returncode == 0
    registry_port = free_port()
    env = {"GATEWAY_CHALLENGE": "bearer", "GATEWAY_TOKEN_KEY": str(key)}
    if x5c:
        env["GATEWAY_TOKEN_CERT"] = str(cert)
    gateway = start_gateway(
        tmp_path, f"http://127.0.0.1:{registry_port}", users, "--policy", str(policy), env=env
    )
    registry = None
    try:
        (tmp_path / "tokenreg.yml").write_text(
            "version: 0.1\nlog:\n  level: info\n"
            f"storage:\n  filesystem:\n    rootdirectory: {tmp_path / 'tokenreg-storage'}\n"
            f"http:\n  addr: 127.0.0.1:{registry_port}\n"
            "auth:\n  token:\n"
            f"    realm: http://{gateway.host}/token\n"
            "    service: registry-gateway\n    issuer: registry-gateway\n"
            f"    rootcertbundle: {cert}\n"
        )
        registry = start_registry(tmp_path, name="tokenreg")
        host = registry.url.removeprefix("http://")
        status, headers, _ = http_request(host, "GET", "/v2/")
        assert status == 401 and f'realm="http://{gateway.host}/token"' in headers["Www-Authenticate"]
        config = tmp_path / "docker-config"

        cli = functools.partial(dockerd.cli, config)

        status, output = cli("login", "-u", "alice", "--password-stdin", host, stdin="wrong\n")
        assert status != 0
        assert cli("login", "-u", "alice", "--password-stdin", host, stdin=USERS["alice"] + "\n")[0] == 0
        app = f"{host}/alice/app:1"
        dockerd.build_image(config, app, {f"l{i}": os.urandom(20_000 + i) for i in range(3)})
        status, output = cli("push", app)
        assert status == 0, output
        assert cli("rmi", app)[0] == 0
        status, output = cli("pull", app)
        assert status == 0, output
        bob = f"{host}/bob/app:1"
        assert cli("tag", app, bob)[0] == 0
        status, output = cli("push", bob)
        assert status != 0 and "denied" in output
        assert "bob/app" not in registry.repositories()
        assert cli("logout", host)[0] == 0

        image = tmp_path / "image"
        write_image(image, "1", layers=2, layer_bytes=10_000)
        admin = write_authfile(tmp_path / "admin.json", host, ("admin", USERS["admin"]))
        anonymous = write_authfile(tmp_path / "anonymous.json", host, None)
        pushed = skopeo_copy(f"oci:{image}:1", f"docker://{host}/public/lib:1", admin)
        assert pushed.returncode == 0, pushed.stderr
        pulled = skopeo_copy(f"docker://{host}/public/lib:1", f"oci:{tmp_path / 'pulled'}:1", anonymous)
        assert pulled.returncode == 0, pulled.stderr
        refused = skopeo_copy(f"oci:{image}:1", f"docker://{host}/public/other:1", anonymous)
        assert refused.returncode != 0 and "public/other" not in registry.repositories()

        # The gateway in front of that registry: it passes clients' tokens through, and mints one
        # for requests it authenticated with Basic credentials.
        status, _, body = http_request(
            gateway.host, "GET", "/v2/alice/app/tags/list", ("alice", USERS["alice"])
        )
        assert status == 200 and json.loads(body)["tags"] == ["1"]
        # `from` means nothing on a tags list, but this registry would demand pull on it.
        status, _, body = http_request(
            gateway.host, "GET", "/v2/alice/app/tags/list?from=public%2Flib", ("alice", USERS["alice"])
        )
        assert status == 200 and json.loads(body)["tags"] == ["1"]
        status, _, body = http_request(gateway.host, "GET", "/v2/_catalog", ("alice", USERS["alice"]))
        assert status == 200 and "alice/app" in json.loads(body)["repositories"]
        # With a token of alice's own, which grants no catalog: the gateway filters the catalog
        # for any valid token, reading it from the registry with a token it mints for that.
        query = "/token?service=registry-gateway&scope=repository:alice/app:pull"
        status, _, body = http_request(gateway.host, "GET", query, ("alice", USERS["alice"]))
        assert status == 200
        own = {"Authorization": f"Bearer {json.loads(body)['token']}"}
        status, _, body = http_request(gateway.host, "GET", "/v2/_catalog", headers=own)
        assert status == 200 and json.loads(body)["repositories"] == ["alice/app"], body
        # admin's ACL entry grants the whole catalog: forwarded as it is (on the fast path), with
        # that same token of the gateway's.
        query = "/token?service=registry-gateway&scope=repository:public/lib:pull"
        status, _, body = http_request(gateway.host, "GET", query, ("admin", USERS["admin"]))
        assert status == 200
        own = {"Authorization": f"Bearer {json.loads(body)['token']}"}
        for _ in range(2):
            status, _, body = http_request(gateway.host, "GET", "/v2/_catalog", headers=own)
            assert status == 200 and json.loads(body)["repositories"] == ["alice/app", "public/lib"], body
        through = f"{gateway.host}/alice/app:1"
        assert (
            cli("login", "-u", "alice", "--password-stdin", gateway.host, stdin=USERS["alice"] + "\n")[0] == 0
        )
        status, output = cli("pull", through)
        assert status == 0, output

        # A users: section without "": no anonymous access. The registry checks tokens itself, so
        # the token endpoint is the only gate: it must not grant the anonymous entry's pull.
        ci_hash = bcrypt.hashpw(b"ci-password", bcrypt.gensalt(4)).decode()
        policy.write_text(POLICY + f'users:\n  ci: {{password: "{ci_hash}"}}\n')
        gateway.process.send_signal(signal.SIGHUP)
        query = "/token?service=registry-gateway&scope=repository:public/lib:pull"
        deadline = time.monotonic() + 10
        while (answer := http_request(gateway.host, "GET", query))[0] != 401:
            assert time.monotonic() < deadline, answer
            time.sleep(0.2)
        assert answer[1]["WWW-Authenticate"].startswith("Basic ")
        refused = skopeo_copy(f"docker://{host}/public/lib:1", f"oci:{tmp_path / 'refused'}:1", anonymous)
        assert refused.returncode != 0 and not (tmp_path / "refused" / "index.json").exists()
        pulled = skopeo_copy(f"docker://{host}/public/lib:1", f"oci:{tmp_path / 'pulled-admin'}:1", admin)
        assert pulled.returncode == 0, pulled.stderr
    finally:
        stop(gateway.process)
        if registry is not None:
            stop(registry.process)


def test_podman_anonymous_pull_login_push_and_denials(stack: TokenStack) -> None:
    require("podman")
    host = stack.gateway.host
    image = stack.tmp / "image"
    write_image(image, "1", layers=2, layer_bytes=20_000)
    admin = write_authfile(stack.tmp / "admin.json", host, ("admin", USERS["admin"]))
    assert skopeo_copy(f"oci:{image}:1", f"docker://{host}/public/lib:1", admin).returncode == 0
    authfile = stack.tmp / "podman-auth.json"
    authfile.write_text('{"auths": {}}')
    storage = Path(tempfile.mkdtemp(prefix="pm-", dir="/tmp"))  # podman wants a short runroot

    def podman(*args: str, stdin: str | None = None) -> tuple[int, str]:
        ran = subprocess.run(
            [
                require("podman"),
                "--root", str(storage / "root"), "--runroot", str(storage / "run"),
                "--storage-driver", "vfs", "--cgroup-manager", "cgroupfs", "--events-backend", "file",
                *args,
            ],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=180,
        )  # fmt: skip
        return ran.returncode, ran.stdout + ran.stderr

    common = ("--tls-verify=false", "--authfile", str(authfile))
    status, output = podman("pull", *common, f"docker://{host}/public/lib:1")
    assert status == 0, output  # anonymous, no login
    status, output = podman("push", *common, f"{host}/public/lib:1", f"docker://{host}/public/mine:1")
    assert status != 0 and "public/mine" not in stack.registry.repositories()
    status, output = podman("login", *common, "-u", "alice", "--password-stdin", host, stdin="wrong\n")
    assert status != 0
    status, output = podman(
        "login", *common, "-u", "alice", "--password-stdin", host, stdin=USERS["alice"] + "\n"
    )
    assert status == 0, output
    status, output = podman("push", *common, f"{host}/public/lib:1", f"docker://{host}/alice/lib:1")
    assert status == 0, output
    status, output = podman("push", *common, f"{host}/public/lib:1", f"docker://{host}/bob/lib:1")
    assert status != 0 and "denied" in output
    assert "bob/lib" not in stack.registry.repositories()
    podman("system", "reset", "--force")
    shutil.rmtree(storage, ignore_errors=True)


def test_a_configured_realm_is_announced(tmp_path: Path, registry: Registry) -> None:
    users = tmp_path / "htpasswd"
    htpasswd_add(users, "alice", USERS["alice"], "-B")
    env = {"GATEWAY_CHALLENGE": "bearer", "GATEWAY_TOKEN_REALM": "https://auth.example.com/token"}
    gateway = start_gateway(tmp_path, registry.url, users, env=env)
    try:
        status, headers, _ = http_request(gateway.host, "GET", "/v2/")
        assert status == 401
        assert headers["WWW-Authenticate"].startswith('Bearer realm="https://auth.example.com/token",')
    finally:
        stop(gateway.process)


def test_bad_token_forms_get_a_400_never_a_500(stack: TokenStack) -> None:
    import socket

    host, port = stack.gateway.host.split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            b"POST /token HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n5\r\ngrant\r\nzz\r\n"
        )
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 400"), answer
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    for fields in (
        {"grant_type": "password", "username": "alice\x01", "password": USERS["alice"]},
        {"grant_type": "password", "username": "alice", "password": "x" * 5000},
    ):
        body = urllib.parse.urlencode({**fields, "service": "registry-gateway"}).encode()
        status, _, answer = http_request(stack.gateway.host, "POST", "/token", body=body, headers=form)
        assert status == 400, answer
        assert json.loads(answer)["error"] == "invalid_request"
    # The good form still works.
    body = urllib.parse.urlencode(
        {
            "grant_type": "password",
            "username": "alice",
            "password": USERS["alice"],
            "service": "registry-gateway",
        }
    ).encode()
    assert http_request(stack.gateway.host, "POST", "/token", body=body, headers=form)[0] == 200
    assert "Traceback" not in stack.gateway.log.read_text()
