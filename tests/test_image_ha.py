"""compose.ha.yml, built and run as operators run it: HAProxy in front of three gateways sharing
one Redis and one registry. Through HAProxy's published port: the docker CLI logs in, pushes and
pulls; the gateways see each client's own address (HAProxy's X-Forwarded-For, believed from
HAProxy only); guesses spread over the three get `lockout_attempts` password checks in all; a
revocation reaches every gateway at once; with Redis stopped pulls go on and `/readyz` says so,
and once it is back every gateway shares again.

`haproxy:2.6` and `redis:7` are used when present or pullable; otherwise (no Docker Hub here)
tests/standins/Dockerfile builds stand-ins from Debian's haproxy and redis-server, laid out as the
official images are. Marked `image`, like tests/test_image.py, whose fixtures this reuses.
"""

from __future__ import annotations

import functools
import json
import os
import random
import re
import secrets
import shutil
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import free_port, htpasswd_add, http_request, make_token_key, wait_until
from tests.dockerd import Docker
from tests.image_build import ROOT
from tests.test_image import (
    PASSWORDS,
    basic,
    compose,
    push_and_pull_with_the_docker_cli,
    up_and_answering,
)
from tests.test_shared_state import readyz

pytestmark = pytest.mark.image

STANDINS = ROOT / "tests" / "standins"
LOCKOUT_ATTEMPTS = 10  # the default, which compose.ha.yml keeps
GATEWAYS = ("gateway1", "gateway2", "gateway3")
FILE = "compose.ha.yml"


@pytest.fixture(scope="module")
def ha_images(image: Docker) -> Docker:
    """`haproxy:2.6` and `redis:7` in the tests' daemon, beside the gateway's image."""
    config = image.root / "image-config"
    for tag, stand_in in (("haproxy:2.6", "haproxy"), ("redis:7", "redis")):
        if image.run(config, "image", "inspect", tag).returncode == 0:
            continue
        if image.run(config, "pull", tag, timeout=120).returncode == 0:
            continue
        # --network host: apt-get in RUN has no network otherwise on a daemon with --bridge=none.
        built = image.run(
            config, "build", "--network", "host", "--target", stand_in, "-t", tag, str(STANDINS), timeout=600
        )
        assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    return image


def project_folder(port: int, network: str) -> Path:
    """compose.ha.yml and the config/ folder its comments ask for, as an operator makes them;
    HAProxy published on 127.0.0.1:`port`, the project's network moved to `network` (so that it
    meets no other test's), and tokens on (GATEWAY_CHALLENGE: bearer, uncommented) to prove the
    shared signing key too."""
    project = Path(tempfile.mkdtemp(prefix="gw-ha-"))
    project.chmod(0o755)
    text = (ROOT / FILE).read_text()
    for original, replacement in (
        ('"8080:8080"', f'"127.0.0.1:{port}:8080"'),
        ("# GATEWAY_CHALLENGE: bearer", "GATEWAY_CHALLENGE: bearer"),
        ("# GATEWAY_TOKEN_KEY:", "GATEWAY_TOKEN_KEY:"),
        ("10.89.27.", network),
    ):
        assert original in text, original
        text = text.replace(original, replacement)
    (project / FILE).write_text(text)
    folder = project / "config"
    folder.mkdir(mode=0o755)
    shutil.copy(ROOT / "config" / "haproxy.cfg", folder / "haproxy.cfg")
    for user, password in PASSWORDS.items():
        htpasswd_add(folder / "htpasswd", user, password)
    (folder / "htpasswd").chmod(0o644)
    (folder / "redis-password").write_text(secrets.token_hex(32) + "\n")
    (folder / "metrics-token").write_text(secrets.token_hex(32) + "\n")
    make_token_key(folder / "token.key")
    for secret in ("redis-password", "metrics-token", "token.key"):
        os.chown(folder / secret, 10001, 10001)  # the gateways' uid, as the comments say
        (folder / secret).chmod(0o600)
    return project


