"""Real services the replica tests run beside the registry: Redis and HAProxy (Debian's
`redis-server` and `haproxy`), each on a free loopback port, in the foreground, stopped by PID by
the test that started it."""

from __future__ import annotations

import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import free_port, require


@dataclass
class Redis:
    port: int
    password_file: Path
    process: subprocess.Popen[bytes]
    log: Path
    config: Path

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def env(self) -> dict[str, str]:
        """The gateway's settings for this Redis."""
        return {"GATEWAY_REDIS_URL": self.url, "GATEWAY_REDIS_PASSWORD_FILE": str(self.password_file)}


def start_redis(tmp_path: Path, port: int | None = None, password: str = "redis-secret-0123") -> Redis:
    """redis-server in the foreground with a password (from a config file, never argv), nothing
    on disk."""
    port = port or free_port()
    password_file = tmp_path / "redis-password"
    password_file.write_text(password + "\n")
    config = tmp_path / f"redis-{port}.conf"
    config.write_text(
        f'bind 127.0.0.1\nport {port}\nsave ""\nappendonly no\ndaemonize no\nrequirepass "{password}"\n'
        f"dir {tmp_path}\n"
    )
    log = tmp_path / f"redis-{port}.log"
    with log.open("ab") as out:
        process = subprocess.Popen([require("redis-server"), str(config)], stdout=out, stderr=out)
    redis = Redis(port, password_file, process, log, config)
    _wait_for_redis(redis)
    return redis


def restart_redis(tmp_path: Path, redis: Redis) -> Redis:
    """The same Redis (port, password) started again, empty: what a restart without persistence is."""
    with redis.log.open("ab") as out:
        process = subprocess.Popen([require("redis-server"), str(redis.config)], stdout=out, stderr=out)
    again = Redis(redis.port, redis.password_file, process, redis.log, redis.config)
    _wait_for_redis(again)
    return again


