"""Issue 25, the token parts, end to end against the real registry (Debian's docker-registry, in
token mode where it checks tokens itself) and skopeo: a key replaced by hand stops signing at
once, a refresh token is no access token at a registry, and a service or issuer with spaces (the
registry's own example, "Docker registry") works, and a mismatch says which setting to change."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import pytest

from gateway import config, docker_auth, policyfile
from gateway.sample_image import write_image
from gateway.tokens import keys
from gateway.tokens.jwt_tokens import issue
from gateway.tokens.scopes import parse_scopes
from tests.conftest import (
    REGISTRY_BIN,
    USERS,
    Gateway,
    Registry,
    free_port,
    htpasswd_add,
    http_request,
    require,
    skopeo_copy,
    start_gateway,
    stop,
    wait_for_http,
    write_authfile,
)

ACL = """\
acl:
  - match: {account: "admin"}
    actions: ["*"]
  - match: {account: "alice", name: "alice/*"}
    actions: ["pull", "push"]
"""
FORM = {"Content-Type": "application/x-www-form-urlencoded"}
TUTORIAL_SERVICE, TUTORIAL_ISSUER = "Docker registry", "Acme auth server"


def keygen(key: Path) -> None:
    """`token keygen`: the key, and its certificate beside it (key.crt) for the registry."""
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "token", "keygen", "--key", str(key)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr


def write_users(tmp_path: Path) -> Path:
    users = tmp_path / "htpasswd"
    for user, password in USERS.items():
        htpasswd_add(users, user, password, "-B")
    return users


def password_grant(host: str, scope: str, service: str = "registry-gateway") -> dict[str, str]:
    """A token and a refresh token for alice (docker login's and containerd's POST)."""
    form = {"grant_type": "password", "username": "alice", "password": USERS["alice"], "scope": scope}
    form.update(service=service, access_type="offline")
    status, _, body = http_request(host, "POST", "/token", None, urllib.parse.urlencode(form).encode(), FORM)
    assert status == 200, body
    answer: dict[str, str] = json.loads(body)
    assert answer["refresh_token"]
    return answer


def refresh_grant(host: str, refresh_token: str, scope: str) -> tuple[int, bytes]:
    form = {"grant_type": "refresh_token", "refresh_token": refresh_token, "scope": scope}
    form["service"] = "registry-gateway"
    status, _, body = http_request(host, "POST", "/token", None, urllib.parse.urlencode(form).encode(), FORM)
    return status, body


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def start_token_registry(
    tmp_path: Path, port: int, realm_host: str, cert: Path, service: str, issuer: str
) -> Registry:
    """The registry in token mode on `port` (where the gateway forwards to), configured as the
    tutorial does it, by REGISTRY_AUTH_TOKEN_* environment variables, trusting the certificate of
    the gateway's key."""
    require(REGISTRY_BIN)
    address = f"127.0.0.1:{port}"
    storage = tmp_path / "tokenreg-storage"
    configuration = tmp_path / "tokenreg.yml"
    configuration.write_text(
        "version: 0.1\nlog:\n  level: info\n"
        f"storage:\n  filesystem:\n    rootdirectory: {storage}\n"
        f"http:\n  addr: {address}\n"
    )
    environment = {
        **os.environ,
        "REGISTRY_AUTH": "token",
        "REGISTRY_AUTH_TOKEN_REALM": f"http://{realm_host}/token",
        "REGISTRY_AUTH_TOKEN_SERVICE": service,
        "REGISTRY_AUTH_TOKEN_ISSUER": issuer,
        "REGISTRY_AUTH_TOKEN_ROOTCERTBUNDLE": str(cert),
    }
    log = tmp_path / "tokenreg.log"
    with log.open("ab") as out:
        process = subprocess.Popen(
            [REGISTRY_BIN, "serve", str(configuration)], stdout=out, stderr=out, env=environment
        )
    try:
        wait_for_http(f"http://{address}/v2/", process, log)
    except RuntimeError:
        stop(process)
        raise
    return Registry(f"http://{address}", storage, process, log)


def wait_for_reload(gateway: Gateway, before: int, how: str) -> None:
    if how == "sighup":
        gateway.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while gateway.log.read_text().count("token key reloaded") <= before:
        assert time.monotonic() < deadline, "the gateway did not reload the token key"
        time.sleep(0.05)