def password_checks(metrics: list[str], token: str) -> float:
    """registry_gateway_password_checks_total summed over the gateways."""
    total = 0.0
    for address in metrics:
        request = urllib.request.Request(
            f"http://{address}/metrics", headers={"Authorization": f"Bearer {token}"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            text = response.read().decode()
        match = re.search(r"^registry_gateway_password_checks_total (\S+)$", text, re.M)
        assert match is not None, text[:2000]
        total += float(match.group(1))
    return total


def ready_and_sharing(address: str) -> bool:
    status, body = readyz(address)
    return status == 200 and body.get("redis") == "ok"


def ready_without_redis(address: str) -> bool:
    status, body = readyz(address)
    return status == 200 and body.get("redis", "").startswith("unreachable since")


def eventually(condition: Callable[[], bool], timeout: float) -> None:
    """wait_until for conditions that may raise OSError while a container (re)starts."""

    def holds() -> bool:
        try:
            return condition()
        except OSError:
            return False

    wait_until(holds, timeout)


def test_three_gateways_behind_haproxy_share_lockout_and_revocations_and_ride_out_redis(
    ha_images: Docker, tmp_path: Path
) -> None:
    docker = ha_images
    config = tmp_path / "docker-config"
    port = free_port()
    host = f"127.0.0.1:{port}"
    network = f"10.{random.randint(100, 250)}.{random.randint(0, 255)}."
    project = project_folder(port, network)
    metrics_token = (project / "config" / "metrics-token").read_text().strip()
    name = f"gwha{secrets.token_hex(3)}"
    run = functools.partial(compose, docker, config, project, name, file=FILE)
    try:
        up_and_answering(docker, config, project, name, host, file=FILE)
        # Each gateway's metrics_listen, at its address on the project's network (the host has
        # one on that network's bridge).
        metrics = []
        for service in GATEWAYS:
            container = run("ps", "-q", service).stdout.strip()
            address = docker.run(
                config,
                "inspect",
                "--format",
                "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
                container,
            ).stdout.strip()
            assert address.startswith(network), address
            metrics.append(f"{address}:9090")
        for address in metrics:
            eventually(functools.partial(ready_and_sharing, address), 60)

        tag = push_and_pull_with_the_docker_cli(docker, config, host)

        # The gateways that served it saw the client's own address (what HAProxy saw:
        # docker's userland proxy, the network's .1), never HAProxy's.
        seen: set[str] = set()
        for service in GATEWAYS:
            records = [
                json.loads(line.partition("|")[2])
                for line in run("logs", "--no-color", service).stdout.splitlines()
                if line.partition("|")[2].strip().startswith("{")
            ]
            clients = {record["client"] for record in records if record.get("user") == "admin"}
            # HAProxy may keep docker's kept-alive connection on fewer than three gateways: each
            # saw the client's address if anything, and never HAProxy's.
            assert clients <= {network + "1"}, (service, clients)
            seen |= clients
        assert seen == {network + "1"}

        # Guesses spread over the three (round robin), each with a made-up X-Forwarded-For that
        # HAProxy passes on: lockout_attempts checks in all, then 429 on every gateway, the right
        # password included.
        before = password_checks(metrics, metrics_token)
        statuses = [
            http_request(
                host, "GET", "/v2/", ("alice", f"guess-{n}"), headers={"X-Forwarded-For": f"192.0.2.{n}"}
            )[0]
            for n in range(3 * LOCKOUT_ATTEMPTS)
        ]
        assert statuses == [401] * LOCKOUT_ATTEMPTS + [429] * (2 * LOCKOUT_ATTEMPTS)
        assert password_checks(metrics, metrics_token) - before == LOCKOUT_ATTEMPTS
        assert {http_request(host, "GET", "/v2/", basic("alice"))[0] for _ in GATEWAYS} == {429}
        assert {http_request(host, "GET", "/v2/", basic("admin"))[0] for _ in GATEWAYS} == {200}

        # `registry-gateway token revoke` in one container reaches all three at once.
        status, _, body = http_request(
            host, "GET", "/token?service=registry-gateway&scope=repository:library/app:pull", basic("admin")
        )
        assert status == 200, body
        bearer = {"Authorization": f"Bearer {json.loads(body)['token']}"}
        assert [http_request(host, "GET", "/v2/", headers=bearer)[0] for _ in GATEWAYS] == [200] * 3
        revoked = run("exec", "-T", "gateway2", "registry-gateway", "token", "revoke", "admin")
        assert revoked.returncode == 0, revoked.stdout + revoked.stderr

        def refused_everywhere() -> bool:
            return [http_request(host, "GET", "/v2/", headers=bearer)[0] for _ in GATEWAYS] == [401] * 3

        eventually(refused_everywhere, 2)  # the announcement, not a reload interval

        # Redis stopped: pulls go on (a new login, a new token), /readyz stays 200 and says why
        # failed logins are counted per gateway meanwhile.
        stopped = run("stop", "redis")
        assert stopped.returncode == 0, stopped.stderr
        for address in metrics:
            eventually(functools.partial(ready_without_redis, address), 30)
        # Every request is answered, for longer than the registry's connect timeout: Redis's name
        # no longer resolving (Docker's DNS takes seconds to say so) once starved the gateways'
        # own lookups of the registry's name, and they answered 504 after 10 s.
        watched_until = time.monotonic() + 12
        while time.monotonic() < watched_until:
            assert http_request(host, "GET", "/v2/", basic("admin"))[0] == 200
            time.sleep(0.25)
        cli = functools.partial(docker.cli, config)
        assert cli("login", "-u", "admin", "--password-stdin", host, stdin=PASSWORDS["admin"])[0] == 0
        assert cli("rmi", tag)[0] == 0
        status, output = cli("pull", tag)
        assert status == 0, output

        started = run("start", "redis")
        assert started.returncode == 0, started.stderr
        for address in metrics:
            eventually(functools.partial(ready_and_sharing, address), 60)
        # Redis kept the revocation across its restart (append-only file on its volume), and
        # alice is still locked out everywhere.
        kept = run(
            "exec", "-T", "redis", "sh", "-c",
            'REDISCLI_AUTH="$(head -n 1 /run/redis-password)" redis-cli hkeys registry-gateway:revocations',
        )  # fmt: skip
        assert kept.stdout.split() == ["admin"], kept.stdout + kept.stderr
        assert [http_request(host, "GET", "/v2/", headers=bearer)[0] for _ in GATEWAYS] == [401] * 3
        assert {http_request(host, "GET", "/v2/", basic("alice"))[0] for _ in GATEWAYS} == {429}
        logs = run("logs", "--no-color")
        assert "Traceback" not in logs.stdout + logs.stderr
    finally:
        run("down", "-v")
        shutil.rmtree(project, ignore_errors=True)
