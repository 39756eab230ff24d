"""deploy/one-process/compose.yml, run as its comments say: the tutorial's conf/ folder (docker_auth's
auth_config.yml and its token keys) unchanged, the gateway and the registry, and a certificate
from an ACME CA. The CA is Debian's pebble in a container of the project (a stand-in image built
from tests/standins/Dockerfile: no CA is reachable from here), validating the gateway by a network
alias carrying the registry's name. Through the published ports: the certificate served is the
CA's, for the name; the tutorial's users log in with the docker CLI and get Bearer tokens signed
with the tutorial's key; the ACL decides (a developer pushes to their team's namespace and not to
another's, anonymous pulls); plain HTTP redirects to HTTPS; and a restart reuses the certificate.
Marked `image`, like tests/test_image.py, whose fixtures this reuses.
"""

from __future__ import annotations

import functools
import json
import os
import secrets
import shutil
import socket
import ssl
import subprocess
import tempfile
import urllib.request
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests import certificates
from tests.conftest import free_port, http_request, require, wait_until
from tests.dockerd import Docker
from tests.image_build import ROOT
from tests.services import self_signed
from tests.test_docker_auth import PASSWORDS, auth_config
from tests.test_image_ha import STANDINS

pytestmark = pytest.mark.image

DEPLOYMENT = ROOT / "deploy" / "one-process"
NAME = "registry.test"  # the registry's DNS name: a network alias of the gateway, for the CA
PEBBLE = "gw-standin-pebble:test"


@pytest.fixture(scope="module")
def pebble_image(image: Docker) -> Docker:
    config = image.root / "image-config"
    built = image.run(
        config, "build", "--network", "host", "--target", "pebble", "-t", PEBBLE, str(STANDINS), timeout=600
    )
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    return image


def tutorial_keys(folder: Path) -> None:
    """docker_auth's token key and certificate, as the tutorial makes them (RSA, self-signed)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cert = certificates.certificate("Acme auth server", key, days=365)
    folder.mkdir(mode=0o755)
    (folder / "certificate.pem").write_bytes(certificates.pem(cert))
    (folder / "privatekey.pem").write_bytes(
        certificates.key_pem(key, serialization.PrivateFormat.TraditionalOpenSSL)
    )
    for made in folder.iterdir():
        os.chown(made, 10001, 10001)  # as the compose file's comments say
        made.chmod(0o600)


def project_folder(https_port: int, http_port: int, management_port: int) -> Path:
    """The compose file with its ports on 127.0.0.1, the tutorial's conf/, and an override that
    adds the CA: Pebble in the project, the gateway trusting Pebble's HTTPS and reachable by it
    under NAME."""
    project = Path(tempfile.mkdtemp(prefix="gw-one-"))
    project.chmod(0o755)
    text = (DEPLOYMENT / "compose.yml").read_text()
    for original, replacement in (
        ('"443:8443"', f'"127.0.0.1:{https_port}:8443"'),
        ('"80:8080"', f'"127.0.0.1:{http_port}:8080"'),
    ):
        assert original in text, original
        text = text.replace(original, replacement)
    (project / "compose.yml").write_text(text)
    conf = project / "conf"
    conf.mkdir(mode=0o755)
    (conf / "auth-server.yml").write_text(
        auth_config(Path("/certs/privatekey.pem"), Path("/certs/certificate.pem"))
    )
    (conf / "auth-server.yml").chmod(0o644)
    (conf / "htpasswd").touch(mode=0o644)
    tutorial_keys(conf / "keys")

    ca = project / "pebble"
    ca.mkdir(mode=0o755)
    cert, key = self_signed(ca, "pebble")
    for made in (cert, key):
        made.chmod(0o644)
    settings = {
        "listenAddress": "0.0.0.0:14000",
        "managementListenAddress": "0.0.0.0:15000",
        "certificate": "/pebble/pebble.crt",
        "privateKey": "/pebble/pebble.key",
        "httpPort": 8080,  # the gateway's container ports: Pebble reaches it on the project's network
        "tlsPort": 8443,
        "ocspResponderURL": "",
        "externalAccountBindingRequired": False,
    }
    (ca / "config.json").write_text(json.dumps({"pebble": settings}))
    (project / "compose.pebble.yml").write_text(
        f"""\
services:
  gateway:
    environment:
      GATEWAY_ACME_CA_FILE: /pebble/pebble.crt
    volumes:
      - ./pebble:/pebble:ro
    networks:
      default:
        aliases: ["{NAME}"]
  pebble:
    image: {PEBBLE}
    command: ["-config", "/pebble/config.json"]
    volumes:
      - ./pebble:/pebble:ro
    ports:
      - "127.0.0.1:{management_port}:15000"
