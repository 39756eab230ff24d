"""Immutable tags: the policy's `immutable:` rules as tables (which tags, which operations, what is
refused and why), then with the real registry (deletes enabled), skopeo and the docker CLI: a new
immutable tag is pushed, the same image again passes, another image is refused and the registry
still serves the first (read from its storage), deletes of the tag and of its manifest are
refused, mutable tags stay mutable, and two first pushes of one tag at once cannot both pass."""

from __future__ import annotations

import hashlib
import http.client
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway import immutable, policyfile
from gateway.immutable import ImmutableRule
from gateway.routes import Operation, parse_request
from gateway.sample_image import write_image
from tests.conftest import (
    USERS,
    Gateway,
    Registry,
    basic_header,
    http_request,
    skopeo_copy,
    start_gateway,
    stop,
    users_with,
    write_authfile,
)
from tests.dockerd import Docker

RULE = ImmutableRule(0, "prod/*", ("v*", "!v*-rc*"))
DIGEST = "sha256:" + "a" * 64


def op(method: str, target: str) -> Operation:
    parsed = parse_request(method, target)
    assert isinstance(parsed, Operation), parsed
    return parsed


@pytest.mark.parametrize(
    ("repository", "tag", "covered"),
    [
        ("prod/app", "v1", True),
        ("prod/app", "v1.2.3", True),
        ("prod/app", "v2-rc1", False),  # excluded by "!v*-rc*"
        ("prod/app", "latest", False),
        ("prod/team/app", "v1", False),  # * does not cross /
        ("dev/app", "v1", False),
    ],
)
def test_which_tags_a_rule_covers(repository: str, tag: str, covered: bool) -> None:
    assert RULE.covers(repository, tag) is covered


def test_only_exclusions_cover_every_other_tag() -> None:
    rule = ImmutableRule(1, "/^release/.+$/", ("!latest", "!edge"))
    assert rule.covers("release/x/y", "1.0") and not rule.covers("release/x/y", "latest")


@pytest.mark.parametrize(
    ("method", "target", "kind"),
    [
        ("PUT", "/v2/prod/app/manifests/v1", "put_tag"),
        ("DELETE", "/v2/prod/app/manifests/v1", "delete_tag"),
        ("DELETE", "/v2/prod/app/manifests/" + DIGEST, "delete_digest"),
        ("PUT", "/v2/prod/app/manifests/" + DIGEST, None),  # by digest: no tag moves
        ("PUT", "/v2/prod/app/manifests/" + DIGEST + "?tag=latest", "tag_query"),  # OCI 1.1: refused
        ("PUT", "/v2/dev/app/manifests/" + DIGEST + "?tag=v1", None),
        ("PUT", "/v2/prod/app/manifests/latest", None),
        ("DELETE", "/v2/dev/app/manifests/" + DIGEST, None),  # no rule for the repository
        ("GET", "/v2/prod/app/manifests/v1", None),
        ("HEAD", "/v2/prod/app/manifests/v1", None),
        ("DELETE", "/v2/prod/app/blobs/" + DIGEST, "delete_blob"),  # an immutable release may need it
        ("DELETE", "/v2/dev/app/blobs/" + DIGEST, None),
    ],
)
def test_which_operations_are_guarded(method: str, target: str, kind: str | None) -> None:
    found = immutable.guard((RULE,), op(method, target))
    assert (found.kind if found else None) == kind


def test_what_is_refused_and_why() -> None:
    other = "sha256:" + "b" * 64
    assert immutable.on_put(RULE, "v1", None, DIGEST) is None  # the first push
    assert immutable.on_put(RULE, "v1", DIGEST, DIGEST) is None  # the same again: docker retries
    refused = immutable.on_put(RULE, "v1", DIGEST, other)
    assert refused is not None and refused.message == (
        f"tag v1 is immutable by immutable[0] (name prod/*, tags v*, !v*-rc*): it is {DIGEST}; push a new tag"
    )
    assert "cannot be deleted" in immutable.on_delete_tag(RULE, "v1").message
    assert immutable.on_delete_digest(DIGEST, {}) is None
    refused = immutable.on_delete_digest(DIGEST, {"v1": RULE})
    assert (
        refused is not None
        and f"manifest {DIGEST} is tag v1 or one of its platforms, immutable by immutable[0]"
        in refused.message
    )


