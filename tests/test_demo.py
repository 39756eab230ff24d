"""The README's first command ends in `registry-gateway demo`: it must work as printed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.conftest import free_port, http_request, skopeo_copy, wait_for_http, write_authfile


def test_demo_runs_registry_and_gateway_with_demo_users(tmp_path: Path) -> None:
    gateway_port, registry_port = free_port(), free_port()
    log = tmp_path / "demo.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    with log.open("wb") as out:
        demo = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gateway",
                "demo",
                "--data",
                str(tmp_path / "data"),
                "--listen",
                f"127.0.0.1:{gateway_port}",
                "--registry-listen",
                f"127.0.0.1:{registry_port}",
            ],
            stdout=out,
            stderr=out,
            env=env,
        )
    try:
        host = f"127.0.0.1:{gateway_port}"
        wait_for_http(f"http://{host}/v2/", demo, log)
        printed = log.read_text()
        assert "admin / admin-demo" in printed and "alice / alice-demo" in printed
        image = tmp_path / "data" / "hello-image"
        assert f"oci:{image}:1 docker://{host}/demo/hello:1" in printed

        pushed = skopeo_copy(
            f"oci:{image}:1",
            f"docker://{host}/demo/hello:1",
            write_authfile(tmp_path / "admin.json", host, ("admin", "admin-demo")),
        )
        assert pushed.returncode == 0, pushed.stderr
        status, _, body = http_request(host, "GET", "/v2/_catalog", ("alice", "alice-demo"))
        assert status == 200 and json.loads(body) == {"repositories": ["demo/hello"]}
        refused = skopeo_copy(
            f"oci:{image}:1",
            f"docker://{host}/demo/alice:1",
            write_authfile(tmp_path / "alice.json", host, ("alice", "alice-demo")),
        )
        assert refused.returncode != 0 and "denied" in refused.stderr
    finally:
        demo.send_signal(signal.SIGTERM)
        assert demo.wait(timeout=30) == 0
    # Stopping the demo stops its registry too.
    assert http_request_fails(f"127.0.0.1:{registry_port}")


def http_request_fails(host: str) -> bool:
    try:
        http_request(host, "GET", "/v2/")
    except OSError:
        return True
    return False
