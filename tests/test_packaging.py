"""The shipped Dockerfile, compose.yml and example config name only settings that exist."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

from gateway import config
from tests.conftest import Registry, free_port, require, start_gateway, stop

ROOT = Path(__file__).parent.parent
KNOWN_ENV = {config.env_name(key) for key in config.DEFAULTS} | {config.ENV_PREFIX + "CONFIG"}


def test_compose_and_dockerfile_use_real_settings(users_file: Path) -> None:
    # Plain YAML: docker-compose 1.29 (Debian's) reads neither `!override` nor `!reset`.
    compose = yaml.safe_load((ROOT / "compose.yml").read_text())
    tls = yaml.safe_load((ROOT / "compose.tls.yml").read_text())
    gateway = compose["services"]["gateway"]
    assert set(gateway.get("environment") or {}) <= KNOWN_ENV
    assert set(tls["services"]["gateway"]["environment"]) <= KNOWN_ENV
    assert any(volume.split(":")[1] == "/etc/registry-gateway" for volume in gateway["volumes"])
    assert compose["services"]["registry"]["image"].startswith("registry:2")
    assert "ports" not in compose["services"]["registry"]  # only the gateway is published
    # docker stops a container after 10 s unless told otherwise: longer than shutdown_grace.
    grace = gateway["stop_grace_period"]
    assert grace.endswith("s") and float(grace[:-1]) > config.DEFAULTS["shutdown_grace"]
    # TLS inside the container on unprivileged ports, published as 443 and 80.
    assert tls["services"]["gateway"]["ports"] == ["443:8443", "80:8080"]

    dockerfile = (ROOT / "Dockerfile").read_text()
    assert set(re.findall(r"GATEWAY_[A-Z_]+", dockerfile)) <= KNOWN_ENV
    assert re.search(r"^USER 10001:10001$", dockerfile, re.M)
    assert "groupadd --system --gid 10001" in dockerfile
    # The image's settings are a config file (which a file of the user's replaces), never ENV
    # values that would beat every config file.
    assert re.findall(r"GATEWAY_[A-Z_]+=", dockerfile) == ["GATEWAY_CONFIG="]
    image_settings = config.load(
        ROOT / "config" / "container.yml",
        {"GATEWAY_HTPASSWD": str(users_file)},
        check_files=True,
    )
    assert image_settings.metrics_listen == ("127.0.0.1", 9090)  # for the HEALTHCHECK, no other container
    ignored = [
        line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines() if not line.startswith("#")
    ]
    assert ignored[0] == "*" and "!gateway/" in ignored and "!config/container.yml" in ignored


def test_healthcheck_command_probes_what_the_settings_say(
    tmp_path: Path, registry: Registry, users_file: Path
) -> None:
    dockerfile = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    match = re.search(r"HEALTHCHECK .*? CMD (\[.*\])", dockerfile)
    assert match is not None
    assert json.loads(match.group(1)) == ["registry-gateway", "healthcheck"]

    def healthcheck(**env: str) -> int:
        environment = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
        environment.update({f"GATEWAY_{k.upper()}": v for k, v in env.items()})
        command = [sys.executable, "-m", "gateway", "healthcheck"]
        return subprocess.run(command, env=environment, capture_output=True, timeout=30).returncode

    metrics = f"127.0.0.1:{free_port()}"
    gateway = start_gateway(tmp_path, registry.url, users_file, "--metrics-listen", metrics)
    try:
        assert healthcheck(metrics_listen=metrics) == 0  # /healthz on the metrics listener
        assert healthcheck(listen=gateway.host) == 0  # no metrics: the listener's 401 is an answer
        # A docker_auth policy's server: section says where the gateway listens.
        policy = tmp_path / "auth_config.yml"
        policy.write_text(f'server: {{addr: "{gateway.host}"}}\nacl: [{{match: {{}}, actions: []}}]\n')
        assert healthcheck(policy=str(policy)) == 0
        # A policy broken since (the gateway serves on the last good one) is no sign of ill health:
        # its server: section still says where the gateway listens, and without one the settings do.
        broken = tmp_path / "broken.yml"
        broken.write_text(f'server: {{addr: "{gateway.host}"}}\nacl: [{{match: {{nonsense: 1}}}}]\n')
        assert healthcheck(policy=str(broken)) == 0
        broken.write_text("acl: [{match: {nonsense: 1}}\n")
        assert healthcheck(listen=gateway.host, policy=str(broken)) == 0
        broken.write_text("server: {addr: ':\u00b2'}\n")  # not even the section: no traceback
        assert healthcheck(listen=gateway.host, policy=str(broken)) == 0
    finally:
        stop(gateway.process)
    assert healthcheck(metrics_listen=metrics) == 1
    assert healthcheck(listen=gateway.host) == 1


def test_example_policy_is_valid_and_warns_about_nothing() -> None:
    from gateway import policyfile

    policy = policyfile.load(ROOT / "config" / "policy.example.yml")
    assert len(policy.acl) == 5
    assert policy.warnings == ()


def test_docker_compose_reads_both_files() -> None:
    """Debian's docker-compose 1.29 (no `!override`), as the README runs it."""
    done = subprocess.run(
        [require("docker-compose"), "-f", "compose.yml", "-f", "compose.tls.yml", "config"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    merged = yaml.safe_load(done.stdout)["services"]["gateway"]
    published = {(str(p["published"]), str(p["target"])) for p in merged["ports"]}
    assert {("443", "8443"), ("80", "8080")} <= published
    assert merged["environment"]["GATEWAY_LISTEN"] == "0.0.0.0:8443"