@pytest.mark.parametrize("how", ["sighup", "watcher"])
def test_a_key_replaced_by_hand_is_refused_at_once_and_a_rotation_keeps_its_grace(
    tmp_path: Path, registry: Registry, how: str
) -> None:
    """Issue 25.4. Before, after the key file was replaced by hand (the answer to a leak), a
    token signed with the old key, even one minted after the replacement, was accepted for
    token_lifetime + 60 s. Now a key that left the file is refused for every token once the
    gateway has reloaded it (SIGHUP, or the file watcher); `token keygen --rotate` keeps the
    previous key in the file, and its tokens, refresh tokens included, stay good."""
    key = tmp_path / "token.pem"
    keygen(key)
    users = write_users(tmp_path)
    policy = tmp_path / "policy.yml"
    policy.write_text(ACL)
    env = {
        "GATEWAY_CHALLENGE": "bearer",
        "GATEWAY_TOKEN_KEY": str(key),
        "GATEWAY_TOKEN_LIFETIME": "300",
        "GATEWAY_REFRESH_TOKEN_LIFETIME": "86400",
        # With SIGHUP alone, so that it is the signal that reloads.
        "GATEWAY_RELOAD_INTERVAL": "3600" if how == "sighup" else "0.3",
    }
    gateway = start_gateway(tmp_path, registry.url, users, "--policy", str(policy), env=env)
    try:
        host, scope, path = gateway.host, "repository:alice/app:pull", "/v2/alice/app/tags/list"
        first_key = keys.load(key)
        first = password_grant(host, scope)
        assert http_request(host, "GET", path, headers=bearer(first["token"]))[0] == 404  # allowed

        # Planned rotation: the previous key stays in the file, and so do its tokens.
        rotated = subprocess.run(
            [sys.executable, "-m", "gateway", "token", "keygen", "--key", str(key), "--rotate"],
            capture_output=True,
            text=True,
        )
        assert rotated.returncode == 0, rotated.stderr
        wait_for_reload(gateway, 0, how)
        assert http_request(host, "GET", path, headers=bearer(first["token"]))[0] == 404
        status, body = refresh_grant(host, first["refresh_token"], scope)
        assert status == 200, body
        second_key = keys.load(key)
        second = password_grant(host, scope)

        # A leak: the file is replaced by hand (the content of another key written over it).
        spare = tmp_path / "spare.pem"
        keygen(spare)
        key.write_bytes(spare.read_bytes())
        wait_for_reload(gateway, 1, how)
        # Whoever holds a leaked key signs tokens of their own, after the replacement.
        minted_with_the_leak = [
            issue(leaked, "registry-gateway", "registry-gateway", "alice", parse_scopes([scope]), 300)[0]
            for leaked in (first_key, second_key)
        ]
        for token in (first["token"], second["token"], *minted_with_the_leak):
            status, headers, _ = http_request(host, "GET", path, headers=bearer(token))
            assert status == 401 and 'error="invalid_token"' in headers["WWW-Authenticate"]
        for refresh in (first["refresh_token"], second["refresh_token"]):
            status, body = refresh_grant(host, refresh, scope)
            assert status == 401 and json.loads(body)["error"] == "invalid_grant", body
        # The new key signs, and its tokens work.
        third = password_grant(host, scope)
        assert http_request(host, "GET", path, headers=bearer(third["token"]))[0] == 404
        assert refresh_grant(host, third["refresh_token"], scope)[0] == 200
    finally:
        stop(gateway.process)


def test_a_refresh_token_is_refused_by_a_registry_in_token_mode(tmp_path: Path) -> None:
    """Issue 25.5. A refresh token had the service's audience, issuer and key: a registry in
    `auth: token` mode, which never sees `token revoke`, answered it 200 as an access token. It
    now has the token endpoint's own audience, which distribution refuses."""
    key = tmp_path / "token.pem"
    keygen(key)
    users = write_users(tmp_path)
    policy = tmp_path / "policy.yml"
    policy.write_text(ACL)
    registry_port = free_port()
    env = {
        "GATEWAY_CHALLENGE": "bearer",
        "GATEWAY_TOKEN_KEY": str(key),
        "GATEWAY_REFRESH_TOKEN_LIFETIME": "86400",
    }
    gateway = start_gateway(
        tmp_path, f"http://127.0.0.1:{registry_port}", users, "--policy", str(policy), env=env
    )
    registry = None
    try:
        registry = start_token_registry(
            tmp_path,
            registry_port,
            gateway.host,
            tmp_path / "token.crt",
            "registry-gateway",
            "registry-gateway",
        )
        answer = password_grant(gateway.host, "repository:alice/app:pull")
        registry_host = registry.url.removeprefix("http://")
        assert http_request(registry_host, "GET", "/v2/", headers=bearer(answer["token"]))[0] == 200
        status, _, body = http_request(registry_host, "GET", "/v2/", headers=bearer(answer["refresh_token"]))
        assert status == 401, body
        status, _, body = http_request(
            registry_host, "GET", "/v2/alice/app/tags/list", headers=bearer(answer["refresh_token"])
        )
        assert status == 401, body
        # At the gateway's token endpoint it is what it is for.
        status, body = refresh_grant(gateway.host, answer["refresh_token"], "repository:alice/app:pull")
        assert status == 200, body
        status, _, _ = http_request(registry_host, "GET", "/v2/", headers=bearer(json.loads(body)["token"]))
        assert status == 200
    finally:
        stop(gateway.process)
        if registry is not None:
            stop(registry.process)


