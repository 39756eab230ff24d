"""A private docker daemon for the tests: its own data, exec root, pid file and socket, no network
set-up, stopped by its PID. The docker CLI is pointed at it with DOCKER_HOST and at a private
DOCKER_CONFIG, so no test reads or writes the machine's own daemon or credentials."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import pytest


def _require(binary: str) -> str:
    path = shutil.which(binary) or (f"/usr/sbin/{binary}" if Path(f"/usr/sbin/{binary}").exists() else None)
    if path is None:
        # Not a skip: the docker CLI is a client the product must serve. .ci/run installs it.
        raise RuntimeError(f"{binary} is required (apt-get install docker.io)")
    return path


@dataclass
class Docker:
    root: Path
    socket: Path
    process: subprocess.Popen[bytes]

    def env(self, config_dir: Path) -> dict[str, str]:
        config_dir.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")}
        env.update(
            DOCKER_HOST=f"unix://{self.socket}",
            DOCKER_CONFIG=str(config_dir),
            DOCKER_BUILDKIT="0",  # the classic builder: FROM scratch needs nothing from the network
        )
        return env

    def run(
        self, config_dir: Path, *args: str, stdin: str | None = None, timeout: float = 180
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [_require("docker"), *args],
            input=stdin,
            capture_output=True,
            text=True,
            env=self.env(config_dir),
            timeout=timeout,
        )

    def cli(self, config_dir: Path, *args: str, stdin: str | None = None) -> tuple[int, str]:
        """The docker CLI's exit status and everything it printed."""
        done = self.run(config_dir, *args, stdin=stdin)
        return done.returncode, done.stdout + done.stderr

    def build_image(self, config_dir: Path, tag: str, layers: dict[str, bytes]) -> None:
        """An image `FROM scratch` with one layer per file, built without any registry."""
        context = Path(tempfile.mkdtemp(prefix="ctx-", dir=self.root))
        lines = ["FROM scratch"]
        for name, content in layers.items():
            (context / name).write_bytes(content)
            lines.append(f"COPY {name} /{name}")
        (context / "Dockerfile").write_text("\n".join(lines) + "\n")
        built = self.run(config_dir, "build", "-q", "-t", tag, str(context))
        assert built.returncode == 0, built.stderr
        shutil.rmtree(context)


def _popen_dockerd(
    root: Path, socket: Path, driver: str, log: IO[bytes], prefix: list[str], env: dict[str, str] | None
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            *prefix,
            _require("dockerd"),
            "--data-root",
            str(root / "data"),
            "--exec-root",
            str(root / "exec"),
            "--pidfile",
            str(root / "dockerd.pid"),
            "-H",
            f"unix://{socket}",
            "--iptables=false",
            "--ip-masq=false",
            "--bridge=none",
            f"--storage-driver={driver}",
        ],
        stdout=log,
        stderr=log,
        env=None if env is None else {**os.environ, **env},
    )


def _start(
    root: Path, driver: str, prefix: list[str] | None = None, env: dict[str, str] | None = None
) -> Docker | None:
    socket = root / "docker.sock"
    with (root / f"dockerd-{driver}.log").open("wb") as log:
        process = _popen_dockerd(root, socket, driver, log, prefix or [], env)
    docker = Docker(root, socket, process)

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and process.poll() is None:
        info = subprocess.run(
            [_require("docker"), "info", "--format", "{{.Driver}}"],
            capture_output=True,
            text=True,
            env=docker.env(root / "probe-config"),
        )
        if info.returncode == 0:
            return docker
        time.sleep(0.25)
    _stop(docker)
    return None


def _stop(docker: Docker) -> None:
    process = docker.process
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    # dockerd leaves its network namespace mounted under the exec root.
    netns = docker.root / "exec" / "netns" / "default"
    if netns.exists():
        subprocess.run(["umount", str(netns)], capture_output=True, check=False)


@contextlib.contextmanager
def private_dockerd(prefix: list[str] | None = None, env: dict[str, str] | None = None) -> Iterator[Docker]:
    """A daemon of our own, its command line prefixed with `prefix` (a private /etc/hosts) and
    `env` added to its environment (what it trusts)."""
    # A short path: a unix socket path must fit in 108 bytes.
    root = Path(tempfile.mkdtemp(prefix="gw-dockerd-", dir="/tmp"))
    docker = _start(root, "overlay2", prefix, env) or _start(root, "vfs", prefix, env)
    if docker is None:
        logs = "\n".join(p.read_text(errors="replace")[-2000:] for p in root.glob("dockerd-*.log"))
        raise RuntimeError(f"dockerd did not start:\n{logs}")
    try:
        yield docker
    finally:
        _stop(docker)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def dockerd() -> Iterator[Docker]:
    with private_dockerd() as docker:
        yield docker
