"""The docker CLI, for real: a private dockerd, the gateway, Debian's docker-registry behind it."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import USERS, Gateway, Registry, free_port, start_gateway, start_registry, stop
from tests.dockerd import Docker
from tests.test_fastpath import fast_path_counts

POLICY = """\
acl:
  - match: {account: "admin"}
    actions: ["*"]
  - match: {account: "alice", name: "alice/*"}
    actions: ["pull", "push"]
  - match: {account: "alice", name: "shared/*"}
    actions: ["pull"]
  - match: {account: "", name: "public/*"}
    actions: ["pull"]
"""


@dataclass
class Stack:
    docker: Docker
    registry: Registry
    gateway: Gateway
    config: Path  # this test's DOCKER_CONFIG
    metrics: str  # the gateway's /metrics URL

    def docker_cli(self, *args: str, stdin: str | None = None) -> tuple[int, str]:
        return self.docker.cli(self.config, *args, stdin=stdin)

    def login(self, user: str, password: str | None = None) -> tuple[int, str]:
        password = USERS[user] if password is None else password
        host = self.gateway.host
        return self.docker_cli("login", "-u", user, "--password-stdin", host, stdin=password + "\n")

    def image(self, repository: str, tag: str = "1", layers: int = 3) -> str:
        """A fresh image of several layers, tagged for the gateway."""
        name = f"{self.gateway.host}/{repository}:{tag}"
        contents = {f"layer{i}.bin": os.urandom(50_000 + i) for i in range(layers)}
        self.docker.build_image(self.config, name, contents)
        return name

    def forget(self, name: str) -> None:
        self.docker_cli("rmi", "-f", name)


def docker_stack(
    tmp_path: Path, docker: Docker, *flags: str, env: dict[str, str] | None = None
) -> Iterator[Stack]:
    registry = start_registry(tmp_path)
    gateway = None
    try:
        users = tmp_path / "htpasswd"
        from tests.conftest import htpasswd_add

        for user, password in USERS.items():
            htpasswd_add(users, user, password)
        metrics_port = free_port()
        gateway = start_gateway(
            tmp_path, registry.url, users, "--metrics-listen", f"127.0.0.1:{metrics_port}", *flags, env=env
        )
        yield Stack(
            docker, registry, gateway, tmp_path / "docker-config", f"http://127.0.0.1:{metrics_port}/metrics"
        )
    finally:
        if gateway is not None:
            stop(gateway.process)
        stop(registry.process)


@pytest.fixture
def default_stack(tmp_path: Path, dockerd: Docker) -> Iterator[Stack]:
    yield from docker_stack(tmp_path, dockerd)


@pytest.fixture
def policy_stack(tmp_path: Path, dockerd: Docker) -> Iterator[Stack]:
    policy = tmp_path / "policy.yml"
    policy.write_text(POLICY)
    yield from docker_stack(tmp_path, dockerd, "--policy", str(policy))


def linked(registry: Registry, repository: str) -> set[str]:
    layers = registry.storage / "docker/registry/v2/repositories" / repository / "_layers/sha256"
    return {p.name for p in layers.iterdir()} if layers.exists() else set()


def test_default_policy_login_push_pull_denied_logout(default_stack: Stack) -> None:
    stack = default_stack
    status, output = stack.login("alice", "wrong password")
    assert status != 0 and "401 Unauthorized" in output
    assert (
        not (stack.config / "config.json").exists()
        or stack.gateway.host not in (stack.config / "config.json").read_text()
    )

    status, output = stack.login("admin")
    assert status == 0 and "Login Succeeded" in output
    image = stack.image("library/app")
    status, output = stack.docker_cli("push", image)
    assert status == 0, output
    digest = re.search(r"digest: (sha256:[0-9a-f]{64})", output)
    assert digest is not None
    assert "library/app" in stack.registry.repositories()

    # A reader pulls what the admin pushed, and may not push.
    stack.forget(image)
    assert stack.docker_cli("logout", stack.gateway.host)[0] == 0
    assert stack.login("alice")[0] == 0
    before = fast_path_counts(stack.metrics)
    status, output = stack.docker_cli("pull", image)
    assert status == 0 and digest.group(1) in output, output
    # docker keeps its connections: after the challenge and the login (the full path's), its
    # connection comes back to the fast path, which serves the manifest and the layers.
    after = fast_path_counts(stack.metrics)
    assert after["served"] - before["served"] >= 4, (before, after)
    other = stack.image("library/other")
    status, output = stack.docker_cli("push", other)
    assert status != 0 and "denied: requested access to the resource is denied" in output
    assert "library/other" not in stack.registry.repositories()

    # Logged out, the Basic challenge leaves the docker CLI no way in.
    status, output = stack.docker_cli("logout", stack.gateway.host)
    assert status == 0 and "Removing login credentials" in output
    stack.forget(image)
    status, output = stack.docker_cli("pull", image)
    assert status != 0 and "no basic auth credentials" in output


def test_policy_file_hidden_repositories_mounts_and_anonymous_pulls(policy_stack: Stack) -> None:
    stack = policy_stack
    assert stack.login("admin")[0] == 0
    secret = stack.image("secret/hidden")
    shared = stack.image("shared/base")
    public = stack.image("public/app")
    for image in (secret, shared, public):
        status, output = stack.docker_cli("push", image)
        assert status == 0, output
    assert stack.docker_cli("logout", stack.gateway.host)[0] == 0

    assert stack.login("alice")[0] == 0
    # Pushing an image whose layers already exist in a repository alice may pull: docker mounts
    # them (no upload), and the registry links them into alice's repository.
    mine = f"{stack.gateway.host}/alice/app:1"
    assert stack.docker_cli("tag", shared, mine)[0] == 0
    status, output = stack.docker_cli("push", mine)
    assert status == 0, output
    assert "Mounted from shared/base" in output
    assert linked(stack.registry, "alice/app") == linked(stack.registry, "shared/base")
    # Layers this daemon knows from secret/hidden, which alice may not pull: docker asks to mount
    # them from there; the gateway turns that into an ordinary upload of alice's own bytes.
    leak = f"{stack.gateway.host}/alice/leak:1"
    assert stack.docker_cli("tag", secret, leak)[0] == 0
    status, output = stack.docker_cli("push", leak)
    assert status == 0, output
    assert "Mounted from" not in output and "Pushed" in output
    # A repository the policy hides: refused, and docker says so.
    stack.forget(secret)
    status, output = stack.docker_cli("pull", secret)
    assert status != 0 and "denied" in output
    # Outside alice/*: denied.
    bob = f"{stack.gateway.host}/bob/app:1"
    assert stack.docker_cli("tag", shared, bob)[0] == 0
    status, output = stack.docker_cli("push", bob)
    assert status != 0 and "denied" in output
    assert "bob/app" not in stack.registry.repositories()
    assert stack.docker_cli("logout", stack.gateway.host)[0] == 0

    # Anonymous: the policy lets anyone pull public/*, but with a Basic challenge the docker CLI
    # never sends a request without credentials; it needs the Bearer token flow (issue 10).
    stack.forget(public)
    status, output = stack.docker_cli("pull", public)
    assert status != 0 and "no basic auth credentials" in output