@pytest.mark.parametrize(
    ("source", "service"),
    [
        ("gateway.yml", TUTORIAL_SERVICE),
        ("environment", TUTORIAL_SERVICE),
        ("environment", 'The "Docker" registry\\'),  # quoted in challenges, as distribution does
    ],
    ids=["gateway.yml", "environment", "quotes"],
)
def test_the_tutorials_registry_with_a_service_and_issuer_with_spaces(
    tmp_path: Path, source: str, service: str
) -> None:
    """Issue 25.9. The seed tutorial's registry says REGISTRY_AUTH_TOKEN_SERVICE: "Docker
    registry"; token_service and token_issuer with spaces were refused from gateway.yml and the
    environment. skopeo now pushes and pulls straight to that registry with the gateway's tokens."""
    key = tmp_path / "token.pem"
    keygen(key)
    users = write_users(tmp_path)
    policy = tmp_path / "policy.yml"
    policy.write_text(ACL)
    env = {"GATEWAY_CHALLENGE": "bearer", "GATEWAY_TOKEN_KEY": str(key)}
    extra: list[str] = []
    if source == "gateway.yml":
        settings_file = tmp_path / "gateway.yml"
        # JSON strings are YAML strings.
        settings_file.write_text(
            f"token_service: {json.dumps(service)}\ntoken_issuer: {json.dumps(TUTORIAL_ISSUER)}\n"
        )
        extra = ["--config", str(settings_file)]
    else:
        env.update(GATEWAY_TOKEN_SERVICE=service, GATEWAY_TOKEN_ISSUER=TUTORIAL_ISSUER)
    registry_port = free_port()
    gateway = start_gateway(
        tmp_path, f"http://127.0.0.1:{registry_port}", users, *extra, "--policy", str(policy), env=env
    )
    registry = None
    try:
        # The gateway's own challenge names the service as the registry's does.
        quoted = service.replace("\\", "\\\\").replace('"', '\\"')
        _, headers, _ = http_request(gateway.host, "GET", "/v2/")
        assert f'service="{quoted}"' in headers["WWW-Authenticate"]
        registry = start_token_registry(
            tmp_path, registry_port, gateway.host, tmp_path / "token.crt", service, TUTORIAL_ISSUER
        )
        registry_host = registry.url.removeprefix("http://")
        _, headers, _ = http_request(registry_host, "GET", "/v2/")
        assert f'service="{quoted}"' in headers["Www-Authenticate"]
        image = tmp_path / "image"
        write_image(image, "1", layers=2, layer_bytes=10_000)
        alice = write_authfile(tmp_path / "alice.json", registry_host, ("alice", USERS["alice"]))
        pushed = skopeo_copy(f"oci:{image}:1", f"docker://{registry_host}/alice/app:1", alice)
        assert pushed.returncode == 0, pushed.stderr
        assert "alice/app" in registry.repositories()
        pulled = skopeo_copy(f"docker://{registry_host}/alice/app:1", f"oci:{tmp_path / 'pulled'}:1", alice)
        assert pulled.returncode == 0, pulled.stderr
        # And through the gateway, which passes the same tokens on.
        gateway_auth = write_authfile(tmp_path / "through.json", gateway.host, ("alice", USERS["alice"]))
        through = skopeo_copy(
            f"docker://{gateway.host}/alice/app:1", f"oci:{tmp_path / 'through'}:1", gateway_auth
        )
        assert through.returncode == 0, through.stderr
    finally:
        stop(gateway.process)
        if registry is not None:
            stop(registry.process)


