"""A docker_auth auth_config.yml, unchanged, as the policy file: users with labels, anonymous, ACL
entries with ${labels:...} and ${account}, and its token section, against the real registry."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import urllib.parse
from pathlib import Path

import bcrypt
import pytest

from tests.conftest import Registry, htpasswd_add, http_request, start_gateway, stop

PASSWORDS = {"admin": "badmin", "developer": "dev-pw", "username1": "user1-pw"}


def hashed(password: str) -> str:
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(5)).decode().replace("$2b$", "$2y$")


def auth_config(key: Path, cert: Path) -> str:
    return f"""\
server:
  addr: ":5001"

token:
  issuer: "Acme auth server"  # Must match issuer in the Registry config.
  expiration: 900
  certificate: "{cert}"
  key: "{key}"

users:
  "admin":
    password: "{hashed(PASSWORDS["admin"])}"
  "developer":
    password: "{hashed(PASSWORDS["developer"])}"
    labels:
      team: ["backend", "infra"]
  "username1":
    password: "{hashed(PASSWORDS["username1"])}"
  "": {{}}  # Allow anonymous (no "docker login") access.

acl:
  - match: {{account: "admin"}}
    actions: ["*"]
    comment: "Admin has full access to everything."
  - match: {{account: "developer", name: "dev-${{labels:team}}/*"}}
    actions: ["pull", "push"]
    comment: "Developers may push to their teams' repositories."
  - match: {{account: "/.+/", name: "${{account}}/*"}}
    actions: ["*"]
    comment: "Logged in users have full access to images that are in their 'namespace'"
  - match: {{account: "/.+/", type: "registry", name: "catalog"}}
    actions: ["*"]
    comment: "Logged in users can query the catalog."
  - match: {{account: ""}}
    actions: ["pull"]
    comment: "Anonymous users can pull everything."