"""
    )
    return project


def compose(
    image: Docker, config: Path, project: Path, name: str, *args: str
) -> subprocess.CompletedProcess[str]:
    env = image.env(config)
    env.update(
        REGISTRY_DOMAIN=NAME,
        ACME_EMAIL="ops@example.com",
        ACME_DIRECTORY="https://pebble:14000/dir",
        REGISTRY_HTTP_SECRET=secrets.token_hex(32),
    )
    return subprocess.run(
        [require("docker-compose"), "-p", name, "-f", "compose.yml", "-f", "compose.pebble.yml", *args],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def pebble_root(management_port: int, project: Path) -> bytes:
    context = ssl.create_default_context(cafile=str(project / "pebble" / "pebble.crt"))
    with urllib.request.urlopen(
        f"https://127.0.0.1:{management_port}/roots/0", context=context, timeout=10
    ) as answer:
        return bytes(answer.read())


def served_certificate(port: int, root: bytes) -> x509.Certificate | None:
    """The certificate the gateway serves for NAME, verified against Pebble's root; None while
    it serves none."""
    context = ssl.create_default_context(cadata=root.decode())
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as connection,
            context.wrap_socket(connection, server_hostname=NAME) as tls,
        ):
            der = tls.getpeercert(binary_form=True)
    except (OSError, ssl.SSLError):
        return None
    return None if der is None else x509.load_der_x509_certificate(der)


def test_one_process_replaces_caddy_and_docker_auth_with_the_tutorials_conf_unchanged(
    pebble_image: Docker, tmp_path: Path
) -> None:
    docker = pebble_image
    config = tmp_path / "docker-config"
    https_port, http_port, management_port = free_port(), free_port(), free_port()
    project = project_folder(https_port, http_port, management_port)
    name = f"gwone{secrets.token_hex(3)}"
    host = f"127.0.0.1:{https_port}"
    try:
        up = compose(docker, config, project, name, "up", "-d")
        assert up.returncode == 0, up.stderr
        wait_until(lambda: _answers(management_port, project), 60)
        root = pebble_root(management_port, project)

        def logs() -> str:
            done = compose(docker, config, project, name, "logs", "gateway")
            return done.stdout + done.stderr

        try:
            wait_until(lambda: served_certificate(https_port, root) is not None, 120)
        except AssertionError:
            raise AssertionError(f"no certificate served:\n{logs()[-5000:]}") from None
        first = served_certificate(https_port, root)
        assert first is not None
        names = first.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert names.get_values_for_type(x509.DNSName) == [NAME]

        # Plain HTTP: a redirect to HTTPS (on 443, the port the compose file publishes).
        status, headers, _ = http_request(f"127.0.0.1:{http_port}", "GET", "/v2/")
        assert status == 301 and headers["Location"] == "https://127.0.0.1/v2/", headers

        # The tutorial's users and ACL, with Bearer tokens signed by the tutorial's key: the docker
        # CLI (dockerd checks no certificate on loopback: tests/test_acme.py proves the trust).
        cli = functools.partial(docker.cli, config)
        code, said = cli("login", "-u", "developer", "--password-stdin", host, stdin=PASSWORDS["developer"])
        assert code == 0, said
        own = f"{host}/dev-backend/app:1"
        docker.build_image(config, own, {"a.bin": os.urandom(60_000)})
        code, said = cli("push", own)
        assert code == 0, said
        other = f"{host}/username1/app:1"
        assert cli("tag", own, other)[0] == 0
        code, said = cli("push", other)
        assert code != 0 and "denied" in said, said
        assert cli("logout", host)[0] == 0
        assert cli("rmi", own)[0] == 0
        code, said = cli("pull", own)  # anonymous: the tutorial's "" user may pull everything
        assert code == 0, said

        # A restart reuses the stored certificate: no new order.
        restarted = compose(docker, config, project, name, "restart", "gateway")
        assert restarted.returncode == 0, restarted.stderr
        wait_until(lambda: served_certificate(https_port, root) is not None, 60)
        again = served_certificate(https_port, root)
        assert again is not None and again.serial_number == first.serial_number
        assert "Traceback" not in logs()
    finally:
        compose(docker, config, project, name, "down", "-v")
        shutil.rmtree(project, ignore_errors=True)


def _answers(management_port: int, project: Path) -> bool:
    try:
        pebble_root(management_port, project)
    except OSError:
        return False
    return True