def test_a_service_mismatch_says_which_setting_to_change(tmp_path: Path) -> None:
    """Issue 25.9. A docker_auth auth_config.yml has no service key (docker_auth takes each
    request's); used without token_service, the gateway issued tokens for its default, and the
    tutorial's registry ("Docker registry") got clients a bare 400 `unknown service`. Now the
    start-up warns, naming token_service, and the 400 (in the registry's JSON error format) and
    the log say which setting to change."""
    key = tmp_path / "token.pem"
    keygen(key)
    users = write_users(tmp_path)
    auth_config = tmp_path / "auth_config.yml"
    auth_config.write_text(f'token:\n  issuer: "{TUTORIAL_ISSUER}"\n  key: {key}\n' + ACL)
    registry_port = free_port()
    gateway = start_gateway(
        tmp_path, f"http://127.0.0.1:{registry_port}", users, "--policy", str(auth_config), env={}
    )
    registry = None
    try:
        start_log = gateway.log.read_text()
        warning = next(line for line in start_log.splitlines() if "has no service key" in line)
        assert "token_service" in warning and "GATEWAY_TOKEN_SERVICE" in warning
        registry = start_token_registry(
            tmp_path, registry_port, gateway.host, tmp_path / "token.crt", TUTORIAL_SERVICE, TUTORIAL_ISSUER
        )
        registry_host = registry.url.removeprefix("http://")
        image = tmp_path / "image"
        write_image(image, "1", layers=1, layer_bytes=1_000)
        alice = write_authfile(tmp_path / "alice.json", registry_host, ("alice", USERS["alice"]))
        refused = skopeo_copy(f"oci:{image}:1", f"docker://{registry_host}/alice/app:1", alice)
        assert refused.returncode != 0 and "400" in refused.stderr, refused.stderr
        assert "alice/app" not in registry.repositories()

        query = urllib.parse.urlencode({"service": TUTORIAL_SERVICE, "scope": "repository:alice/app:pull"})
        status, headers, body = http_request(
            gateway.host, "GET", f"/token?{query}", ("alice", USERS["alice"])
        )
        assert status == 400 and headers["Content-Type"].startswith("application/json")
        [error] = json.loads(body)["errors"]
        assert error["code"] == "UNSUPPORTED"
        for said in ("token_service", "GATEWAY_TOKEN_SERVICE", "'Docker registry'", "'registry-gateway'"):
            assert said in error["message"], error["message"]
        deadline = time.monotonic() + 5
        while "token request refused" not in gateway.log.read_text():
            assert time.monotonic() < deadline, gateway.log.read_text()
            time.sleep(0.05)
        [logged] = [line for line in gateway.log.read_text().splitlines() if "token request refused" in line]
        assert "token_service" in logged and "'Docker registry'" in logged  # once, for all requests
    finally:
        stop(gateway.process)
        if registry is not None:
            stop(registry.process)


def test_a_service_and_issuer_are_read_alike_from_every_source(tmp_path: Path) -> None:
    """Issue 25.9: an issuer with spaces was accepted from auth_config.yml and refused from
    gateway.yml and GATEWAY_TOKEN_ISSUER. Any printable text is taken from all three, and text
    that cannot be compared as written (control characters) is refused by all three, by key."""
    users = write_users(tmp_path)
    flags = {"htpasswd": str(users)}
    settings_file = tmp_path / "gateway.yml"
    settings_file.write_text('token_service: "Docker registry"\ntoken_issuer: \'Acme "auth" server\'\n')
    from_file = config.load(settings_file, {}, flags)
    assert (from_file.token_service, from_file.token_issuer) == ("Docker registry", 'Acme "auth" server')
    environment = {"GATEWAY_TOKEN_SERVICE": "Docker registry", "GATEWAY_TOKEN_ISSUER": "Acme auth server"}
    from_env = config.load(None, environment, flags)
    assert (from_env.token_service, from_env.token_issuer) == ("Docker registry", "Acme auth server")
    with pytest.raises(config.ConfigError) as caught:
        config.load(None, {"GATEWAY_TOKEN_SERVICE": "Docker\tregistry", "GATEWAY_TOKEN_ISSUER": ""}, flags)
    problems = "\n".join(caught.value.problems)
    assert "GATEWAY_TOKEN_SERVICE" in problems and "GATEWAY_TOKEN_ISSUER" in problems
    acl = [{"match": {"account": "admin"}, "actions": ["*"]}]
    spaced = policyfile.parse({"token": {"issuer": "Acme auth server"}, "acl": acl})
    assert docker_auth.apply(config.load(None, {}, flags), spaced).token_issuer == "Acme auth server"
    tabbed = policyfile.parse({"token": {"issuer": "Acme\tauth"}, "acl": acl})
    with pytest.raises(docker_auth.DockerAuthError, match=r"token\.issuer: must be non-empty printable"):
        docker_auth.apply(config.load(None, {}, flags), tabbed)
    # The warning that names token_service is gone once it is set.
    explicit = docker_auth.apply(
        config.load(None, {"GATEWAY_TOKEN_SERVICE": "Docker registry"}, flags), spaced
    )
    assert not any("token_service" in note for note in docker_auth.not_applied(explicit, spaced))
    defaulted = docker_auth.apply(config.load(None, {}, flags), spaced)
    assert any("set token_service" in note for note in docker_auth.not_applied(defaulted, spaced))
