"""Robot accounts end to end: `registry-gateway robot create` (the CLI as operators run it), the
gateway following the robots file, the real registry, the docker CLI and skopeo, in Basic and
in Bearer mode. A robot pushes within its scopes and the policy, is refused outside either, is
refused within a second or two of `robot revoke` (its tokens too) and once it expires, and its
secret is in no log, audit record or listing; its audit records say it was a robot."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import (
    Registry,
    http_request,
    make_token_key,
    skopeo_copy,
    wait_until,
    write_authfile,
)
from tests.dockerd import Docker
from tests.test_docker_cli import Stack, docker_stack

# Robots with the label team=ci may push; every other robot may pull; scopes narrow both.
POLICY = """\
acl:
  - match: {account: "admin"}
    actions: ["*"]
  - match: {account: "/^robot\\\\+[a-z0-9][a-z0-9._-]*$/", labels: {team: "ci"}}
    actions: ["pull", "push"]
  - match: {account: "/^robot\\\\+[a-z0-9][a-z0-9._-]*$/"}
    actions: ["pull"]
"""


def robot_cli(robots: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", "robot", *args, "--file", str(robots)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def create(robots: Path, name: str, *args: str) -> str:
    made = robot_cli(robots, "create", name, *args)
    assert made.returncode == 0, made.stderr
    return made.stdout.strip()


def _with_robots(
    tmp_path: Path, docker: Docker, env: dict[str, str] | None = None
) -> Iterator[tuple[Stack, Path, Path]]:
    policy, robots, audit = tmp_path / "policy.yml", tmp_path / "robots.yml", tmp_path / "audit.log"
    policy.write_text(POLICY)
    options = ("--policy", str(policy), "--robots", str(robots), "--audit-log", str(audit))
    for stack in docker_stack(tmp_path, docker, *options, env=env):
        yield stack, robots, audit


@pytest.fixture
def basic(tmp_path: Path, dockerd: Docker) -> Iterator[tuple[Stack, Path, Path]]:
    yield from _with_robots(tmp_path, dockerd)


@pytest.fixture
def bearer(tmp_path: Path, dockerd: Docker) -> Iterator[tuple[Stack, Path, Path]]:
    key = make_token_key(tmp_path / "token.key")
    yield from _with_robots(tmp_path, dockerd, {"GATEWAY_CHALLENGE": "bearer", "GATEWAY_TOKEN_KEY": str(key)})


def stored(registry: Registry) -> set[str]:
    return registry.repositories()


def login_status(host: str, user: str, secret: str) -> int:
    return http_request(host, "GET", "/v2/", (user, secret))[0]


def push_inside_and_outside(stack: Stack, user: str, secret: str, name: str) -> str:
    """The robot logs in and pushes ci/NAME (within its scopes and the policy); other/NAME
    (outside its scopes, though the policy would let it) is refused, and nothing of it stored.
    Returns the image pushed."""
    status, said = stack.login(user, secret)
    assert status == 0, said
    image = stack.image(f"ci/{name}")
    status, said = stack.docker_cli("push", image)
    assert status == 0, said
    other = f"{stack.gateway.host}/other/{name}:1"
    assert stack.docker_cli("tag", image, other)[0] == 0
    status, said = stack.docker_cli("push", other)
    assert status != 0 and "denied" in said.lower(), said
    assert f"ci/{name}" in stored(stack.registry) and f"other/{name}" not in stored(stack.registry)
    return image


def test_a_robot_pushes_within_its_scopes_and_the_policy_and_is_revoked(
    basic: tuple[Stack, Path, Path], tmp_path: Path
) -> None:
    stack, robots, audit = basic
    host = stack.gateway.host
    ci = create(robots, "ci", "--scope", "repository:ci/*:pull,push", "--label", "team=ci", "--expires", "1h")
    reader = create(robots, "reader", "--scope", "repository:ci/*:pull,push", "--expires", "1h")
    wait_until(lambda: login_status(host, "robot+ci", ci) == 200, 5)  # the gateway reloaded the file

    image = push_inside_and_outside(stack, "robot+ci", ci, "app")

    # Within its scopes, though the policy (no team=ci label) lets it only pull: refused.
    assert stack.docker_cli("logout", host)[0] == 0
    status, said = stack.login("robot+reader", reader)
    assert status == 0, said
    pushed_by_reader = f"{host}/ci/reader:1"
    assert stack.docker_cli("tag", image, pushed_by_reader)[0] == 0
    status, said = stack.docker_cli("push", pushed_by_reader)
    assert status != 0 and "denied" in said, said
    stack.forget(image)
    status, said = stack.docker_cli("pull", image)
    assert status == 0, said
    assert "ci/reader" not in stored(stack.registry)

    # skopeo too, with the robot's secret in its auth file.
    authfile = write_authfile(tmp_path / "auth.json", host, ("robot+ci", ci))
    copied = skopeo_copy(f"docker://{host}/ci/app:1", f"docker://{host}/ci/copy:1", authfile)
    assert copied.returncode == 0, copied.stderr
    refused = skopeo_copy(f"docker://{host}/ci/app:1", f"docker://{host}/prod/copy:1", authfile)
    assert refused.returncode != 0 and "prod/copy" not in stored(stack.registry)

    # No lockout for robots: nothing to guess, and wrong secrets from its address must not lock
    # out the CI jobs there (lockout_attempts is 10).
    for _ in range(15):
        assert login_status(host, "robot+ci", ci + "x") == 401
    assert login_status(host, "robot+ci", ci) == 200

    # Revoked: refused within a second or two, the right secret included.
    assert robot_cli(robots, "revoke", "ci").returncode == 0
    wait_until(lambda: login_status(host, "robot+ci", ci) == 401, 3)
    status, said = stack.login("robot+ci", ci)
    assert status != 0, said

    # The audit log says which requests were a robot's; no secret is in any log or listing.
    records = [json.loads(line) for line in audit.read_text().splitlines()]
    robot_pushes = [r for r in records if r.get("robot") == "ci" and r.get("operation") == "push"]
    assert robot_pushes and all(r["user"] == "robot+ci" for r in robot_pushes)
    assert not [r for r in records if r["user"] == "admin" and "robot" in r]
    listed = robot_cli(robots, "list").stdout
    for secret in (ci, reader):
        for text in (audit.read_text(), stack.gateway.log.read_text(), listed, robots.read_text()):
            assert secret not in text


def test_a_robot_expires(basic: tuple[Stack, Path, Path]) -> None:
    stack, robots, _ = basic
    host = stack.gateway.host
    brief = create(robots, "brief", "--scope", "repository:ci/*:pull", "--expires", "4s")
    wait_until(lambda: login_status(host, "robot+brief", brief) == 200, 5)
    wait_until(lambda: login_status(host, "robot+brief", brief) == 401, 10)
    status, _, body = http_request(host, "GET", "/v2/", ("robot+brief", brief))
    assert status == 401 and b"account expired" in body
    assert "(expired)" in robot_cli(robots, "list").stdout


def test_a_robot_in_bearer_mode_gets_tokens_within_its_scopes_until_revoked(
    bearer: tuple[Stack, Path, Path],
) -> None:
    stack, robots, _ = bearer
    host = stack.gateway.host
    ci = create(robots, "ci", "--scope", "repository:ci/*:pull,push", "--label", "team=ci")
    wait_until(
        lambda: http_request(host, "GET", "/token?service=registry-gateway", ("robot+ci", ci))[0] == 200, 5
    )
    image = push_inside_and_outside(stack, "robot+ci", ci, "tokened")

    # A token asked for more than the scopes: granted only what they allow.
    query = (
        "service=registry-gateway&scope=repository:ci/tokened:pull,push,delete&scope=repository:prod/x:pull"
    )
    status, _, body = http_request(host, "GET", f"/token?{query}", ("robot+ci", ci))
    assert status == 200, body
    token = json.loads(body)["token"]
    claims = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))
    assert claims["access"] == [{"type": "repository", "name": "ci/tokened", "actions": ["pull", "push"]}]
    manifest = "/v2/ci/tokened/manifests/1"
    headers = {
        "Authorization": f"Bearer {token}",
        "Accept": "application/vnd.docker.distribution.manifest.v2+json",
    }
    assert http_request(host, "GET", manifest, headers=headers)[0] == 200

    # Rotated: the old secret and its token are refused at the file's next reload (no Redis, no
    # revocations file here), not when the token expires; the new secret works.
    rotated = robot_cli(robots, "rotate", "ci")
    assert rotated.returncode == 0, rotated.stderr
    new_secret = rotated.stdout.strip()
    wait_until(lambda: http_request(host, "GET", manifest, headers=headers)[0] == 401, 3)
    assert http_request(host, "GET", f"/token?{query}", ("robot+ci", ci))[0] == 401
    status, _, body = http_request(host, "GET", f"/token?{query}", ("robot+ci", new_secret))
    assert status == 200, body
    headers["Authorization"] = f"Bearer {json.loads(body)['token']}"
    assert http_request(host, "GET", manifest, headers=headers)[0] == 200

    # Revoked: its token is refused at once (the file's next reload), not when it expires.
    assert robot_cli(robots, "revoke", "ci").returncode == 0
    wait_until(lambda: http_request(host, "GET", manifest, headers=headers)[0] == 401, 3)
    status, said = stack.docker_cli("pull", image)
    assert status != 0, said
