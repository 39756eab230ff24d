"""Automatic HTTPS against a real ACME server: Debian's `pebble` (Let's Encrypt's test CA) and
`pebble-challtestsrv` (its DNS: every name is 127.0.0.1) on loopback, validating on the
gateway's own ports, with the real registry, and skopeo and the docker CLI trusting Pebble's root
alone (dockerd through a name of its own /etc/hosts that points at an address outside loopback,
since it checks no certificate on loopback).

- the first start obtains a certificate (HTTP-01 on redirect_listen, or TLS-ALPN-01 on the TLS
  listener alone), and clients push and pull over HTTPS with it; a restart reuses it;
- a short-lived certificate is renewed while a push is in flight, and the push succeeds;
- Pebble stopped at renewal time: the gateway keeps serving the certificate it has, retries, and
  says so in its log and /readyz;
- a challenge the CA cannot validate is reported by name.
"""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509

from gateway.sample_image import write_image
from tests import etc_view
from tests.conftest import (
    USERS,
    Gateway,
    Registry,
    free_port,
    get_json,
    make_token_key,
    require,
    start_gateway,
    stop,
    wait_until,
    write_authfile,
)
from tests.dockerd import private_dockerd
from tests.services import Pebble, restart_pebble, self_signed, start_pebble, stop_pebble, stop_process

NAME = "localhost"  # what clients here can resolve; Pebble's DNS answers 127.0.0.1 for it


@dataclass
class Site:
    pebble: Pebble
    gateway: Gateway
    https_port: int
    http_port: int
    metrics: str
    storage: Path
    certs: Path  # a cert dir for skopeo holding Pebble's root alone
    env: dict[str, str]
    tmp: Path
    upstream: str
    users: Path
    host: str = "127.0.0.1"

    def restart(self) -> None:
        stop(self.gateway.process)
        self.gateway = start_gateway(
            self.tmp, self.upstream, self.users, env=self.env, scheme="https", port=self.https_port,
            host=self.host,
        )  # fmt: skip


def _readyz(metrics: str) -> tuple[int, dict[str, str]]:
    found: tuple[int, dict[str, str]] = get_json(metrics, "/readyz")
    return found


def _served_certificate(
    port: int, root: bytes, host: str = "127.0.0.1", name: str = NAME
) -> x509.Certificate:
    context = ssl.create_default_context(cadata=root.decode())
    connection = socket.create_connection((host, port), timeout=10)
    with context.wrap_socket(connection, server_hostname=name) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def _start_site(
    tmp_path: Path,
    registry: Registry,
    users: Path,
    *,
    validity: int | None = None,
    challenges: str = "http-01,tls-alpn-01",
    redirect: bool = True,
    pebble_http_port: int | None = None,
    host: str = "127.0.0.1",
    name: str = NAME,
    front: Callable[[Pebble], tuple[str, Path]] | None = None,
) -> Site:
    """A gateway getting its certificate from a Pebble of its own; `front`, given Pebble, says
    which directory URL and CA bundle the gateway uses instead of Pebble's."""
    https_port, http_port = free_port(), free_port()
    pebble = start_pebble(
        tmp_path, pebble_http_port or http_port, https_port, validity=validity, address=host
    )
    directory, ca_file = front(pebble) if front else (pebble.directory, pebble.ca_file)
    storage = tmp_path / "acme"
    metrics = f"127.0.0.1:{free_port()}"
    env = {
        "GATEWAY_ACME_DIRECTORY": directory,
        "GATEWAY_ACME_NAMES": name,
        "GATEWAY_ACME_EMAIL": "ops@example.com",
        "GATEWAY_ACME_STORAGE": str(storage),
        "GATEWAY_ACME_CA_FILE": str(ca_file),
        "GATEWAY_ACME_CHALLENGES": challenges,
        "GATEWAY_METRICS_LISTEN": metrics,
    }
    if redirect:
        env["GATEWAY_REDIRECT_LISTEN"] = f"{host}:{http_port}"
    try:
        gateway = start_gateway(
            tmp_path, registry.url, users, env=env, scheme="https", port=https_port, host=host
        )
    except Exception:
        stop_pebble(pebble)
        raise
    certs = tmp_path / "pebble-root"
    certs.mkdir(exist_ok=True)
    (certs / "ca.crt").write_bytes(pebble.root())
    return Site(
        pebble, gateway, https_port, http_port, metrics, storage, certs, env, tmp_path, registry.url, users,
        host,
    )  # fmt: skip


