"""The shipped Dockerfile, compose.yml and example config name only settings that exist."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import yaml

from gateway import config
from tests.conftest import Registry, free_port, start_gateway, stop

ROOT = Path(__file__).parent.parent
KNOWN_ENV = {config.env_name(key) for key in config.DEFAULTS} | {config.ENV_PREFIX + "CONFIG"}


class _ComposeLoader(yaml.SafeLoader):
    """YAML with compose's `!override` and `!reset` tags."""


def _sequence(loader: yaml.SafeLoader, node: yaml.Node) -> list[object]:
    assert isinstance(node, yaml.SequenceNode)
    return loader.construct_sequence(node)


_ComposeLoader.add_constructor("!override", _sequence)


def test_compose_and_dockerfile_use_real_settings() -> None:
    compose = yaml.safe_load((ROOT / "compose.yml").read_text())
    gateway = compose["services"]["gateway"]
    assert set(gateway["environment"]) <= KNOWN_ENV
    htpasswd_dir = str(Path(gateway["environment"]["GATEWAY_HTPASSWD"]).parent)
    assert any(volume.split(":")[1] == htpasswd_dir for volume in gateway["volumes"])
    assert compose["services"]["registry"]["image"].startswith("registry:2")
    tls = yaml.load((ROOT / "compose.tls.yml").read_text(), Loader=_ComposeLoader)
    assert set(tls["services"]["gateway"]["environment"]) <= KNOWN_ENV
    assert "ports" not in compose["services"]["registry"]  # only the gateway is published
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert set(re.findall(r"GATEWAY_[A-Z_]+", dockerfile)) <= KNOWN_ENV
    assert re.search(r"^USER 10001", dockerfile, re.M)
    assert "/healthz" in dockerfile


def test_dockerfile_healthcheck_command_detects_a_live_gateway(
    tmp_path: Path, registry: Registry, users_file: Path
) -> None:
    dockerfile = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    match = re.search(r"HEALTHCHECK .*? CMD (\[.*\])", dockerfile)
    assert match is not None
    command = json.loads(match.group(1))
    assert command[:2] == ["python", "-c"]
    port = free_port()
    gateway = start_gateway(tmp_path, registry.url, users_file, "--metrics-listen", f"127.0.0.1:{port}")
    try:
        script = command[2].replace("9090", str(port))
        assert subprocess.run([sys.executable, "-c", script], timeout=30).returncode == 0
    finally:
        stop(gateway.process)
    dead = command[2].replace("9090", str(port))
    assert subprocess.run([sys.executable, "-c", dead], capture_output=True, timeout=30).returncode != 0


def test_example_policy_is_valid_and_warns_about_nothing() -> None:
    from gateway import policyfile

    policy = policyfile.load(ROOT / "config" / "policy.example.yml")
    assert len(policy.acl) == 5
    assert policy.warnings == ()