@pytest.mark.parametrize(
    ("section", "problem"),
    [
        ({"name": "prod/*"}, None),  # every tag
        ([{"name": "prod/*", "tags": "v*"}], None),
        ({"name": "prod/*", "tags": ["v*"]}, "immutable: expected a list"),
        ([{"tags": ["v*"]}], "immutable[0].name: expected a repository name"),
        ([{"name": "prod/*", "tags": []}], "immutable[0].tags: expected a list of tag globs"),
        ([{"name": "prod/*", "tags": ["!"]}], "immutable[0].tags: expected a list of tag globs"),
        ([{"name": "prod/[", "tags": ["v*"]}], "immutable[0].name: invalid glob"),
        ([{"name": "prod/*", "tag": ["v*"]}], "immutable[0].tag: unknown key"),
    ],
)
def test_the_section_is_checked_by_key(section: object, problem: str | None) -> None:
    data = {"acl": [{"match": {}, "actions": ["*"]}], "immutable": section}
    if isinstance(section, dict) and problem is None:
        data["immutable"] = [section]
    if problem is None:
        assert policyfile.parse(data, "policy.yml").immutable
        return
    with pytest.raises(policyfile.PolicyError) as refused:
        policyfile.parse(data, "policy.yml")
    assert any(problem in line for line in refused.value.problems), refused.value.problems


# --- with the registry --------------------------------------------------------------------------

POLICY = """\
acl:
  - match: {account: "admin"}
    actions: ["*"]
immutable:
  - name: "prod/*"
    tags: ["v*", "!latest"]
"""


@pytest.fixture
def guarded(tmp_path: Path, registry: Registry) -> Iterator[Gateway]:
    policy = tmp_path / "policy.yml"
    policy.write_text(POLICY)
    gateway = start_gateway(
        tmp_path, registry.url, users_with(tmp_path / "htpasswd"), "--policy", str(policy)
    )
    try:
        yield gateway
    finally:
        stop(gateway.process)


def tag_in_storage(registry: Registry, repository: str, tag: str) -> str | None:
    """What the registry's storage says the tag points to (its current link), not the API."""
    link = (
        registry.storage
        / "docker/registry/v2/repositories"
        / repository
        / "_manifests/tags"
        / tag
        / "current/link"
    )
    return link.read_text() if link.exists() else None


ADMIN = ("admin", USERS["admin"])
ACCEPT = {"Accept": "application/vnd.oci.image.manifest.v1+json"}


def test_immutable_tags_with_skopeo_and_the_registry(
    tmp_path: Path, registry: Registry, guarded: Gateway
) -> None:
    host = guarded.host
    auth = write_authfile(tmp_path / "auth.json", host, ADMIN)
    first, second = tmp_path / "first", tmp_path / "second"
    first_digest = write_image(first, "1", layers=1, layer_bytes=4096)
    second_digest = write_image(second, "1", layers=1, layer_bytes=4096)

    def push(layout: Path, tag: str) -> tuple[int, str]:
        done = skopeo_copy(f"oci:{layout}:1", f"docker://{host}/prod/app:{tag}", auth)
        return done.returncode, done.stderr

    assert push(first, "v1") == (0, "")  # a new immutable tag
    assert push(first, "v1")[0] == 0  # the same image again
    code, said = push(second, "v1")
    assert code != 0 and "tag v1 is immutable by immutable[0] (name prod/*, tags v*, !latest)" in said, said
    assert tag_in_storage(registry, "prod/app", "v1") == first_digest
    status, headers, _ = http_request(host, "HEAD", "/v2/prod/app/manifests/v1", ADMIN, headers=ACCEPT)
    assert status == 200 and headers["Docker-Content-Digest"] == first_digest

    # Mutable tags stay mutable, in the same repository.
    assert push(first, "latest")[0] == 0 and push(second, "latest")[0] == 0
    assert tag_in_storage(registry, "prod/app", "latest") == second_digest

    # Deletes: the immutable tag, and the manifest it points to, are refused; a manifest only a
    # mutable tag points to is deleted.
    status, _, body = http_request(host, "DELETE", "/v2/prod/app/manifests/v1", ADMIN)
    assert status == 403 and b"cannot be deleted" in body, body
    status, _, body = http_request(host, "DELETE", f"/v2/prod/app/manifests/{first_digest}", ADMIN)
    assert status == 403 and b"is tag v1 or one of its platforms, immutable by immutable[0]" in body, body
    revisions = registry.storage / "docker/registry/v2/repositories/prod/app/_manifests/revisions/sha256"
    assert (revisions / first_digest.removeprefix("sha256:")).exists()
    status, _, body = http_request(host, "DELETE", f"/v2/prod/app/manifests/{second_digest}", ADMIN)
    assert status == 202, body
    assert tag_in_storage(registry, "prod/app", "v1") == first_digest


