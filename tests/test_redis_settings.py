"""The Redis settings: bad ones refused at start-up with every problem named by its key (never a
traceback), `check-config` saying whether Redis answers and takes the password, and `serve`
starting without Redis (it counts locally and says so), with the real redis-server."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gateway import config
from tests.conftest import Registry, free_port, make_token_key, metric, start_gateway, stop, wait_until
from tests.services import start_redis, stop_process


@pytest.mark.parametrize(
    ("values", "problem"),
    [
        ({"redis_url": "http://redis:6379"}, "redis_url: expected a redis:// or rediss:// (TLS) URL"),
        ({"redis_url": "redis://:secret@redis:6379"}, "redis_url: must not carry the password"),
        ({"redis_url": "redis://redis:6379/zero"}, "redis_url: the path is the database number"),
        ({"redis_url": "redis://redis:6379/0?ssl=1"}, "redis_url: must be scheme://"),
        ({"redis_password_file": "/nonexistent"}, "redis_password_file: only used with redis_url"),
        ({"redis_url": "redis://redis:6379", "redis_ca_file": "/x.pem"}, "redis_ca_file: only used with a"),
        ({"redis_url": "redis://r", "redis_password_file": "{tmp}/missing"}, "redis_password_file: no"),
        ({"redis_url": "redis://r", "redis_password_file": "{tmp}/empty"}, "redis_password_file: empty"),
        ({"redis_url": "redis://ci@r"}, "redis_password_file: needed when redis_url names a user"),
        ({"redis_url": "rediss://r", "redis_ca_file": "{tmp}/empty"}, "redis_ca_file: no PEM certificate"),
    ],
)  # fmt: skip
def test_bad_redis_settings_are_refused_by_key(
    tmp_path: Path, users_file: Path, values: dict[str, str], problem: str
) -> None:
    (tmp_path / "empty").write_text("\n")
    given = {key: value.replace("{tmp}", str(tmp_path)) for key, value in values.items()}
    with pytest.raises(config.ConfigError) as refused:
        config.load(None, {}, {"htpasswd": str(users_file), **given})
    key, _, message = problem.partition(": ")
    problems = refused.value.problems
    assert any(line.startswith(key) and message in line for line in problems), problems
    assert not any("redis-secret" in line for line in problems)


def test_good_redis_settings(tmp_path: Path, users_file: Path) -> None:
    (tmp_path / "password").write_text("redis-secret\n")
    ca = str(make_token_key(tmp_path / "ca.key").with_suffix(".crt"))  # a self-signed certificate
    settings = config.load(
        None,
        {"GATEWAY_REDIS_URL": "rediss://gateway@redis.internal:6380/2"},
        {
            "htpasswd": str(users_file),
            "redis_password_file": str(tmp_path / "password"),
            "redis_ca_file": str(ca),
        },
    )
    assert settings.redis_url is not None and settings.redis_url.port == 6380


def _check_config(users: Path, upstream: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", "check-config", "--htpasswd", str(users), "--upstream", upstream],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", **env},
        timeout=60,
    )


def test_check_config_tries_redis(tmp_path: Path, users_file: Path, registry: Registry) -> None:
    redis = start_redis(tmp_path)
    try:
        done = _check_config(users_file, registry.url, redis.env())
        assert done.returncode == 0, done.stderr
        assert "Redis answers" in done.stdout
        wrong = tmp_path / "wrong-password"
        wrong.write_text("not-the-password\n")
        done = _check_config(
            users_file, registry.url, {**redis.env(), "GATEWAY_REDIS_PASSWORD_FILE": str(wrong)}
        )
        assert done.returncode == 1
        assert "redis_url: Redis at" in done.stderr and "refused" in done.stderr
        assert "not-the-password" not in done.stderr + done.stdout
        assert "Traceback" not in done.stderr
    finally:
        stop_process(redis.process)
    # Gone: a warning, not a failure (gateways start and count locally).
    done = _check_config(users_file, registry.url, redis.env())
    assert done.returncode == 0, done.stderr
    assert "warning: Redis at" in done.stderr and "does not answer" in done.stderr


def test_serve_starts_without_redis_and_joins_when_it_comes(
    tmp_path: Path, users_file: Path, registry: Registry
) -> None:
    port = free_port()
    (tmp_path / "redis-password").write_text("redis-secret-0123\n")
    metrics = f"127.0.0.1:{free_port()}"
    env = {
        "GATEWAY_REDIS_URL": f"redis://127.0.0.1:{port}/0",
        "GATEWAY_REDIS_PASSWORD_FILE": str(tmp_path / "redis-password"),
    }
    gateway = start_gateway(tmp_path, registry.url, users_file, "--metrics-listen", metrics, env=env)
    try:
        assert metric(metrics, "registry_gateway_redis_up") == 0
        redis = start_redis(tmp_path, port=port)
        try:
            wait_until(lambda: metric(metrics, "registry_gateway_redis_up") == 1)
            assert "failed logins and revocations are shared" in gateway.log.read_text()
        finally:
            stop_process(redis.process)
    finally:
        stop(gateway.process)