"""


def granted(host: str, scope: str, user: str | None) -> tuple[list[str], dict[str, object]]:
    query = urllib.parse.urlencode({"service": "registry-gateway", "scope": scope})
    credentials = (user, PASSWORDS[user]) if user else None
    status, _, body = http_request(host, "GET", f"/token?{query}", credentials)
    assert status == 200, body
    answer = json.loads(body)
    claims = json.loads(base64.urlsafe_b64decode(answer["token"].split(".")[1] + "=="))
    return [a for entry in claims["access"] for a in entry["actions"]], {**claims, **answer}


def test_docker_auth_config_loads_unchanged_and_grants_what_it_says(
    tmp_path: Path, registry: Registry
) -> None:
    key, cert = tmp_path / "server.key", tmp_path / "server.pem"
    made = subprocess.run(
        [sys.executable, "-m", "gateway", "token", "keygen", "--key", str(key), "--cert", str(cert)],
        capture_output=True,
    )
    assert made.returncode == 0
    config = tmp_path / "auth_config.yml"
    config.write_text(auth_config(key, cert))
    others = tmp_path / "htpasswd"
    htpasswd_add(others, "someone", "else")
    gateway = start_gateway(tmp_path, registry.url, others, "--policy", str(config))
    try:
        host = gateway.host
        # The token section made the gateway a token server, with its issuer and expiration.
        status, headers, _ = http_request(host, "GET", "/v2/")
        assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer realm=")
        actions, claims = granted(host, "repository:dev-backend/app:pull,push", "developer")
        assert sorted(actions) == ["pull", "push"]
        assert claims["iss"] == "Acme auth server" and claims["expires_in"] == 900
        assert granted(host, "repository:dev-infra/tools:push", "developer")[0] == ["push"]
        assert granted(host, "repository:dev-frontend/app:pull,push", "developer")[0] == []
        assert sorted(granted(host, "repository:username1/x:pull,push,delete", "username1")[0]) == [
            "delete",
            "pull",
            "push",
        ]
        assert granted(host, "repository:developer/x:push", "developer")[0] == ["push"]
        assert granted(host, "registry:catalog:*", "username1")[0] == ["*"]
        assert granted(host, "repository:anything/at-all:pull,push", None)[0] == ["pull"]
        assert sorted(granted(host, "repository:x/y:pull,push,delete", "admin")[0]) == [
            "delete",
            "pull",
            "push",
        ]
        # check-config says where the token settings came from.
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "gateway",
                "check-config",
                "--htpasswd",
                str(others),
                "--policy",
                str(config),
            ],
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, done.stderr
        assert (
            "token_issuer           Acme auth server  [docker_auth section of the policy file]" in done.stdout
        )
    finally:
        stop(gateway.process)


def test_docker_auth_sections_it_cannot_serve_are_named_in_one_error(tmp_path: Path) -> None:
    others = tmp_path / "htpasswd"
    htpasswd_add(others, "someone", "else")
    config = tmp_path / "auth_config.yml"
    config.write_text(
        'mongo_auth:\n  dial_info: {addrs: ["db:27017"]}\ngoogle_auth:\n  domain: "example.com"\n'
        'acl:\n  - match: {account: "admin"}\n    actions: ["*"]\n'
    )
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--htpasswd", str(others), "--policy", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "mongo_auth, google_auth: docker_auth sections this gateway does not support" in done.stderr
    assert "Traceback" not in done.stderr


def test_service_in_docker_auth_entries_is_the_registrys_service(tmp_path: Path, registry: Registry) -> None:
    """docker_auth matches `service` against what the client asked for, the registry's service:
    here token_service. A deny entry for it must hold in front of a broad allow."""
    key = tmp_path / "token.pem"
    made = subprocess.run(
        [sys.executable, "-m", "gateway", "token", "keygen", "--key", str(key)], capture_output=True
    )
    assert made.returncode == 0
    config = tmp_path / "auth_config.yml"
    config.write_text(
        f'token:\n  issuer: "Acme auth server"\n  key: "{key}"\n'
        f'users:\n  "username1":\n    password: "{hashed(PASSWORDS["username1"])}"\n'
        "acl:\n"
        '  - match: {account: "username1", service: "registry-gateway", name: "username1/private"}\n'
        "    actions: []\n"
        '  - match: {account: "/.+/", name: "${account}/*"}\n'
        '    actions: ["*"]\n'
    )
    others = tmp_path / "htpasswd"
    htpasswd_add(others, "someone", "else")
    gateway = start_gateway(tmp_path, registry.url, others, "--policy", str(config))
    try:
        assert granted(gateway.host, "repository:username1/private:pull", "username1")[0] == []
        assert granted(gateway.host, "repository:username1/public:pull", "username1")[0] == ["pull"]
        # The same with the Basic path through the gateway: the deny entry decides.
        status, _, _ = http_request(
            gateway.host, "GET", "/v2/username1/private/tags/list", ("username1", PASSWORDS["username1"])
        )
        assert status == 403
    finally:
        stop(gateway.process)


def test_server_and_token_sections_become_settings_where_left_at_defaults(tmp_path: Path) -> None:
    from gateway import config, docker_auth, policyfile
    from gateway.tokens import keys

    users = tmp_path / "htpasswd"
    htpasswd_add(users, "someone", "else")
    key, cert = tmp_path / "server.key", tmp_path / "server.pem"
    signing = keys.generate()
    keys.write_private(signing, key)
    cert.write_bytes(keys.self_signed_certificate(signing, "test"))
    policy = policyfile.parse(
        {
            "server": {"addr": ":5001", "certificate": str(cert), "key": str(key)},
            "token": {"issuer": "Acme auth server", "expiration": 900},
            "acl": [{"match": {"account": "admin"}, "actions": ["*"]}],
        }
    )
    applied = docker_auth.apply(config.load(None, {}, {"htpasswd": str(users)}), policy)
    assert (applied.listen_host, applied.listen_port) == ("0.0.0.0", 5001)
    assert (applied.tls_cert, applied.tls_key) == (cert, key)
    assert (applied.challenge, applied.token_issuer, applied.token_lifetime) == (
        "bearer",
        "Acme auth server",
        900,
    )
    assert (applied.token_key, applied.token_cert) == (key, cert)  # the server's, as in docker_auth
    assert applied.origins["token_issuer"] == "docker_auth section of the policy file"
    # All applied; the one token setting such a file has no key for is named (issue 25.9).
    service_note = (
        "token: has no service key (docker_auth takes it from each request); set token_service (or "
        "GATEWAY_TOKEN_SERVICE) to the registry's auth.token.service: tokens are issued for the "
        "default, 'registry-gateway'"
    )
    assert docker_auth.not_applied(applied, policy) == [service_note]
    # An explicit setting wins over the section, and says so (serve logs it, check-config prints it).
    flags = {"htpasswd": str(users), "listen": "127.0.0.1:7000"}
    explicit = config.load(None, {"GATEWAY_TOKEN_ISSUER": "registry-gateway"}, flags)
    applied = docker_auth.apply(explicit, policy)
    assert (applied.listen_host, applied.listen_port) == ("127.0.0.1", 7000)
    assert (applied.token_issuer, applied.token_lifetime) == ("registry-gateway", 900)
    assert docker_auth.not_applied(applied, policy) == [
        "server.addr (0.0.0.0:5001) not applied: listen (--listen) is set to 127.0.0.1:7000",
        "token.issuer (Acme auth server) not applied: token_issuer (GATEWAY_TOKEN_ISSUER) is set to "
        "registry-gateway",
        service_note,
    ]
    bad = policyfile.parse({"server": {"addr": "nowhere"}, "acl": [{"match": {}, "actions": []}]})
    with pytest.raises(docker_auth.DockerAuthError):
        docker_auth.apply(config.load(None, {}, {"htpasswd": str(users)}), bad)


def test_settings_a_docker_auth_file_fills_in_are_checked_together(tmp_path: Path) -> None:
    """config.load checks settings against each other; the ones a docker_auth file fills in came
    after it, unchecked: a token section with two workers and no key (each worker its own
    ephemeral key: tokens refused by the other) started, and a server certificate not of its
    key failed later. Now every problem is named, with where the setting came from."""
    from gateway import config, docker_auth, policyfile
    from gateway.tokens import keys

    users = tmp_path / "htpasswd"
    htpasswd_add(users, "someone", "else")
    acl = [{"match": {"account": "admin"}, "actions": ["*"]}]
    token_only = policyfile.parse({"token": {"issuer": "Acme auth server"}, "acl": acl})
    two_workers = config.load(None, {}, {"htpasswd": str(users), "workers": "2"})
    with pytest.raises(docker_auth.DockerAuthError, match="token_key: needed with workers > 1"):
        docker_auth.apply(two_workers, token_only)
    assert (
        docker_auth.apply(config.load(None, {}, {"htpasswd": str(users)}), token_only).challenge == "bearer"
    )

    key, cert, other = tmp_path / "server.key", tmp_path / "server.pem", tmp_path / "other.key"
    keys.write_private(keys.generate(), key)
    keys.write_private(keys.generate(), other)
    keys.write_certificate(keys.load(other), "not the server's", cert)
    garbage = tmp_path / "token.key"
    garbage.write_text("not a key\n")
    mismatched = policyfile.parse(
        {
            "server": {"addr": ":5001", "certificate": str(cert), "key": str(key)},
            "token": {"issuer": "Acme auth server", "key": str(garbage)},
            "acl": acl,
        }
    )
    with pytest.raises(docker_auth.DockerAuthError) as caught:
        docker_auth.apply(config.load(None, {}, {"htpasswd": str(users)}), mismatched)
    message = str(caught.value)
    assert "tls_cert (from the docker_auth section of the policy file): cannot load with tls_key" in message
    assert "token_key (from the docker_auth section of the policy file)" in message
    assert "not an unencrypted PEM private key" in message


def test_a_reload_says_that_server_and_token_changes_wait_for_a_restart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from gateway.state import AccessStore

    users = tmp_path / "htpasswd"
    users.write_text("")
    policy = tmp_path / "auth_config.yml"
    policy.write_text("token: {issuer: 'Acme'}\nacl: [{match: {account: admin}, actions: ['*']}]\n")
    store = AccessStore(users, policy)
    policy.write_text("token: {issuer: 'Acme'}\nacl: [{match: {account: root}, actions: ['*']}]\n")
    with caplog.at_level("WARNING"):
        assert store.reload_if_changed()
    assert "next start" not in caplog.text  # only the acl changed: in force now, nothing to say
    policy.write_text("token: {issuer: 'Other'}\nacl: [{match: {account: root}, actions: ['*']}]\n")
    with caplog.at_level("WARNING"):
        assert store.reload_if_changed()
    assert f"{policy}: its server: and token: sections changed: they take effect at the next start" in (
        caplog.text
    )