@pytest.fixture
def site(tmp_path: Path, registry: Registry, users_file: Path) -> Iterator[Site]:
    made = _start_site(tmp_path, registry, users_file)
    try:
        yield made
    finally:
        stop(made.gateway.process)
        stop_pebble(made.pebble)


def _skopeo(site: Site, *args: str) -> subprocess.CompletedProcess[str]:
    auth = write_authfile(site.tmp / "auth.json", f"{NAME}:{site.https_port}", ("admin", USERS["admin"]))
    return subprocess.run(
        [require("skopeo"), "--insecure-policy", "copy", "--preserve-digests", "--retry-times", "0",
         "--authfile", str(auth), *args],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def _push_and_pull(site: Site, repository: str, layer_bytes: int = 64 * 1024) -> None:
    image = site.tmp / f"image-{repository.replace('/', '-')}"
    digest = write_image(image, "1", layers=2, layer_bytes=layer_bytes)
    target = f"docker://{NAME}:{site.https_port}/{repository}:1"
    pushed = _skopeo(site, "--dest-cert-dir", str(site.certs), f"oci:{image}:1", target)
    assert pushed.returncode == 0, pushed.stderr
    out = site.tmp / f"out-{repository.replace('/', '-')}"
    pulled = _skopeo(site, "--src-cert-dir", str(site.certs), target, f"oci:{out}:1")
    assert pulled.returncode == 0, pulled.stderr
    assert json.loads((out / "index.json").read_text())["manifests"][0]["digest"] == digest


def test_first_start_obtains_a_certificate_and_a_restart_reuses_it(site: Site) -> None:
    wait_until(lambda: _readyz(site.metrics)[0] == 200, 60)
    answer = _readyz(site.metrics)[1]
    assert answer["certificate"].startswith("valid until"), answer
    served = _served_certificate(site.https_port, site.pebble.root())
    assert NAME in served.extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    ).value.get_values_for_type(x509.DNSName)
    # Keys are the gateway's alone; the pair was written whole.
    for key in ("key.pem", "account.key"):
        assert (site.storage / key).stat().st_mode & 0o777 == 0o600
    assert "obtained" in site.gateway.log.read_text()
    _push_and_pull(site, "acme/app")
    # The redirect listener still redirects everything else to HTTPS.
    with pytest.raises(urllib.error.HTTPError) as redirected:
        opener = urllib.request.build_opener(_NoRedirect())
        opener.open(f"http://127.0.0.1:{site.http_port}/v2/", timeout=10)
    assert redirected.value.code == 301
    redirected.value.close()

    # A restart serves the stored certificate at once: no new order.
    site.restart()
    wait_until(lambda: _readyz(site.metrics)[0] == 200, 20)
    assert _served_certificate(site.https_port, site.pebble.root()).serial_number == served.serial_number
    assert "obtained" not in site.gateway.log.read_text()


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


def test_tls_alpn01_alone_when_only_the_tls_port_is_open(
    tmp_path: Path, registry: Registry, users_file: Path
) -> None:
    site = _start_site(tmp_path, registry, users_file, challenges="tls-alpn-01", redirect=False)
    try:
        wait_until(lambda: _readyz(site.metrics)[0] == 200, 60)
        assert _served_certificate(site.https_port, site.pebble.root()).issuer != x509.Name([])
        _push_and_pull(site, "acme/alpn")
        # The challenge's answer is gone once validated: the name gets the real certificate.
        assert not list((site.storage / "tls-alpn-01").iterdir())
    finally:
        stop(site.gateway.process)
        stop_pebble(site.pebble)


def _machine_address() -> str:
    """An IPv4 address of this machine outside 127.0.0.0/8. dockerd takes every registry on
    loopback for an insecure one and then skips checking its certificate: proving that docker
    trusts Pebble's root takes an address it checks."""
    shown = subprocess.run(
        [shutil.which("ip") or "/usr/sbin/ip", "-4", "-o", "addr", "show", "scope", "global"],
        capture_output=True,
        text=True,
        check=True,
    )
    for line in shown.stdout.splitlines():
        fields = line.split()
        address = ipaddress.ip_interface(fields[fields.index("inet") + 1]).ip
        if not address.is_loopback:
            return str(address)
    raise RuntimeError(f"this test needs an IPv4 address outside loopback; `ip addr` shows:\n{shown.stdout}")


