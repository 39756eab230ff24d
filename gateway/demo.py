"""`registry-gateway demo`: a local registry from Debian's docker-registry package, demo users, the gateway.

For trying the gateway on one machine. Everything lives under one data folder; nothing is
installed system-wide. The demo passwords are printed on purpose: they are documented demo values.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import bcrypt

from gateway import config
from gateway.runtime import ListenError, configure_logging, run_event_loop, run_server
from gateway.sample_image import write_image
from gateway.state import AccessStore

DEMO_USERS = (("admin", "admin-demo"), ("alice", "alice-demo"))

REGISTRY_CONFIG = """\
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: {root}
  delete:
    enabled: true
http:
  addr: {listen}
"""


def write_htpasswd(path: Path, users: tuple[tuple[str, str], ...], cost: int = 10) -> None:
    lines = [f"{name}:{bcrypt.hashpw(pw.encode(), bcrypt.gensalt(cost)).decode()}" for name, pw in users]
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o600)


class DemoError(Exception):
    """The demo cannot run; the message says why and what to do."""


def _port_taken(address: str) -> bool:
    host, _, port = address.rpartition(":")
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        try:
            probe.bind((host.strip("[]"), int(port)))
        except OSError:
            return True
    return False


def start_registry(binary: str, data: Path, listen: str) -> subprocess.Popen[bytes]:
    registry_config = data / "registry.yml"
    registry_config.write_text(REGISTRY_CONFIG.format(root=data / "storage", listen=listen))
    with (data / "registry.log").open("ab") as log_file:
        process = subprocess.Popen([binary, "serve", str(registry_config)], stdout=log_file, stderr=log_file)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise DemoError(
                f"the registry exited with status {process.returncode}; see {data / 'registry.log'}"
            )
        try:
            with urllib.request.urlopen(f"http://{listen}/v2/", timeout=1):
                pass
        except (urllib.error.URLError, OSError):
            time.sleep(0.1)
            continue
        # Something answered: make sure it is the registry we started, not another on that port.
        time.sleep(0.3)
        if process.poll() is not None:
            raise DemoError(
                f"the registry exited with status {process.returncode}; see {data / 'registry.log'}"
            )
        return process
    process.terminate()
    process.wait(timeout=10)
    raise DemoError(f"the registry did not start on {listen}; see {data / 'registry.log'}")


def run_demo(data: Path, listen: str, registry_listen: str, registry_bin: str) -> int:
    if shutil.which(registry_bin) is None:
        print(
            f"{registry_bin} not found: install Debian's docker-registry package "
            "(apt-get install docker-registry) or pass --registry-bin",
            file=sys.stderr,
        )
        return 1
    data = data.resolve()
    data.mkdir(parents=True, exist_ok=True)
    users_file = data / "htpasswd"
    if not users_file.exists():
        write_htpasswd(users_file, DEMO_USERS)
    try:
        settings = config.load(
            None, {}, {"listen": listen, "upstream": f"http://{registry_listen}", "htpasswd": str(users_file)}
        )
    except config.ConfigError as exc:
        print("\n".join(exc.problems), file=sys.stderr)
        return 2
    for address, option in ((registry_listen, "--registry-listen"), (listen, "--listen")):
        if _port_taken(address):
            print(f"{address} is in use: choose another address with {option} HOST:PORT", file=sys.stderr)
            return 2
    image = data / "hello-image"
    if not image.exists():
        write_image(image, "1")
    try:
        registry = start_registry(registry_bin, data, registry_listen)
    except DemoError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 1
    configure_logging("info")
    print(
        f"registry on http://{registry_listen} (data in {data}), gateway on http://{listen}\n"
        f"demo users: {', '.join(f'{u} / {p}' for u, p in DEMO_USERS)} "
        "(admin may push; alice may only pull)\n"
        "try:\n"
        f"  skopeo copy --dest-tls-verify=false --dest-creds admin:admin-demo "
        f"oci:{image}:1 docker://{listen}/demo/hello:1\n"
        f"  curl -u alice:alice-demo http://{listen}/v2/_catalog\n"
        "Ctrl-C stops both.",
        flush=True,
    )
    try:
        run_event_loop(
            run_server(settings, AccessStore(settings.htpasswd, settings.policy, robots_path=settings.robots))
        )
    except ListenError as exc:
        print(f"demo: {exc}; choose another address with --listen HOST:PORT", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    finally:
        registry.terminate()
        registry.wait(timeout=10)
    return 0