def _wait_for_redis(redis: Redis) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if redis.process.poll() is not None:
            raise RuntimeError(f"redis-server exited:\n{redis.log.read_text()}")
        try:
            with socket.create_connection(("127.0.0.1", redis.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(64):  # -NOAUTH is an answer: it serves
                    return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"redis-server did not come up:\n{redis.log.read_text()}")


def stop_process(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass
class HAProxy:
    port: int
    process: subprocess.Popen[bytes]
    stats_socket: Path
    log: Path

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def command(self, line: str) -> str:
        """A command on HAProxy's stats socket (`set server gateways/g1 state drain`)."""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(self.stats_socket))
            sock.sendall(line.encode() + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def servers_up(self) -> dict[str, bool]:
        """Each gateway server's health as HAProxy sees it."""
        states: dict[str, bool] = {}
        for line in self.command("show stat").splitlines():
            fields = line.split(",")
            if len(fields) > 17 and fields[0] == "gateways" and fields[1] not in ("FRONTEND", "BACKEND"):
                states[fields[1]] = fields[17] == "UP"
        return states


def start_haproxy(
    tmp_path: Path, backends: list[int], ready_ports: list[int] | None = None, port: int | None = None
) -> HAProxy:
    """HAProxy in front of gateways on `backends` (loopback ports): round robin, health checks
    every 200 ms (each gateway's /readyz on `ready_ports`, its metrics_listen, else /v2/),
    X-Forwarded-For, timeouts long enough for big layers, and a stats socket for draining one."""
    port = port or free_port()
    stats = tmp_path / f"haproxy-{port}.sock"
    checks = ready_ports or backends
    servers = "\n".join(
        f"    server g{index} 127.0.0.1:{backend} check port {checks[index]} inter 200ms fall 2 rise 1"
        for index, backend in enumerate(backends)
    )
    check = "/readyz" if ready_ports else "/v2/"
    config = tmp_path / f"haproxy-{port}.cfg"
    config.write_text(
        f"""global
    stats socket {stats} mode 600 level admin
    maxconn 2000

defaults
    mode http
    timeout connect 2s
    timeout client 300s
    timeout server 300s
    timeout http-request 30s
    option forwardfor
    retries 2
    option redispatch

frontend registry
    bind 127.0.0.1:{port}
    default_backend gateways

backend gateways
    balance roundrobin
    option httpchk
    http-check send meth GET uri {check} ver HTTP/1.1 hdr Host gateway
    http-check expect rstatus ^(200|401)$
{servers}
"""
    )
    log = tmp_path / f"haproxy-{port}.log"
    with log.open("wb") as out:
        process = subprocess.Popen([require("haproxy"), "-db", "-f", str(config)], stdout=out, stderr=out)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"haproxy exited:\n{log.read_text()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.05)
    return HAProxy(port, process, stats, log)


@dataclass
class Pebble:
    """Let's Encrypt's test CA on loopback, with pebble-challtestsrv as its DNS (every name is
    127.0.0.1), validating on the ports the gateway answers challenges on."""

    directory: str
    management: str
    ca_file: Path  # the certificate of Pebble's own HTTPS: what acme_ca_file trusts
    process: subprocess.Popen[bytes]
    dns: subprocess.Popen[bytes]
    log: Path
    config: Path

    def root(self) -> bytes:
        """The root that signs the certificates Pebble issues (what clients then trust)."""
        import ssl
        import urllib.request

        context = ssl.create_default_context(cafile=str(self.ca_file))
        with urllib.request.urlopen(
            f"https://{self.management}/roots/0", context=context, timeout=10
        ) as answer:
            return bytes(answer.read())


def self_signed(tmp_path: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for `name`, localhost and 127.0.0.1, and its key."""
    from cryptography.hazmat.primitives.asymmetric import ec

    from tests import certificates

    key = ec.generate_private_key(ec.SECP256R1())
    cert = certificates.certificate(name, key, names=["localhost", name], addresses=["127.0.0.1"], ca=True)
    cert_path, key_path = tmp_path / f"{name}.crt", tmp_path / f"{name}.key"
    cert_path.write_bytes(certificates.pem(cert))
    key_path.write_bytes(certificates.key_pem(key))
    return cert_path, key_path


def start_pebble(
    tmp_path: Path,
    http_port: int,
    tls_port: int,
    validity: int | None = None,
    nonce_reject: int | None = None,
    address: str = "127.0.0.1",
) -> Pebble:
    """Pebble validating HTTP-01 on `http_port` and TLS-ALPN-01 on `tls_port` of `address`
    (what its DNS answers for every name); certificates valid `validity` seconds (its default
    otherwise)."""
    import json

    cert, key = self_signed(tmp_path, "pebble")
    port, management, dns_port, dns_management = free_port(), free_port(), free_port(), free_port()
    settings: dict[str, object] = {
        "listenAddress": f"127.0.0.1:{port}",
        "managementListenAddress": f"127.0.0.1:{management}",
        "certificate": str(cert),
        "privateKey": str(key),
        "httpPort": http_port,
        "tlsPort": tls_port,
        "ocspResponderURL": "",
        "externalAccountBindingRequired": False,
    }
    if validity is not None:
        settings["certificateValidityPeriod"] = validity
    config = tmp_path / f"pebble-{port}.json"
    config.write_text(json.dumps({"pebble": settings}))
    log = tmp_path / f"pebble-{port}.log"
    with log.open("ab") as out:
        dns = subprocess.Popen(
            [require("pebble-challtestsrv"), "-dns01", f"127.0.0.1:{dns_port}", "-defaultIPv4", address,
             "-defaultIPv6", "", "-http01", "", "-https01", "", "-tlsalpn01", "",
             "-management", f"127.0.0.1:{dns_management}"],
            stdout=out, stderr=out,
        )  # fmt: skip
        environment = {"PATH": "/usr/bin:/bin", "PEBBLE_VA_NOSLEEP": "1"}
        if nonce_reject is not None:
            environment["PEBBLE_WFE_NONCEREJECT"] = str(nonce_reject)
        process = subprocess.Popen(
            [require("pebble"), "-config", str(config), "-dnsserver", f"127.0.0.1:{dns_port}"],
            stdout=out,
            stderr=out,
            env=environment,
        )
    pebble = Pebble(
        f"https://127.0.0.1:{port}/dir", f"127.0.0.1:{management}", cert, process, dns, log, config
    )
    deadline = time.monotonic() + 20
    while True:
        try:
            pebble.root()
            return pebble
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                stop_process(process)
                stop_process(dns)
                raise RuntimeError(f"pebble did not come up:\n{log.read_text()}") from None
            time.sleep(0.05)


def restart_pebble(pebble: Pebble) -> Pebble:
    """The same Pebble (ports, config, DNS) started again: a new CA (new root), as Pebble keeps nothing."""
    with pebble.log.open("ab") as out:
        process = subprocess.Popen(
            [require("pebble"), "-config", str(pebble.config), "-dnsserver", _dns_of(pebble)],
            stdout=out,
            stderr=out,
            env={"PATH": "/usr/bin:/bin", "PEBBLE_VA_NOSLEEP": "1"},
        )
    again = Pebble(
        pebble.directory, pebble.management, pebble.ca_file, process, pebble.dns, pebble.log, pebble.config
    )
    deadline = time.monotonic() + 20
    while True:
        try:
            again.root()
            return again
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"pebble did not come up again:\n{pebble.log.read_text()}") from None
            time.sleep(0.05)


def _dns_of(pebble: Pebble) -> str:
    args = pebble.dns.args
    assert isinstance(args, list)
    return str(args[args.index("-dns01") + 1])


def stop_pebble(pebble: Pebble) -> None:
    stop_process(pebble.process)
    stop_process(pebble.dns)