DOCKER_NAME = "registry.test"  # in dockerd's own /etc/hosts; Pebble's DNS answers it too


def test_docker_logs_in_pushes_and_pulls_over_https_trusting_pebbles_root_alone(
    tmp_path: Path, registry: Registry, users_file: Path
) -> None:
    # For the length of this test the gateway (with the tests' passwords) listens on that address
    # too, which the machine's network may reach: nothing else here does.
    address = _machine_address()
    site = _start_site(tmp_path, registry, users_file, host=address, name=DOCKER_NAME)
    try:
        wait_until(lambda: _readyz(site.metrics)[0] == 200, 60)
        hosts = tmp_path / "hosts"
        hosts.write_text(f"127.0.0.1 localhost\n{address} {DOCKER_NAME}\n")
        # Go reads its roots from SSL_CERT_FILE and SSL_CERT_DIR alone when they are set; there
        # is no certs.d for the name: the daemon trusts Pebble's root and nothing else.
        trust = tmp_path / "trust-pebble"
        trust.mkdir()
        (trust / "root.pem").write_bytes(site.pebble.root())
        untrusting = tmp_path / "trust-nothing"
        untrusting.mkdir()
        (untrusting / "none.pem").write_text("")
        place = f"{DOCKER_NAME}:{site.https_port}"
        tag = f"{place}/acme/docker:1"
        config = tmp_path / "docker-config"
        layer = os.urandom(300_000)

        prefix = etc_view.hosts_command(hosts)
        with private_dockerd(
            prefix, {"SSL_CERT_FILE": str(trust / "root.pem"), "SSL_CERT_DIR": str(trust)}
        ) as docker:
            code, said = docker.cli(
                config, "login", "-u", "admin", "--password-stdin", place, stdin=USERS["admin"]
            )
            assert code == 0, said
            docker.build_image(config, tag, {"layer.bin": layer})
            code, said = docker.cli(config, "push", tag)
            assert code == 0, said
            code, said = docker.cli(config, "rmi", tag)
            assert code == 0, said
            code, said = docker.cli(config, "pull", tag)
            assert code == 0, said
            code, said = docker.cli(config, "create", "--name", "pulled", tag, "/none")
            assert code == 0, said
            code, said = docker.cli(config, "cp", "pulled:/layer.bin", str(tmp_path / "layer.bin"))
            assert code == 0, said
            assert (tmp_path / "layer.bin").read_bytes() == layer

        # A daemon that does not trust Pebble's root refuses the same gateway: the checks above
        # were made, not skipped.
        env = {"SSL_CERT_FILE": str(untrusting / "none.pem"), "SSL_CERT_DIR": str(untrusting)}
        with private_dockerd(prefix, env) as doubting:
            code, said = doubting.cli(
                tmp_path / "doubting", "login", "-u", "admin", "--password-stdin", place, stdin=USERS["admin"]
            )
            assert code != 0 and "certificate signed by unknown authority" in said, said
    finally:
        stop(site.gateway.process)
        stop_pebble(site.pebble)


def test_a_refused_challenge_is_reported_by_name(
    tmp_path: Path, registry: Registry, users_file: Path
) -> None:
    # Pebble validates HTTP-01 on a port where nothing answers.
    site = _start_site(tmp_path, registry, users_file, challenges="http-01", pebble_http_port=free_port())
    try:
        wait_until(lambda: "http-01 for localhost refused" in site.gateway.log.read_text(), 60)
        status, answer = _readyz(site.metrics)
        assert status == 503
        assert "no valid certificate yet" in answer["certificate"]
        assert "http-01 for localhost refused" in answer["certificate"]
        assert "Traceback" not in site.gateway.log.read_text()
    finally:
        stop(site.gateway.process)
        stop_pebble(site.pebble)


