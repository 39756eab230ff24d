"""Attacks on the shared state (issue 27) with Debian's redis-server, the real registry and real
gateway processes: a gateway that was away from Redis when a pair was locked must still refuse
that pair's cached login when it is back (else the right password gets 200 and a wrong one 429:
an oracle); a Redis the gateway never reaches (a wrong password) is said in its log; and the
metrics process answers /healthz within a liveness probe's timeout while one worker hangs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import (
    Registry,
    free_port,
    require,
    start_gateway,
    stop,
    users_with,
    wait_until,
)
from tests.services import Redis, start_redis, stop_process
from tests.test_guards import DAVE, ask

ATTEMPTS = 4


def _readyz(metrics: str) -> dict[str, str]:
    try:
        with urllib.request.urlopen(f"http://{metrics}/readyz", timeout=10) as response:
            answer: dict[str, str] = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        answer = json.loads(exc.read())
    return answer


def _redis_cli(redis: Redis, *command: str) -> str:
    """A command as Redis's default user; the password through the environment, not argv."""
    done = subprocess.run(
        [require("redis-cli"), "-p", str(redis.port), *command],
        capture_output=True,
        text=True,
        check=True,
        env={"PATH": "/usr/bin:/bin", "REDISCLI_AUTH": redis.password_file.read_text().strip()},
    )
    return done.stdout.strip()


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[Redis]:
    started = start_redis(tmp_path)
    try:
        yield started
    finally:
        stop_process(started.process)


def test_a_gateway_away_when_a_pair_was_locked_refuses_its_cached_login_once_back(
    tmp_path: Path, registry: Registry, redis: Redis
) -> None:
    users = users_with(tmp_path / "htpasswd", DAVE)
    # `late` reaches Redis as an ACL user of its own, which the test turns off and on: that
    # gateway alone is cut from Redis while the other one locks the pair.
    late_password = tmp_path / "late-password"
    late_password.write_text("late-replica-password-0123\n")
    _redis_cli(
        redis, "ACL", "SETUSER", "late", "on", ">late-replica-password-0123",
        "~registry-gateway:*", "&registry-gateway:*", "+@all",
    )  # fmt: skip
    settings = {"GATEWAY_LOCKOUT_ATTEMPTS": str(ATTEMPTS)}
    late_metrics = f"127.0.0.1:{free_port()}"
    early = start_gateway(tmp_path, registry.url, users, env={**redis.env(), **settings})
    late = None
    try:
        late = start_gateway(
            tmp_path,
            registry.url,
            users,
            "--metrics-listen",
            late_metrics,
            env={
                "GATEWAY_REDIS_URL": f"redis://late@127.0.0.1:{redis.port}/0",
                "GATEWAY_REDIS_PASSWORD_FILE": str(late_password),
                **settings,
            },
        )
        wait_until(lambda: _readyz(late_metrics).get("redis") == "ok")
        assert ask(late, "GET", "/v2/", DAVE)[0] == 200  # Dave's right password, cached there

        _redis_cli(redis, "ACL", "SETUSER", "late", "off")
        _redis_cli(redis, "CLIENT", "KILL", "USER", "late")
        wait_until(lambda: _readyz(late_metrics).get("redis") != "ok")
        guesses = [ask(early, "GET", "/v2/", (DAVE[0], f"guess-{n}"))[0] for n in range(ATTEMPTS + 1)]
        assert guesses == [401] * ATTEMPTS + [429]  # locked in Redis, announced while `late` was away

        _redis_cli(redis, "ACL", "SETUSER", "late", "on")
        wait_until(lambda: _readyz(late_metrics).get("redis") == "ok")
        # Back, it refuses the pair before its cached login, as a gateway that heard the
        # announcement does: the right password is not told from a wrong one.
        status, headers, _ = ask(late, "GET", "/v2/", DAVE)
        assert status == 429 and int(headers["Retry-After"]) > 0
        assert ask(late, "GET", "/v2/", (DAVE[0], "another-guess"))[0] == 429
        assert ask(late, "GET", "/v2/", DAVE, source="127.0.0.2")[0] == 200  # another address
    finally:
        stop(early.process)
        if late is not None:
            stop(late.process)


def test_a_redis_never_reached_is_said_in_the_log_once(
    tmp_path: Path, registry: Registry, redis: Redis
) -> None:
    users = users_with(tmp_path / "htpasswd", DAVE)
    wrong = tmp_path / "wrong-redis-password"
    wrong.write_text("not-the-redis-password-0123\n")
    metrics = f"127.0.0.1:{free_port()}"
    gateway = start_gateway(
        tmp_path,
        registry.url,
        users,
        "--metrics-listen",
        metrics,
        env={"GATEWAY_REDIS_URL": redis.url, "GATEWAY_REDIS_PASSWORD_FILE": str(wrong)},
    )
    try:
        assert ask(gateway, "GET", "/v2/", DAVE)[0] == 200  # it serves, counting on its own
        wait_until(lambda: "AuthenticationError" in _readyz(metrics).get("redis", ""))
        time.sleep(2.0)  # four more tries to reach Redis, each failing the same way
        log = gateway.log.read_text()
        said = [line for line in log.splitlines() if "unreachable (AuthenticationError" in line]
        assert len(said) == 1, log  # said, and not at every try
        assert f"Redis at {redis.url} unreachable" in said[0]
        assert "not-the-redis-password" not in log
        assert "Warning" not in log  # redis-py's UserWarning about a synchronous Retry
    finally:
        stop(gateway.process)


def _listening_process(candidates: list[int], port: int) -> int:
    """Which of `candidates` (our own processes) listens on the loopback TCP `port`."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1].endswith(f":{port:04X}") and fields[3] == "0A":  # LISTEN
            inodes.add(fields[9])
    for pid in candidates:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in inodes:
                return pid
    raise AssertionError(f"no process of {candidates} listens on {port}")


def test_healthz_answers_within_a_probe_timeout_while_a_worker_hangs(
    tmp_path: Path, registry: Registry, users_file: Path
) -> None:
    port = free_port()
    metrics = f"127.0.0.1:{port}"
    gateway = start_gateway(tmp_path, registry.url, users_file, "--workers", "2", "--metrics-listen", metrics)
    hung = None
    try:
        wait_until(lambda: _readyz(metrics).get("status") == "ok", 20)
        pid = gateway.process.pid
        children = [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
        hub = _listening_process(children, port)
        hung = next(child for child in children if child != hub)
        os.kill(hung, signal.SIGSTOP)
        started = time.monotonic()
        with urllib.request.urlopen(f"http://{metrics}/healthz", timeout=10) as response:
            status, answer = response.status, json.loads(response.read())
        took = time.monotonic() - started
        # deploy/kubernetes gives the liveness probe 3 s: one hung worker must not make the
        # whole gateway miss it (the other worker serves).
        assert status == 200 and answer["workers"] == "1 of 2 answer"
        assert took < 2.0, took
        # (No request to the listener here: SO_REUSEPORT keeps handing the stopped worker its
        # share of new connections, which then wait; a request may land there.)
    finally:
        if hung is not None:
            os.kill(hung, signal.SIGCONT)
        stop(gateway.process)