def two_manifests(tmp_path: Path, host: str, repository: str) -> list[bytes]:
    """Two different manifests in `repository` (their blobs pushed, under tags no rule covers)."""
    auth = write_authfile(tmp_path / "auth.json", host, ADMIN)
    manifests = []
    for name in ("a", "b"):
        layout = tmp_path / f"{repository.replace('/', '-')}-{name}"
        write_image(layout, "1", layers=1, layer_bytes=2048)
        assert skopeo_copy(f"oci:{layout}:1", f"docker://{host}/{repository}:{name}", auth).returncode == 0
        status, _, body = http_request(
            host, "GET", f"/v2/{repository}/manifests/{name}", ADMIN, headers=ACCEPT
        )
        assert status == 200
        manifests.append(body)
    return manifests


def put_both_at_once(targets: list[tuple[str, bytes]], path: str) -> list[int]:
    """PUT each manifest to its gateway at the same moment, each body taking half a second to
    arrive: without a lock held across the look and the PUT, both would see no tag and pass.
    The statuses, in the order of `targets`."""
    statuses = [0] * len(targets)
    start = threading.Barrier(len(targets))

    def put(index: int, host: str, body: bytes) -> None:
        def slowly() -> Iterator[bytes]:
            yield body[:10]
            time.sleep(0.5)
            yield body[10:]

        connection = http.client.HTTPConnection(host, timeout=60)
        start.wait()
        connection.request(
            "PUT",
            path,
            body=slowly(),
            headers={"Authorization": basic_header(ADMIN), "Content-Type": json.loads(body)["mediaType"]},
            encode_chunked=True,
        )
        statuses[index] = connection.getresponse().status
        connection.close()

    threads = [threading.Thread(target=put, args=(index, *target)) for index, target in enumerate(targets)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return statuses


def test_two_first_pushes_of_one_tag_at_once_cannot_both_pass(
    tmp_path: Path, registry: Registry, guarded: Gateway
) -> None:
    manifests = two_manifests(tmp_path, guarded.host, "prod/race")
    statuses = put_both_at_once([(guarded.host, body) for body in manifests], "/v2/prod/race/manifests/v1")
    assert sorted(statuses) == [201, 403], statuses
    winner = manifests[statuses.index(201)]
    assert tag_in_storage(registry, "prod/race", "v1") == "sha256:" + hashlib.sha256(winner).hexdigest()


def test_two_first_pushes_through_two_gateways_sharing_redis(tmp_path: Path, registry: Registry) -> None:
    """Across processes (workers, replicas) the tag's lock is in Redis."""
    from tests.services import start_redis, stop_process

    redis = start_redis(tmp_path)
    policy = tmp_path / "policy.yml"
    policy.write_text(POLICY)
    users = users_with(tmp_path / "htpasswd")
    gateways = []
    try:
        for _ in range(2):
            gateways.append(
                start_gateway(tmp_path, registry.url, users, "--policy", str(policy), env=redis.env())
            )
        manifests = two_manifests(tmp_path, gateways[0].host, "prod/shared")
        targets = [(gateway.host, body) for gateway, body in zip(gateways, manifests, strict=True)]
        statuses = put_both_at_once(targets, "/v2/prod/shared/manifests/v1")
        assert sorted(statuses) == [201, 403], statuses
        winner = manifests[statuses.index(201)]
        assert tag_in_storage(registry, "prod/shared", "v1") == "sha256:" + hashlib.sha256(winner).hexdigest()
    finally:
        for gateway in gateways:
            stop(gateway.process)
        stop_process(redis.process)


def test_the_docker_cli_sees_why(
    tmp_path: Path, registry: Registry, guarded: Gateway, dockerd: Docker
) -> None:
    config = tmp_path / "docker-config"
    host = guarded.host
    code, said = dockerd.cli(config, "login", "-u", "admin", "--password-stdin", host, stdin=USERS["admin"])
    assert code == 0, said
    tag = f"{host}/prod/cli:v2"
    dockerd.build_image(config, tag, {"a.bin": b"first"})
    code, said = dockerd.cli(config, "push", tag)
    assert code == 0, said
    first = tag_in_storage(registry, "prod/cli", "v2")
    dockerd.build_image(config, tag, {"a.bin": b"second"})
    code, said = dockerd.cli(config, "push", tag)
    assert code != 0 and "denied: tag v2 is immutable by immutable[0]" in said, said
    assert tag_in_storage(registry, "prod/cli", "v2") == first


def test_policy_explain_says_when_a_tag_is_immutable_and_why(tmp_path: Path) -> None:
    import subprocess
    import sys

    policy = tmp_path / "policy.yml"
    policy.write_text(POLICY)
    users = users_with(tmp_path / "htpasswd")  # explain looks the user up: in these files, never /etc's

    def explain(tag: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "gateway", "policy", "explain", "admin", "prod/app", "push", "--tag", tag,
             "--policy", str(policy)],
            capture_output=True, text=True, timeout=60,
            env={"PATH": "/usr/bin:/bin", "GATEWAY_HTPASSWD": str(users)},
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert "tag v1: immutable by immutable[0] (name prod/*, tags v*, !latest)" in explain("v1")
    assert "tag latest: mutable" in explain("latest")


def test_an_immutable_index_keeps_its_platforms_and_blobs(
    tmp_path: Path, registry: Registry, guarded: Gateway
) -> None:
    """Deleting one platform's manifest, or a blob, would leave the tag naming what cannot be
    pulled: both refused where a rule applies."""
    from gateway.sample_image import write_index

    host = guarded.host
    auth = write_authfile(tmp_path / "auth.json", host, ADMIN)
    layout = tmp_path / "index"
    write_index(layout, "v1", ["amd64", "arm64"])
    pushed = skopeo_copy(
        f"oci:{layout}:v1", f"docker://{host}/prod/idx:v1", auth, "--dest-tls-verify=false", "--all"
    )
    assert pushed.returncode == 0, pushed.stderr
    accept = {"Accept": "application/vnd.oci.image.index.v1+json"}
    status, _, body = http_request(host, "GET", "/v2/prod/idx/manifests/v1", ADMIN, headers=accept)
    assert status == 200
    child = json.loads(body)["manifests"][0]["digest"]
    status, _, said = http_request(host, "DELETE", f"/v2/prod/idx/manifests/{child}", ADMIN)
    assert status == 403 and b"is tag v1 or one of its platforms" in said, said
    status, _, manifest = http_request(host, "GET", f"/v2/prod/idx/manifests/{child}", ADMIN, headers=ACCEPT)
    assert status == 200
    layer = json.loads(manifest)["layers"][0]["digest"]
    status, _, said = http_request(host, "DELETE", f"/v2/prod/idx/blobs/{layer}", ADMIN)
    assert status == 403 and b"garbage collection" in said, said
    assert http_request(host, "HEAD", f"/v2/prod/idx/blobs/{layer}", ADMIN)[0] == 200


def test_a_slow_manifest_holds_no_one_up(tmp_path: Path, registry: Registry, guarded: Gateway) -> None:
    """The manifest is read before the repository's lock is taken: a client that never finishes
    sending one keeps no other push of the tag waiting."""
    import socket

    host = guarded.host
    manifests = two_manifests(tmp_path, host, "prod/slow")
    address, port = host.rsplit(":", 1)
    stalled = socket.create_connection((address, int(port)), timeout=30)
    try:
        promised = len(manifests[0]) + 100000
        head = (
            f"PUT /v2/prod/slow/manifests/v1 HTTP/1.1\r\nHost: {host}\r\n"
            f"Authorization: {basic_header(ADMIN)}\r\n"
            f"Content-Type: application/vnd.oci.image.manifest.v1+json\r\nContent-Length: {promised}\r\n\r\n"
        )
        stalled.sendall(head.encode() + manifests[0][:50])
        time.sleep(0.5)
        status, _, body = http_request(
            host, "PUT", "/v2/prod/slow/manifests/v1", ADMIN, body=manifests[1],
            headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"},
        )  # fmt: skip
        assert status == 201, body
    finally:
        stalled.close()