def test_a_short_lived_certificate_is_renewed_during_pushes_and_survives_a_ca_outage(
    tmp_path: Path, registry: Registry, users_file: Path
) -> None:
    site = _start_site(tmp_path, registry, users_file, validity=45)  # renewed from 30 s on
    try:
        wait_until(lambda: _readyz(site.metrics)[0] == 200, 60)
        first = _served_certificate(site.https_port, site.pebble.root())
        pushes: list[tuple[float, float, int, str]] = []
        stopping = threading.Event()

        def push_continuously() -> None:
            image = site.tmp / "renewal-image"
            write_image(image, "1", layers=2, layer_bytes=2_000_000)
            serial = 0
            while not stopping.is_set():
                serial += 1
                began = time.monotonic()
                done = _skopeo(
                    site, "--dest-cert-dir", str(site.certs), f"oci:{image}:1",
                    f"docker://{NAME}:{site.https_port}/acme/renewal:{serial}",
                )  # fmt: skip
                pushes.append((began, time.monotonic(), done.returncode, done.stderr[-300:]))

        pusher = threading.Thread(target=push_continuously)
        pusher.start()
        try:
            wait_until(
                lambda: (
                    _served_certificate(site.https_port, site.pebble.root()).serial_number
                    != first.serial_number
                ),
                60,
            )
            renewed_at = time.monotonic()
            wait_until(lambda: any(began > renewed_at for began, *_ in pushes), 60)
        finally:
            stopping.set()
            pusher.join(timeout=120)
        assert [push for push in pushes if push[2] != 0] == []
        assert any(began < renewed_at for began, *_ in pushes)  # pushes before, during and after it
        assert "renewed" in site.gateway.log.read_text() or "obtained" in site.gateway.log.read_text()

        # The CA gone at the next renewal: the current certificate keeps serving, the gateway
        # retries and says so; the CA back (a new Pebble: a new root), it renews again.
        second = _served_certificate(site.https_port, site.pebble.root())
        root = site.pebble.root()
        failures = site.gateway.log.read_text().count("ordering a certificate for localhost failed")
        stop_pebble_only(site.pebble)
        wait_until(
            lambda: (
                site.gateway.log.read_text().count("ordering a certificate for localhost failed") > failures
            ),
            60,
        )
        status, answer = _readyz(site.metrics)
        assert status == 200 and "ordering fails since" in answer["certificate"], answer
        assert _served_certificate(site.https_port, root).serial_number == second.serial_number
        site.pebble = restart_pebble(site.pebble)
        wait_until(lambda: "ordering works again" in site.gateway.log.read_text(), 90)
        assert "ordering fails" not in _readyz(site.metrics)[1]["certificate"]
    finally:
        stop(site.gateway.process)
        stop_pebble(site.pebble)


