"""The gateway's container image, built once per test session into the one private dockerd
(tests/dockerd.py): `python:3.11-slim` and `registry:2` are used when present or pullable;
otherwise (no Docker Hub here) ../shared/tools/docker-standins.sh (or its copy in tests/tools)
builds faithful stand-ins first (about a minute). A pytest plugin (conftest's pytest_plugins),
so that every module asking for `image` shares the one build.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.dockerd import Docker

ROOT = Path(__file__).parent.parent
# The shared tools beside the clone are the reference (CI has them); the copy in tests/tools keeps
# a clone that stands alone able to build the stand-ins too.
STANDINS = next(
    (
        path
        for path in (
            ROOT.parent / "shared" / "tools" / "docker-standins.sh",
            ROOT / "tests" / "tools" / "docker-standins.sh",
        )
        if path.exists()
    ),
    ROOT / "tests" / "tools" / "docker-standins.sh",
)
IMAGE = "registry-gateway:latest"  # the tag compose.yml names


@pytest.fixture(scope="session")
def image(dockerd: Docker) -> Iterator[Docker]:
    config = dockerd.root / "image-config"
    missing = [
        base
        for base in ("python:3.11-slim", "registry:2")
        if dockerd.run(config, "image", "inspect", base).returncode != 0
        and dockerd.run(config, "pull", base, timeout=120).returncode != 0
    ]
    if missing:
        if not STANDINS.exists():
            raise RuntimeError(f"{', '.join(missing)} cannot be pulled and {STANDINS} is missing")
        built = subprocess.run(
            ["bash", str(STANDINS)],
            env=dockerd.env(config),
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert built.returncode == 0, built.stderr[-3000:]
    # --network host: RUN steps have no network otherwise on a daemon with --bridge=none.
    build = dockerd.run(config, "build", "--network", "host", "-t", IMAGE, str(ROOT), timeout=600)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    yield dockerd
