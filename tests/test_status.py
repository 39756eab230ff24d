"""A gateway that shows what it has loaded: the start-up log's counts and sources, the metrics
listener's /status (files with the hash of what was loaded, counts, token key ids, the registry;
no secret), the stale flag after a refused reload in /readyz, /status and a metric (and its end
once the file is mended), and the warning when the registry does not answer at start, with the
line saying when it does. With the real registry, on one worker and on two."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from pathlib import Path

from gateway import robots
from tests.conftest import (
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

POLICY = """\
acl:
  - match: {account: "admin"}
    actions: ["*"]
  - match: {account: "/.+/"}
    actions: ["pull"]
immutable:
  - name: "prod/*"
    tags: ["v*"]
"""


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def test_what_is_loaded_is_shown_and_a_refused_reload_is_stale(tmp_path: Path, registry: Registry) -> None:
    users = users_with(tmp_path / "htpasswd")
    policy, robots_file = tmp_path / "policy.yml", tmp_path / "robots.yml"
    policy.write_text(POLICY)
    secret = robots.create(
        robots_file, "ci", robots.parse_scopes(["repository:ci/*:pull"]), None, {}, dt.datetime.now(dt.UTC)
    )
    key = make_token_key(tmp_path / "token.key")
    metrics = f"127.0.0.1:{free_port()}"
    env = {"GATEWAY_CHALLENGE": "bearer", "GATEWAY_TOKEN_KEY": str(key), "GATEWAY_METRICS_LISTEN": metrics}
    gateway = start_gateway(
        tmp_path, registry.url, users, "--policy", str(policy), "--robots", str(robots_file), env=env
    )
    try:
        log = gateway.log.read_text()
        assert (
            f"loaded 2 users from {users}; 0 static users, 2 rules, 1 immutable tag rules from {policy}; "
            f"1 robots from {robots_file}"
        ) in log
        assert "token keys (signing first): " in log
        assert "does not answer" not in log

        status, shown = get_json(metrics, "/status")
        assert status == 200
        assert shown["configuration"]["state"] == "current"
        assert {f["setting"]: f["sha256"] for f in shown["files"]} == {
            "htpasswd": sha(users),
            "policy": sha(policy),
            "robots": sha(robots_file),
        }
        assert shown["counts"] == {
            "users": 2, "static_users": 0, "rules": 2, "immutable_tag_rules": 1, "robots": 1
        }  # fmt: skip
        kids = shown["token_keys"]["key_ids"]
        assert len(kids) == 1 and kids[0] in log
        assert shown["registry"]["answers"] is True
        text = json.dumps(shown)
        for never in ("$2", secret, key.read_text().splitlines()[1], "hmac-sha256"):
            assert never not in text
        assert metric(metrics, "registry_gateway_config_up") == 1

        # A change that does not load: the last good rules run, and everything says so.
        policy.write_text(POLICY + "  - name: [broken\n")
        wait_until(lambda: get_json(metrics, "/status")[1]["configuration"]["state"] == "stale", 10)
        status, ready = get_json(metrics, "/readyz")
        assert status == 200 and str(ready["configuration"]).startswith("stale since "), ready
        assert "policy" not in str(ready["configuration"])  # why is for /status, behind the token
        shown = get_json(metrics, "/status")[1]
        assert "policy" in str(shown["configuration"]["problem"])
        assert metric(metrics, "registry_gateway_config_up") == 0

        policy.write_text(POLICY)
        wait_until(lambda: metric(metrics, "registry_gateway_config_up") == 1, 10)
        assert str(get_json(metrics, "/readyz")[1]["configuration"]).startswith("current, loaded at ")
    finally:
        stop(gateway.process)


def test_a_registry_that_does_not_answer_at_start_is_said_and_so_is_its_return(tmp_path: Path) -> None:
    port = free_port()
    users = users_with(tmp_path / "htpasswd")
    gateway = start_gateway(tmp_path, f"http://127.0.0.1:{port}", users)
    registry = None
    try:
        wait_until(lambda: "does not answer" in gateway.log.read_text(), 10)
        assert f"the registry at http://127.0.0.1:{port} does not answer" in gateway.log.read_text()
        registry = start_registry(tmp_path, port=port)
        wait_until(lambda: "answers now" in gateway.log.read_text(), 15)
    finally:
        stop(gateway.process)
        if registry is not None:
            stop(registry.process)


def test_status_with_two_workers_shows_each_workers_configuration(tmp_path: Path) -> None:
    registry = start_registry(tmp_path)
    users = users_with(tmp_path / "htpasswd")
    metrics = f"127.0.0.1:{free_port()}"
    gateway = start_gateway(
        tmp_path, registry.url, users, env={"GATEWAY_WORKERS": "2", "GATEWAY_METRICS_LISTEN": metrics}
    )
    try:
        wait_until(lambda: get_json(metrics, "/status")[0] == 200, 20)
        shown = get_json(metrics, "/status")[1]
        assert [w["state"] for w in shown["workers"]] == ["current", "current"]
        assert shown["counts"]["users"] == 2
    finally:
        stop(gateway.process)
        stop(registry.process)