class RenewalInfo:
    """Pebble 2.4 (Debian's) has no ARI: this serves Pebble's directory with a renewalInfo URL
    added, and answers it (everything else goes to Pebble, whose absolute URLs the directory
    keeps). The first certificate asked about gets a window starting now; any later one, a
    window a year away."""

    def __init__(self, tmp_path: Path, pebble: Pebble) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        cert, key = self_signed(tmp_path, "ari")
        self.bundle = tmp_path / "ca-bundle.pem"
        self.bundle.write_bytes(pebble.ca_file.read_bytes() + cert.read_bytes())
        self.asked: list[int] = []
        front = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/dir":
                    context = ssl.create_default_context(cafile=str(pebble.ca_file))
                    with urllib.request.urlopen(pebble.directory, context=context, timeout=10) as answer:
                        directory = json.loads(answer.read())
                    directory["renewalInfo"] = f"{front.url}/renewal-info"
                    self._json(directory)
                elif self.path.startswith("/renewal-info/"):
                    serial = self.path.rsplit(".", 1)[1]
                    number = int.from_bytes(
                        base64.urlsafe_b64decode(serial + "=" * (-len(serial) % 4)), "big"
                    )
                    if number not in front.asked:
                        front.asked.append(number)
                    start = dt.datetime.now(dt.UTC) + dt.timedelta(
                        seconds=2 if number == front.asked[0] else 365 * 86400
                    )
                    window = {"start": _rfc3339(start), "end": _rfc3339(start + dt.timedelta(seconds=3))}
                    self._json({"suggestedWindow": window})
                else:
                    self.send_error(404)

            def _json(self, value: object) -> None:
                body = json.dumps(value).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _rfc3339(moment: dt.datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def test_the_cas_renewal_window_decides_when_it_offers_one(
    tmp_path: Path, registry: Registry, users_file: Path
) -> None:
    fronts: list[RenewalInfo] = []

    def front(pebble: Pebble) -> tuple[str, Path]:
        fronts.append(RenewalInfo(tmp_path, pebble))
        return f"{fronts[0].url}/dir", fronts[0].bundle

    site = _start_site(tmp_path, registry, users_file, front=front)  # Pebble's certificates: 5 years
    try:
        wait_until(lambda: _readyz(site.metrics)[0] == 200, 60)
        first = _served_certificate(site.https_port, site.pebble.root())
        # The window the CA gave the first certificate, years before a third of its life is left.
        wait_until(
            lambda: (
                _served_certificate(site.https_port, site.pebble.root()).serial_number != first.serial_number
            ),
            60,
        )
        log = site.gateway.log.read_text()
        assert "the CA suggests renewing the certificate at" in log
        assert fronts[0].asked[0] == first.serial_number and len(fronts[0].asked) >= 1
        # The renewed one is asked about too, and its window (a year away) decides.
        wait_until(lambda: len(fronts[0].asked) == 2, 30)
        second = _served_certificate(site.https_port, site.pebble.root())
        assert fronts[0].asked[1] == second.serial_number
        wait_until(lambda: "(the CA's renewal window)" in _readyz(site.metrics)[1]["certificate"], 10)
        status, answer = _readyz(site.metrics)
        assert status == 200 and str(dt.datetime.now(dt.UTC).year + 1) in answer["certificate"], answer
        assert "Traceback" not in site.gateway.log.read_text()
    finally:
        stop(site.gateway.process)
        stop_pebble(site.pebble)
        for made in fronts:
            made.close()


def stop_pebble_only(pebble: Pebble) -> None:
    """The CA down, its DNS still up (what a CA outage looks like from here)."""
    stop_process(pebble.process)


@pytest.mark.parametrize(
    ("values", "problem"),
    [
        ({"acme_directory": "http://ca.test/dir", "acme_names": "a.test"}, "acme_directory: expected an https://"),
        ({"acme_directory": "https://ca.test/dir"}, "acme_names: needed with acme_directory"),
        ({"acme_directory": "https://ca.test/dir", "acme_names": "a..test"}, "acme_names: 'a..test' is not"),
        ({"acme_directory": "https://ca.test/dir", "acme_names": "*.a.test"},
         "acme_names: '*.a.test' is not"),
        ({"acme_directory": "https://ca.test/dir", "acme_names": "192.0.2.7"},
         "acme_names: '192.0.2.7': its last label is all digits"),
        ({"acme_directory": "https://ca.test/dir", "acme_names": "a.test", "acme_challenges": "dns-01"},
         "acme_challenges: expected some of"),
        ({"acme_directory": "https://ca.test/dir", "acme_names": "a.test", "acme_challenges": "http-01"},
         "acme_challenges: http-01 is answered on redirect_listen"),
        ({"acme_directory": "https://ca.test/dir", "acme_names": "a.test", "tls_cert": "/c", "tls_key": "/k"},
         "tls_cert: not with acme_directory"),
        ({"acme_directory": "https://ca.test/dir", "acme_names": "a.test", "acme_storage": "{tmp}/empty/a"},
         "acme_storage: is not a directory this user can write to"),
        ({"acme_directory": "https://ca.test/dir", "acme_names": "a.test", "acme_ca_file": "{tmp}/empty"},
         "acme_ca_file: no PEM certificate"),
    ],
)  # fmt: skip
def test_bad_acme_settings_are_refused_by_key(
    tmp_path: Path, users_file: Path, values: dict[str, str], problem: str
) -> None:
    from gateway import config

    (tmp_path / "empty").write_text("\n")
    given = {
        "acme_storage": str(tmp_path / "acme"),
        **{k: v.replace("{tmp}", str(tmp_path)) for k, v in values.items()},
    }
    with pytest.raises(config.ConfigError) as refused:
        config.load(None, {}, {"htpasswd": str(users_file), **given})
    key, _, message = problem.partition(": ")
    problems = refused.value.problems
    assert any(line.startswith(key) and message in line for line in problems), problems
    assert len(problems) == 1, problems  # one line, naming the setting


def test_good_acme_settings_make_the_tls_pair_the_storages(tmp_path: Path, users_file: Path) -> None:
    from gateway import config

    settings = config.load(
        None,
        {
            "GATEWAY_ACME_DIRECTORY": "https://ca.test/dir",
            "GATEWAY_ACME_NAMES": "Registry.Example.com,b.test",
        },
        {
            "htpasswd": str(users_file),
            "acme_storage": str(tmp_path / "acme"),
            "redirect_listen": "127.0.0.1:8081",
        },
    )
    assert settings.acme_names == ("registry.example.com", "b.test")
    assert (
        settings.tls_cert == tmp_path / "acme" / "cert.pem"
        and settings.tls_key == tmp_path / "acme" / "key.pem"
    )


def test_check_config_tries_the_ca(site: Site) -> None:
    def check(directory: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "gateway", "check-config", "--htpasswd", str(site.users),
             "--upstream", site.upstream],
            capture_output=True, text=True, timeout=60,
            env={"PATH": "/usr/bin:/bin", **site.env, "GATEWAY_ACME_DIRECTORY": directory},
        )  # fmt: skip

    answers = check(site.pebble.directory)
    assert answers.returncode == 0, answers.stderr
    assert "the ACME CA at" in answers.stdout
    # Not an ACME directory (Pebble's root certificate): refused, naming the setting.
    wrong = check(f"https://{site.pebble.management}/roots/0")
    assert wrong.returncode == 1 and wrong.stderr.startswith("acme_directory: "), wrong.stderr
    # Nothing there: a warning (the gateway keeps trying), not a refusal.
    gone = check(f"https://127.0.0.1:{free_port()}/dir")
    assert gone.returncode == 0 and "warning: acme_directory: the CA at" in gone.stderr, gone.stderr
    assert "Traceback" not in answers.stderr + wrong.stderr + gone.stderr


