"""Per-repository rules end to end: skopeo through the gateway to the real registry, cell by cell."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.sample_image import write_image
from tests.conftest import (
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

PASSWORDS = {"admin": "admin-pw-1", "alice": "alice-pw-1", "bob": "bob-pw-1"}

POLICY = textwrap.dedent("""\
    acl:
      - match: {account: "/^admin/"}
        actions: ["*"]
        comment: admins
      - match: {account: "/.+/", name: "dev-${labels:team}/*"}
        actions: [pull, push]
        comment: teams push and pull their own repositories
      - match: {account: "/.+/", name: "library/*"}
        actions: [pull]
        comment: every user pulls library
      - match: {name: "public/*"}
        actions: [pull]
        comment: everyone, anonymous included, pulls public
    accounts:
      alice: {labels: {team: [x]}}
      bob: {groups: [y-team], labels: {team: [y]}}
""")

REPOSITORIES = ("library/base", "public/hello", "dev-x/app", "dev-y/app", "other/thing")


@dataclass
class Setup:
    gateway: Gateway
    registry: Registry
    users: Path
    policy: Path
    image: Path
    tmp: Path


def authfile(tmp: Path, host: str, user: str | None) -> Path:
    credentials = None if user is None else (user, PASSWORDS[user])
    return write_authfile(tmp / f"auth-{user or 'anonymous'}.json", host, credentials)


def skopeo_delete(ref: str, auth: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            require("skopeo"),
            "--insecure-policy",
            "delete",
            "--retry-times",
            "0",
            "--tls-verify=false",
            "--authfile",
            str(auth),
            ref,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def setup(tmp_path: Path, registry: Registry) -> Iterator[Setup]:
    users = tmp_path / "htpasswd"
    for user, password in PASSWORDS.items():
        htpasswd_add(users, user, password, "-B")
    policy = tmp_path / "policy.yml"
    policy.write_text(POLICY)
    gateway = start_gateway(tmp_path, registry.url, users, "--policy", str(policy))
    image = tmp_path / "seed"
    write_image(image, "1", layers=2, layer_bytes=20_000)
    admin = authfile(tmp_path, gateway.host, "admin")
    for repository in REPOSITORIES:
        seeded = skopeo_copy(f"oci:{image}:1", f"docker://{gateway.host}/{repository}:1", admin)
        assert seeded.returncode == 0, seeded.stderr
    try:
        yield Setup(gateway, registry, users, policy, image, tmp_path)
    finally:
        stop(gateway.process)


EXPECTED_PULL = {
    "admin": set(REPOSITORIES),
    "alice": {"library/base", "public/hello", "dev-x/app"},
    "bob": {"library/base", "public/hello", "dev-y/app"},
    None: {"public/hello"},
}
EXPECTED_PUSH = {
    "admin": set(REPOSITORIES),
    "alice": {"dev-x/app"},
    "bob": {"dev-y/app"},
    None: set(),
}


def tag_exists(registry: Registry, repository: str, tag: str) -> bool:
    root = registry.storage / "docker/registry/v2/repositories" / repository / "_manifests/tags" / tag
    return root.exists()


def test_every_user_repository_operation_cell(setup: Setup) -> None:
    host = setup.gateway.host
    blobs_before = setup.registry.blob_count()
    for user in ("admin", "alice", "bob", None):
        auth = authfile(setup.tmp, host, user)
        for repository in REPOSITORIES:
            pulled = skopeo_copy(f"docker://{host}/{repository}:1", f"oci:{setup.tmp / 'out'}:x", auth)
            assert (pulled.returncode == 0) == (repository in EXPECTED_PULL[user]), (
                user,
                repository,
                "pull",
                pulled.stderr,
            )

            # Each push attempt carries a layer of its own, so a leaked upload would show in storage.
            source = setup.tmp / f"push-{user}-{repository.replace('/', '-')}"
            write_image(source, "new", layers=1, layer_bytes=5_000)
            tag = f"by-{user or 'anonymous'}"
            pushed = skopeo_copy(f"oci:{source}:new", f"docker://{host}/{repository}:{tag}", auth)
            allowed = repository in EXPECTED_PUSH[user]
            assert (pushed.returncode == 0) == allowed, (user, repository, "push", pushed.stderr)
            assert tag_exists(setup.registry, repository, tag) == allowed, (user, repository)
            if not allowed:
                uploads = setup.registry.storage / "docker/registry/v2/repositories" / repository / "_uploads"
                assert not uploads.exists() or not any(uploads.iterdir()), (user, repository)
    # Delete: only admins. The others are refused and the manifest stays.
    for user in ("alice", "bob", None, "admin"):
        auth = authfile(setup.tmp, host, user)
        for repository in REPOSITORIES:
            deleted = skopeo_delete(f"docker://{host}/{repository}:1", auth)
            assert (deleted.returncode == 0) == (user == "admin"), (
                user,
                repository,
                "delete",
                deleted.stderr,
            )
            assert tag_exists(setup.registry, repository, "1") == (user != "admin"), (user, repository)
    pushes_allowed = sum(len(v) for v in EXPECTED_PUSH.values())
    # Exactly the allowed pushes added blobs: a layer, a config and a manifest each.
    assert setup.registry.blob_count() == blobs_before + 3 * pushes_allowed


def get(
    gateway: Gateway,
    path: str,
    user: str | None,
    password: str | None = None,
    method: str = "GET",
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    credentials = None if user is None else (user, PASSWORDS[user] if password is None else password)
    return http_request(gateway.host, method, path, credentials, body, headers)


def walk_catalog(gateway: Gateway, user: str, n: int) -> list[str]:
    seen: list[str] = []
    path: str | None = f"/v2/_catalog?n={n}"
    pages = 0
    while path is not None:
        status, headers, body = get(gateway, path, user)
        assert status == 200, body
        page = json.loads(body)["repositories"]
        assert len(page) <= n
        seen.extend(page)
        link = headers.get("Link")
        path = link[1 : link.index(">")] if link else None
        pages += 1
        assert pages < 50
    return seen


def test_catalog_is_filtered_per_user_and_pages_correctly(setup: Setup) -> None:
    admin_all = json.loads(get(setup.gateway, "/v2/_catalog", "admin")[2])["repositories"]
    assert admin_all == sorted(REPOSITORIES)
    assert json.loads(get(setup.gateway, "/v2/_catalog", "alice")[2])["repositories"] == sorted(
        EXPECTED_PULL["alice"]
    )
    assert json.loads(get(setup.gateway, "/v2/_catalog", "bob")[2])["repositories"] == sorted(
        EXPECTED_PULL["bob"]
    )
    for n in (1, 2, 3, 10):
        walked = walk_catalog(setup.gateway, "alice", n)
        assert walked == sorted(EXPECTED_PULL["alice"]), n  # each visible repository exactly once
    status, _headers, body = get(setup.gateway, "/v2/_catalog?n=0", "alice")
    assert status == 400 and json.loads(body)["errors"][0]["code"] == "PAGINATION_NUMBER_INVALID"


def finish_upload(gateway: Gateway, location: str, user: str, data: bytes) -> int:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    path = location.removeprefix(f"http://{gateway.host}")
    separator = "&" if "?" in path else "?"
    return get(
        gateway,
        f"{path}{separator}digest={digest}",
        user,
        method="PUT",
        body=data,
        headers={"Content-Type": "application/octet-stream"},
    )[0]


def upload_blob(gateway: Gateway, repository: str, user: str, data: bytes) -> None:
    status, headers, _ = get(gateway, f"/v2/{repository}/blobs/uploads/", user, method="POST", body=b"")
    assert status == 202
    assert finish_upload(gateway, headers["Location"], user, data) == 201


def test_mount_from_unpullable_repository_becomes_plain_upload(setup: Setup) -> None:
    # A blob that exists only in dev-y/app (bob's team), which alice may not pull.
    secret_layer = b"bob's secret layer " + os.urandom(64)
    digest = "sha256:" + hashlib.sha256(secret_layer).hexdigest()
    upload_blob(setup.gateway, "dev-y/app", "bob", secret_layer)

    layer_link = (
        setup.registry.storage
        / "docker/registry/v2/repositories/dev-x/app/_layers/sha256"
        / digest.removeprefix("sha256:")
    )
    status, headers, _ = get(
        setup.gateway,
        f"/v2/dev-x/app/blobs/uploads/?mount={digest}&from=dev-y/app",
        "alice",
        method="POST",
        body=b"",
    )
    assert status == 202, "the mount must not happen"
    assert not layer_link.exists()
    # The push still completes: alice uploads the bytes herself into the upload she was given.
    assert finish_upload(setup.gateway, headers["Location"], "alice", secret_layer) == 201
    assert layer_link.exists()

    # Control: a user who may pull the source gets the real mount.
    other_digest_layer = b"shared layer " + os.urandom(32)
    other = "sha256:" + hashlib.sha256(other_digest_layer).hexdigest()
    upload_blob(setup.gateway, "dev-y/app", "bob", other_digest_layer)
    assert (
        get(
            setup.gateway,
            f"/v2/other/thing/blobs/uploads/?mount={other}&from=dev-y/app",
            "admin",
            method="POST",
            body=b"",
        )[0]
        == 201
    )


def test_denial_body_names_repository_and_action_not_rule(setup: Setup) -> None:
    status, _headers, body = get(setup.gateway, "/v2/dev-y/app/manifests/1", "alice")
    assert status == 403
    error = json.loads(body)["errors"][0]
    assert error["code"] == "DENIED"
    assert error["detail"] == [{"Type": "repository", "Name": "dev-y/app", "Action": "pull"}]
    assert "acl" not in body.decode() and "team" not in body.decode()
    status, _headers, _ = get(setup.gateway, "/v2/dev-y/app/tags/list", "alice")
    assert status == 403
    status, _, _ = get(setup.gateway, "/v2/dev-y/app/tags/list", None)
    assert status == 401


def test_live_user_add_policy_edit_and_expiry(setup: Setup) -> None:
    gateway = setup.gateway
    # A user added with the CLI logs in within a few seconds, without a restart.
    added = subprocess.run(
        [
            sys.executable,  # the interpreter running the tests, with its packages; not PATH's python3
            "-m",
            "gateway",
            "user",
            "add",
            "carol",
            "--file",
            str(setup.users),
            "--password-stdin",
            "--cost",
            "4",
        ],
        input="carol-pw\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert added.returncode == 0, added.stderr
    deadline = time.monotonic() + 10
    while get(gateway, "/v2/", "carol", "carol-pw")[0] != 200:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert get(gateway, "/v2/library/base/tags/list", "carol", "carol-pw")[0] == 200

    # An invalid policy edit is refused; the old policy keeps serving.
    setup.policy.write_text(POLICY.replace('name: "library/*"', 'name: "/[broken/"'))
    time.sleep(1.5)
    assert get(gateway, "/v2/library/base/tags/list", "carol", "carol-pw")[0] == 200
    assert "reload refused" in gateway.log.read_text()

    # A valid edit takes effect: library becomes admin-only, and carol expires.
    setup.policy.write_text(
        POLICY.replace('name: "library/*"', 'name: "nothing/*"') + "  carol: {expires: 2001-02-03}\n"
    )
    deadline = time.monotonic() + 10
    while get(gateway, "/v2/library/base/tags/list", "bob")[0] != 403:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    status, _headers, body = get(gateway, "/v2/", "carol", "carol-pw")
    assert status == 401
    assert json.loads(body)["errors"][0]["message"] == "account expired"
    assert "carol-pw" not in gateway.log.read_text()


def test_static_users_from_policy_file(tmp_path: Path, registry: Registry) -> None:
    users = tmp_path / "htpasswd"
    htpasswd_add(users, "admin", "pw", "-B")
    bot_hash = (
        subprocess.run(
            [require("htpasswd"), "-nbB", "-C", "5", "ci-bot", "bot-pw"],
            capture_output=True,
            text=True,
            check=True,
        )
        .stdout.strip()
        .partition(":")[2]
    )
    policy = tmp_path / "policy.yml"
    policy.write_text(
        textwrap.dedent(f"""\
        users:
          "ci-bot": {{password: "{bot_hash}", labels: {{team: [ci]}}}}
        acl:
          - match: {{account: ci-bot, name: "${{labels:team}}/*"}}
            actions: ["*"]
    """)
    )
    gw = start_gateway(tmp_path, registry.url, users, "--policy", str(policy))
    try:
        assert get(gw, "/v2/ci/app/tags/list", "ci-bot", "bot-pw")[0] == 404  # allowed; repo unknown
        assert get(gw, "/v2/other/app/tags/list", "ci-bot", "bot-pw")[0] == 403
        assert get(gw, "/v2/ci/app/tags/list", "ci-bot", "wrong")[0] == 401
        # A users: section without a "" entry refuses anonymous requests outright.
        assert get(gw, "/v2/ci/app/tags/list", None)[0] == 401
    finally:
        stop(gw.process)


def test_sighup_reloads_at_once(tmp_path: Path, registry: Registry) -> None:
    users = tmp_path / "htpasswd"
    htpasswd_add(users, "alice", PASSWORDS["alice"], "-B")
    policy = tmp_path / "policy.yml"
    policy.write_text("acl:\n  - match: {account: alice}\n    actions: [pull]\n")
    gw = start_gateway(
        tmp_path, registry.url, users, "--policy", str(policy), env={"GATEWAY_RELOAD_INTERVAL": "3600"}
    )
    try:
        assert get(gw, "/v2/a/tags/list", "alice")[0] == 404  # allowed, no such repository
        policy.write_text("acl:\n  - match: {account: bob}\n    actions: [pull]\n")
        time.sleep(0.5)
        assert get(gw, "/v2/a/tags/list", "alice")[0] == 404  # not polled yet
        gw.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 5
        while get(gw, "/v2/a/tags/list", "alice")[0] != 403:
            assert time.monotonic() < deadline
            time.sleep(0.1)
    finally:
        stop(gw.process)
