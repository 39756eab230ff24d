"""Three gateways behind HAProxy, sharing one Redis, one signing key, one htpasswd file and one
registry, with real clients (the docker CLI on a private dockerd, skopeo): what operators run for
load and for restarts that lose no push.

- docker and skopeo push and pull through the load balancer, with Basic and with Bearer tokens
  (a token issued by one replica is accepted by the others);
- the lockout holds across replicas: a guesser spread over them gets `lockout_attempts` checks;
- `token revoke` and `user passwd` reach every replica within a second or two;
- a rolling restart (each replica in turn sent SIGTERM and started again) during continuous
  pushes and pulls fails no transfer;
- a replica killed with SIGKILL mid-push fails at most what it held, and the retry succeeds.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from gateway.sample_image import write_image
from tests.conftest import (
    USERS,
    Gateway,
    Registry,
    free_port,
    make_token_key,
    metric,
    start_gateway,
    start_registry,
    stop,
    users_with,
    wait_until,
    write_authfile,
)
from tests.dockerd import Docker
from tests.services import HAProxy, Redis, start_haproxy, start_redis, stop_process
from tests.test_guards import ask

ADMIN = ("admin", USERS["admin"])
ATTEMPTS = 5
REPLICAS = 3


@dataclass
class Fleet:
    registry: Registry
    redis: Redis
    haproxy: HAProxy
    replicas: list[Gateway]
    ports: list[int]
    metrics: list[str]
    users: Path
    key: Path
    env: dict[str, str]
    tmp: Path

    def start(self, index: int) -> Gateway:
        """Replica `index` on its port again."""
        self.replicas[index] = _start_replica(
            self.tmp, self.registry, self.users, self.metrics[index], self.env, self.ports[index]
        )
        return self.replicas[index]

    def wait_in_rotation(self, index: int) -> None:
        wait_until(lambda: self.haproxy.servers_up().get(f"g{index}") is True, 10)


def _start_replica(
    tmp: Path, registry: Registry, users: Path, metrics: str, env: dict[str, str], port: int
) -> Gateway:
    return start_gateway(tmp, registry.url, users, "--metrics-listen", metrics, env=env, port=port)


def _fleet(tmp_path: Path, challenge: str) -> Iterator[Fleet]:
    registry = start_registry(tmp_path)
    redis = start_redis(tmp_path)
    replicas: list[Gateway] = []
    haproxy = None
    try:
        users = users_with(tmp_path / "htpasswd")
        key = make_token_key(tmp_path / "token.key")
        env = {
            **redis.env(),
            "GATEWAY_CHALLENGE": challenge,
            "GATEWAY_TOKEN_KEY": str(key),
            "GATEWAY_LOCKOUT_ATTEMPTS": str(ATTEMPTS),
            "GATEWAY_TRUSTED_PROXIES": "127.0.0.1",  # HAProxy's X-Forwarded-For names the client
            "GATEWAY_RELOAD_INTERVAL": "1",
        }
        ports = [free_port() for _ in range(REPLICAS)]
        metrics = [f"127.0.0.1:{free_port()}" for _ in range(REPLICAS)]
        for index in range(REPLICAS):
            replicas.append(_start_replica(tmp_path, registry, users, metrics[index], env, ports[index]))
        haproxy = start_haproxy(tmp_path, ports, [int(address.rsplit(":", 1)[1]) for address in metrics])
        fleet = Fleet(registry, redis, haproxy, replicas, ports, metrics, users, key, env, tmp_path)
        for index in range(REPLICAS):
            fleet.wait_in_rotation(index)
        yield fleet
    finally:
        for replica in replicas:  # the fleet's list: replicas started again included
            stop(replica.process)
        if haproxy is not None:
            stop_process(haproxy.process)
        stop_process(redis.process)
        stop(registry.process)


@pytest.fixture(params=["basic", "bearer"])
def fleet(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Fleet]:
    yield from _fleet(tmp_path, request.param)


@pytest.fixture
def bearer_fleet(tmp_path: Path) -> Iterator[Fleet]:
    yield from _fleet(tmp_path, "bearer")


def _requests_served(fleet: Fleet) -> list[float]:
    return [metric(metrics, "registry_gateway_requests_total") for metrics in fleet.metrics]


def _push_and_pull_with_skopeo(
    fleet: Fleet, name: str, layer_bytes: int = 64 * 1024, retries: int = 0
) -> str:
    """Push a fresh image through HAProxy and pull it back; returns its digest."""
    layout = fleet.tmp / f"oci-{name.replace('/', '-')}"
    digest = write_image(layout, "1", layers=2, layer_bytes=layer_bytes)
    auth = write_authfile(fleet.tmp / "auth.json", fleet.haproxy.host, ADMIN)
    flags = ["--src-tls-verify=false", "--dest-tls-verify=false", "--retry-times", str(retries)]
    pushed = _skopeo(f"oci:{layout}:1", f"docker://{fleet.haproxy.host}/{name}:1", auth, *flags)
    assert pushed.returncode == 0, pushed.stderr
    back = fleet.tmp / f"back-{name.replace('/', '-')}"
    pulled = _skopeo(f"docker://{fleet.haproxy.host}/{name}:1", f"oci:{back}:1", auth, *flags)
    assert pulled.returncode == 0, pulled.stderr
    return digest


def _skopeo(src: str, dst: str, auth: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            "skopeo",
            "--insecure-policy",
            "copy",
            "--preserve-digests",
            *flags,
            "--authfile",
            str(auth),
            src,
            dst,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )


def _manifest_digest(fleet: Fleet, name: str) -> str:
    status, headers, _ = ask(
        fleet.replicas[0],
        "HEAD",
        f"/v2/{name}/manifests/1",
        headers={"Accept": "application/vnd.oci.image.manifest.v1+json"},
    )
    if fleet.env["GATEWAY_CHALLENGE"] == "basic" or status != 401:
        status, headers, _ = ask(
            fleet.replicas[0],
            "HEAD",
            f"/v2/{name}/manifests/1",
            ADMIN,
            headers={"Accept": "application/vnd.oci.image.manifest.v1+json"},
        )
    assert status == 200, status
    return headers["Docker-Content-Digest"]


def test_docker_and_skopeo_push_and_pull_through_replicas(fleet: Fleet, dockerd: Docker) -> None:
    before = _requests_served(fleet)
    digest = _push_and_pull_with_skopeo(fleet, "ha/skopeo")
    assert _stored_digest(fleet.registry, "ha/skopeo") == digest

    config = fleet.tmp / "docker-config"
    host = fleet.haproxy.host
    status, output = dockerd.cli(
        config, "login", "-u", ADMIN[0], "--password-stdin", host, stdin=ADMIN[1] + "\n"
    )
    assert status == 0, output
    name = f"{host}/ha/docker:1"
    dockerd.build_image(config, name, {f"layer{i}.bin": bytes([i]) * (40_000 + i) for i in range(3)})
    status, output = dockerd.cli(config, "push", name)
    assert status == 0, output
    dockerd.cli(config, "rmi", "-f", name)
    status, output = dockerd.cli(config, "pull", name)
    assert status == 0, output
    # Every replica took part (round robin), so a token one issued was honoured by the others.
    served = [after - was for after, was in zip(_requests_served(fleet), before, strict=True)]
    assert all(count > 0 for count in served), served

    if fleet.env["GATEWAY_CHALLENGE"] == "bearer":
        answer = ask(
            fleet.replicas[0], "GET", "/token?service=registry-gateway&scope=repository:ha/docker:pull", ADMIN
        )
        token = json.loads(answer[2])["token"]
        for replica in fleet.replicas[1:]:
            status = ask(
                replica, "GET", "/v2/ha/docker/tags/list", headers={"Authorization": f"Bearer {token}"}
            )[0]
            assert status == 200


def _stored_digest(registry: Registry, name: str) -> str:
    link = registry.storage / "docker/registry/v2/repositories" / name / "_manifests/tags/1/current/link"
    return link.read_text().strip()


def test_the_lockout_holds_across_replicas(bearer_fleet: Fleet) -> None:
    fleet = bearer_fleet
    front = Gateway(
        f"http://{fleet.haproxy.host}", fleet.haproxy.host, fleet.haproxy.process, fleet.haproxy.log
    )
    checks = sum(metric(metrics, "registry_gateway_password_checks_total") for metrics in fleet.metrics)
    statuses = [ask(front, "GET", "/v2/", ("alice", f"guess-{n}"))[0] for n in range(3 * ATTEMPTS)]
    assert statuses[:ATTEMPTS] == [401] * ATTEMPTS and set(statuses[ATTEMPTS:]) == {429}, statuses
    after = sum(metric(metrics, "registry_gateway_password_checks_total") for metrics in fleet.metrics)
    assert after - checks == ATTEMPTS
    # Every replica refuses the pair, the right password included; the registry saw none of it.
    for replica in fleet.replicas:
        assert ask(replica, "GET", "/v2/", ("alice", USERS["alice"]))[0] == 429
    assert ask(front, "GET", "/v2/", ("alice", USERS["alice"]), source="127.0.0.2")[0] == 200


def test_revoke_and_passwd_reach_every_replica(bearer_fleet: Fleet) -> None:
    fleet = bearer_fleet
    answer = ask(fleet.replicas[0], "GET", "/token?service=registry-gateway", ADMIN)
    bearer = {"Authorization": f"Bearer {json.loads(answer[2])['token']}"}
    assert all(ask(replica, "GET", "/v2/", headers=bearer)[0] == 200 for replica in fleet.replicas)
    revoked = subprocess.run(
        [sys.executable, "-m", "gateway", "token", "revoke", "admin"],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", **fleet.redis.env()},
    )
    assert revoked.returncode == 0, revoked.stderr
    started = time.monotonic()
    for replica in fleet.replicas:
        wait_until(lambda replica=replica: ask(replica, "GET", "/v2/", headers=bearer)[0] == 401, 2.0)  # type: ignore[misc]
    assert time.monotonic() - started < 2.0

    # A new password in the shared htpasswd file: the old one is refused everywhere soon after.
    assert all(ask(replica, "GET", "/v2/", ("alice", USERS["alice"]))[0] == 200 for replica in fleet.replicas)
    changed = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway",
            "user",
            "passwd",
            "alice",
            "--password-stdin",
            "--file",
            str(fleet.users),
        ],
        input="alice-new-password\n",
        capture_output=True,
        text=True,
    )
    assert changed.returncode == 0, changed.stderr
    for replica in fleet.replicas:  # reload_interval 1 s, then one bcrypt check
        wait_until(
            lambda replica=replica: (
                ask(replica, "GET", "/v2/", ("alice", USERS["alice"]), source="127.0.0.3")[0] == 401
            ),  # type: ignore[misc]
            2.5,
        )
        assert ask(replica, "GET", "/v2/", ("alice", "alice-new-password"), source="127.0.0.3")[0] == 200


@dataclass
class Traffic:
    """Pushes and pulls through HAProxy, one after another, until stopped; every outcome kept."""

    fleet: Fleet
    outcomes: list[tuple[str, int, str]] = field(default_factory=list)
    stopping: threading.Event = field(default_factory=threading.Event)

    def run(self, kind: str) -> None:
        fleet = self.fleet
        auth = write_authfile(fleet.tmp / f"auth-{kind}.json", fleet.haproxy.host, ADMIN)
        flags = ["--src-tls-verify=false", "--dest-tls-verify=false", "--retry-times", "0"]
        layout = fleet.tmp / f"traffic-{kind}"
        write_image(layout, "1", layers=2, layer_bytes=256 * 1024)
        serial = 0
        while not self.stopping.is_set():
            serial += 1
            if kind == "push":
                done = _skopeo(
                    f"oci:{layout}:1", f"docker://{fleet.haproxy.host}/ha/rolling:{serial}", auth, *flags
                )
            else:
                target = fleet.tmp / f"pulled-{serial % 2}"
                done = _skopeo(f"docker://{fleet.haproxy.host}/ha/base:1", f"oci:{target}:1", auth, *flags)
            self.outcomes.append((kind, done.returncode, done.stderr[-500:]))


def test_a_rolling_restart_fails_no_transfer(bearer_fleet: Fleet) -> None:
    fleet = bearer_fleet
    _push_and_pull_with_skopeo(fleet, "ha/base")
    traffic = Traffic(fleet)
    threads = [threading.Thread(target=traffic.run, args=(kind,)) for kind in ("push", "pull")]
    for thread in threads:
        thread.start()
    try:
        wait_until(lambda: len(traffic.outcomes) >= 2, 60)
        for index in range(REPLICAS):
            done_before = len(traffic.outcomes)
            # SIGTERM alone, not even a drain first: the gateway stops accepting and finishes
            # what it holds; HAProxy retries a refused connection on another replica.
            replica = fleet.replicas[index]
            replica.process.send_signal(signal.SIGTERM)
            assert replica.process.wait(timeout=60) == 0
            fleet.start(index)
            fleet.wait_in_rotation(index)
            wait_until(lambda done_before=done_before: len(traffic.outcomes) >= done_before + 2, 60)  # type: ignore[misc]
    finally:
        traffic.stopping.set()
        for thread in threads:
            thread.join(timeout=120)
    failed = [outcome for outcome in traffic.outcomes if outcome[1] != 0]
    assert not failed, failed
    kinds = {outcome[0] for outcome in traffic.outcomes}
    assert kinds == {"push", "pull"} and len(traffic.outcomes) >= 2 + 2 * REPLICAS


def test_a_replica_killed_mid_push_fails_only_what_it_held(bearer_fleet: Fleet) -> None:
    fleet = bearer_fleet
    layout = fleet.tmp / "big"
    digest = write_image(layout, "1", layers=1, layer_bytes=48 * 1024 * 1024)
    auth = write_authfile(fleet.tmp / "auth.json", fleet.haproxy.host, ADMIN)
    flags = ["--src-tls-verify=false", "--dest-tls-verify=false", "--retry-times", "0"]
    push = subprocess.Popen(
        ["skopeo", "--insecure-policy", "copy", "--preserve-digests", *flags, "--authfile", str(auth),
         f"oci:{layout}:1", f"docker://{fleet.haproxy.host}/ha/big:1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        # The replica with a request in flight is the one holding the upload.
        holder: list[int] = []

        def someone_holds_it() -> bool:
            for index, metrics in enumerate(fleet.metrics):
                if metric(metrics, "registry_gateway_in_flight_requests") > 0:
                    holder.append(index)
                    return True
            return push.poll() is not None

        wait_until(someone_holds_it, 60)
        assert holder, "the push ended before any replica was seen holding it"
        fleet.replicas[holder[0]].process.send_signal(signal.SIGKILL)
        fleet.replicas[holder[0]].process.wait()
        push.communicate(timeout=300)
    finally:
        if push.poll() is None:
            push.kill()
            push.communicate()
    # The others serve at once (HAProxy retries what found no replica, and marks it down).
    front = Gateway(
        f"http://{fleet.haproxy.host}", fleet.haproxy.host, fleet.haproxy.process, fleet.haproxy.log
    )
    assert [ask(front, "GET", "/v2/", ADMIN)[0] for _ in range(6)] == [200] * 6
    # The client's retry succeeds, and the registry holds the image.
    again = _skopeo(f"oci:{layout}:1", f"docker://{fleet.haproxy.host}/ha/big:1", auth, *flags)
    assert again.returncode == 0, again.stderr
    assert _stored_digest(fleet.registry, "ha/big") == digest
    # The killed replica started again rejoins.
    fleet.start(holder[0])
    fleet.wait_in_rotation(holder[0])