def test_a_docker_auth_file_goes_with_acme(tmp_path: Path, users_file: Path) -> None:
    """Its token section is applied and the settings checked again: the pair ACME manages is no
    conflict then; a server certificate in the file still is, named as the file's."""
    from gateway import config, docker_auth, policyfile

    key = make_token_key(tmp_path / "token.key")
    acl = 'acl:\n  - match: {account: "admin"}\n    actions: ["*"]\n'
    tutorial = tmp_path / "auth_config.yml"
    tutorial.write_text(
        f'server:\n  addr: ":5001"\ntoken:\n  issuer: "Acme auth server"\n  key: {key}\n{acl}'
    )
    given = {
        "htpasswd": str(users_file),
        "acme_directory": "https://ca.test/dir",
        "acme_names": "registry.test",
        "acme_storage": str(tmp_path / "acme"),
        "redirect_listen": "127.0.0.1:8081",
    }
    settings = config.load(None, {}, {**given, "policy": str(tutorial)})
    applied = docker_auth.apply(settings, policyfile.load(tutorial))
    assert (applied.challenge, applied.token_issuer, applied.token_key) == ("bearer", "Acme auth server", key)
    assert applied.tls_cert == tmp_path / "acme" / "cert.pem"

    serving = tmp_path / "serving.yml"
    serving.write_text(f'server:\n  addr: ":5001"\n  certificate: /c.pem\n  key: /k.pem\n{acl}')
    settings = config.load(None, {}, {**given, "policy": str(serving)})
    with pytest.raises(docker_auth.DockerAuthError, match=r"tls_cert .*: not with acme_directory"):
        docker_auth.apply(settings, policyfile.load(serving))


@pytest.mark.parametrize(
    ("suggested_serial", "moment_days", "renewed_on_day"),
    [
        (None, None, 60),  # no suggestion: a third of the 90 days left
        (7, None, 60),  # the CA has no renewal info
        (7, 10, 10),  # the CA's moment, earlier than a third
        (7, 80, 80),  # or later
        (7, 120, 60),  # a moment after it expires: the third of its lifetime decides
        (8, 10, 60),  # a suggestion for another certificate says nothing of this one
    ],
)
def test_when_a_certificate_is_renewed(
    tmp_path: Path, suggested_serial: int | None, moment_days: int | None, renewed_on_day: int
) -> None:
    from gateway.acme.manager import CertificateManager, Suggestion
    from gateway.acme.ordering import Order
    from gateway.acme.storage import Storage, Stored

    issued = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    stored = Stored(issued, issued + dt.timedelta(days=90), frozenset({NAME}), serial=7)
    manager = CertificateManager(
        Order("https://ca.test/dir", [NAME], None, ["http-01"], None), Storage(tmp_path), dict
    )
    if suggested_serial is not None:
        moment = None if moment_days is None else issued + dt.timedelta(days=moment_days)
        manager.suggestion = Suggestion(suggested_serial, moment, issued + dt.timedelta(hours=6))
    assert manager.renew_at(stored) == issued + dt.timedelta(days=renewed_on_day)
