"""State shared through Redis (redis_url), with Debian's redis-server, the real registry and two
gateway processes: the lockout counts every guess once whichever gateway sees it, a pair locked
on one is locked on the other (its cached logins included), revocations reach every gateway at
once, and with Redis stopped mid-run nothing gets a 5xx, each gateway counts on its own and says
so, and counting is shared again once Redis returns."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import (
    USERS,
    Gateway,
    Registry,
    free_port,
    get_json,
    make_token_key,
    metric,
    start_gateway,
    start_registry,
    stop,
    users_with,
    wait_until,
)
from tests.services import Redis, restart_redis, start_redis, stop_process
from tests.test_guards import DAVE, ask

ATTEMPTS = 4


@dataclass
class Pair:
    """Two gateways sharing one Redis, one signing key, one htpasswd file and one registry."""

    registry: Registry
    redis: Redis
    gateways: list[Gateway]
    metrics: list[str]
    users: Path
    key: Path
    tmp: Path


def readyz(metrics: str) -> tuple[int, dict[str, str]]:
    found: tuple[int, dict[str, str]] = get_json(metrics, "/readyz")
    return found


def checks(pair: Pair) -> float:
    return sum(metric(metrics, "registry_gateway_password_checks_total") for metrics in pair.metrics)


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[Pair]:
    registry = start_registry(tmp_path)
    redis = start_redis(tmp_path)
    gateways: list[Gateway] = []
    made_pair = None
    try:
        users = users_with(tmp_path / "htpasswd", DAVE)
        key = make_token_key(tmp_path / "token.key")
        metrics = [f"127.0.0.1:{free_port()}" for _ in range(2)]
        for address in metrics:
            gateways.append(
                start_gateway(
                    tmp_path,
                    registry.url,
                    users,
                    "--metrics-listen",
                    address,
                    env={
                        **redis.env(),
                        "GATEWAY_CHALLENGE": "bearer",
                        "GATEWAY_TOKEN_KEY": str(key),
                        "GATEWAY_LOCKOUT_ATTEMPTS": str(ATTEMPTS),
                    },
                )
            )
        for address in metrics:
            wait_until(lambda address=address: readyz(address)[1].get("redis") == "ok")  # type: ignore[misc]
        made_pair = Pair(registry, redis, gateways, metrics, users, key, tmp_path)
        yield made_pair
    finally:
        for gateway in gateways:
            stop(gateway.process)
        stop_process(redis.process)
        if made_pair is not None:
            stop_process(made_pair.redis.process)  # started again by the test
        stop(registry.process)


def test_guesses_spread_over_gateways_get_lockout_attempts_checks_in_all(pair: Pair) -> None:
    one, other = pair.gateways
    # Dave logs in on `other` first: his right password is in its login cache.
    assert ask(other, "GET", "/v2/", DAVE)[0] == 200
    before = checks(pair)
    statuses = [ask(pair.gateways[n % 2], "GET", "/v2/", (DAVE[0], f"guess-{n}"))[0] for n in range(10)]
    assert statuses[:ATTEMPTS] == [401] * ATTEMPTS
    assert set(statuses[ATTEMPTS:]) == {429}
    assert checks(pair) - before == ATTEMPTS
    # Locked on both, whatever is sent: the right password cached on `other` is no oracle.
    for gateway in (one, other):
        status, headers, _ = ask(gateway, "GET", "/v2/", DAVE)
        assert status == 429 and int(headers["Retry-After"]) > 0
    # Another address is not affected.
    assert ask(one, "GET", "/v2/", DAVE, source="127.0.0.2")[0] == 200
    # Nothing of the pair in Redis names the user, the address or a password.
    dump = _redis_cli(pair, "--scan")
    assert "registry-gateway:lockout:" in dump
    assert "dave" not in dump and "127.0.0.1" not in dump
    # The last wrong password's fingerprint lives REPEAT_WINDOW seconds at most, not the window.
    for key in dump.split():
        if key.endswith(":attempt"):
            assert 0 < int(_redis_cli(pair, "PTTL", key)) <= 10_000
        elif key.startswith("registry-gateway:lockout:"):
            assert "attempt" not in _redis_cli(pair, "HKEYS", key)


def test_a_revocation_reaches_every_gateway_at_once(pair: Pair) -> None:
    one, other = pair.gateways
    token = _token(one, DAVE)
    bearer = {"Authorization": f"Bearer {token}"}
    assert ask(other, "GET", "/v2/", headers=bearer)[0] == 200  # signed by one, accepted by the other
    revoked = subprocess.run(
        [sys.executable, "-m", "gateway", "token", "revoke", "dave"],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", **pair.redis.env()},
    )
    assert revoked.returncode == 0, revoked.stderr
    assert "Redis" in revoked.stdout
    for gateway in (one, other):  # applied as the announcement arrives: no reload interval
        wait_until(lambda gateway=gateway: ask(gateway, "GET", "/v2/", headers=bearer)[0] == 401, 2.0)  # type: ignore[misc]
    # A token issued after the command returned works everywhere.
    fresh = {"Authorization": f"Bearer {_token(other, DAVE)}"}
    assert [ask(gateway, "GET", "/v2/", headers=fresh)[0] for gateway in (one, other)] == [200, 200]
    # A gateway started later learns the revocation from Redis.
    late = start_gateway(
        pair.tmp,
        pair.registry.url,
        pair.users,
        env={**pair.redis.env(), "GATEWAY_CHALLENGE": "bearer", "GATEWAY_TOKEN_KEY": str(pair.key)},
    )
    try:
        wait_until(lambda: ask(late, "GET", "/v2/", headers=bearer)[0] == 401, 5.0)
        assert ask(late, "GET", "/v2/", headers=fresh)[0] == 200
    finally:
        stop(late.process)


def test_with_redis_gone_each_gateway_counts_alone_then_shares_again(pair: Pair) -> None:
    one, other = pair.gateways
    stop_process(pair.redis.process)
    # No 5xx: logins, pulls and the token endpoint go on.
    assert ask(one, "GET", "/v2/", USERS_ADMIN)[0] == 200
    assert ask(other, "GET", "/v2/", USERS_ADMIN)[0] == 200
    for metrics in pair.metrics:
        wait_until(lambda metrics=metrics: metric(metrics, "registry_gateway_redis_up") == 0)  # type: ignore[misc]
        status, body = readyz(metrics)
        assert status == 200 and body["redis"].startswith("unreachable since"), body
        assert "on this host only" in body["redis"]
    for gateway in pair.gateways:
        assert "unreachable" in gateway.log.read_text()
    # The lockout still counts: on this one host, both gateways share the table of... each
    # process (these two gateways are separate processes, as replicas are), so each locks alone.
    before = checks(pair)
    statuses = [ask(one, "GET", "/v2/", (DAVE[0], f"alone-{n}"))[0] for n in range(ATTEMPTS + 2)]
    assert statuses == [401] * ATTEMPTS + [429, 429]
    assert [s < 500 for s in (ask(other, "GET", "/v2/", (DAVE[0], "x"))[0],)] == [True]
    assert checks(pair) - before == ATTEMPTS + 1

    pair.redis = restart_redis(pair.tmp, pair.redis)
    for metrics in pair.metrics:
        wait_until(lambda metrics=metrics: readyz(metrics)[1].get("redis") == "ok")  # type: ignore[misc]
        assert metric(metrics, "registry_gateway_redis_up") == 1
    assert "answers again" in one.log.read_text()
    # What `one` counted while Redis was away reached Redis: `other` refuses the pair too.
    wait_until(lambda: ask(other, "GET", "/v2/", (DAVE[0], "after"))[0] == 429, 5.0)
    # Shared again: another user's guesses spread over both lock after ATTEMPTS in all.
    before = checks(pair)
    spread = [ask(pair.gateways[n % 2], "GET", "/v2/", ("alice", f"g-{n}"))[0] for n in range(ATTEMPTS + 2)]
    assert spread == [401] * ATTEMPTS + [429, 429]
    assert checks(pair) - before == ATTEMPTS


USERS_ADMIN = ("admin", USERS["admin"])


def _redis_cli(pair: Pair, *command: str) -> str:
    """redis-cli on the test's Redis; the password from the environment, not argv."""
    password = pair.redis.password_file.read_text().strip()
    return subprocess.run(
        ["redis-cli", "-p", str(pair.redis.port), *command],
        capture_output=True,
        text=True,
        check=True,
        env={"PATH": "/usr/bin:/bin", "REDISCLI_AUTH": password},
    ).stdout


def _token(gateway: Gateway, credentials: tuple[str, str]) -> str:
    status, _, body = ask(
        gateway, "GET", "/token?service=registry-gateway&scope=repository:x:pull", credentials
    )
    assert status == 200, body
    token: str = json.loads(body)["token"]
    return token


def test_revocations_outlive_a_redis_that_lost_its_data(pair: Pair) -> None:
    """Redis started again empty (no persistence): the gateways write back what they knew, so
    the revocation still holds, for them and for a gateway that joins later."""
    one, other = pair.gateways
    bearer = {"Authorization": f"Bearer {_token(one, DAVE)}"}
    revoked = subprocess.run(
        [sys.executable, "-m", "gateway", "token", "revoke", "dave"],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", **pair.redis.env()},
    )
    assert revoked.returncode == 0, revoked.stderr
    for gateway in (one, other):
        wait_until(lambda gateway=gateway: ask(gateway, "GET", "/v2/", headers=bearer)[0] == 401, 2.0)  # type: ignore[misc]
    stop_process(pair.redis.process)
    pair.redis = restart_redis(pair.tmp, pair.redis)
    for metrics in pair.metrics:
        wait_until(lambda metrics=metrics: readyz(metrics)[1].get("redis") == "ok")  # type: ignore[misc]
    assert [ask(gateway, "GET", "/v2/", headers=bearer)[0] for gateway in (one, other)] == [401, 401]
    assert "written back" in one.log.read_text() + other.log.read_text()
    late = start_gateway(
        pair.tmp,
        pair.registry.url,
        pair.users,
        env={**pair.redis.env(), "GATEWAY_CHALLENGE": "bearer", "GATEWAY_TOKEN_KEY": str(pair.key)},
    )
    try:
        wait_until(lambda: ask(late, "GET", "/v2/", headers=bearer)[0] == 401, 5.0)
    finally:
        stop(late.process)
