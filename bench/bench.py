"""Side-by-side benchmark: the registry directly, the nginx recipe, and registry-gateway, in one run.

    python bench/bench.py                 # full run, a few minutes; writes bench/results/latest.json
    python bench/bench.py --quick         # seconds-long smoke version; writes bench/results/quick.json
    python bench/bench.py --replicas 1,2,3  # only HAProxy -> registry and HAProxy -> N gateways
                                            # (one Redis shared); writes bench/results/replicas.json
    python bench/bench.py --caddy           # only Caddy (reverse_proxy, basicauth) and the gateway,
                                            # each over HTTP and TLS; writes bench/results/caddy.json

bench/results/ keeps two runs of the whole bench, reference.json and latest.json, and the latest
replicas and Caddy runs, replicas.json and caddy.json (git has the earlier ones). Each records the
commit it measured and the machine it ran on; compare figures from one run only.

Everything runs on this machine: Debian's docker-registry, nginx configured as the seed recipe
(auth_basic + auth_request, the same htpasswd file), and the gateway, measured in interleaved
rounds so that drift of the machine hits all three alike. Medians and ratios are printed as a
table and written as JSON. Load comes from `hey` (HEAD requests) and `curl` (blob transfers),
and from `skopeo copy --preserve-digests` for whole images.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime
import hashlib
import http.client
import ipaddress
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bcrypt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

ROOT = Path(__file__).resolve().parent.parent
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
USER, PASSWORD = "admin-bench", "bench-password-1"
READER = "reader"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def need(binary: str) -> str:
    # nginx lives in /usr/sbin, which is not on an ordinary user's PATH.
    path = shutil.which(binary, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    if path is None:
        raise SystemExit(
            f"bench: {binary} not found (bash scripts/bootstrap installs it; hey: apt-get install hey)"
        )
    return path


def wait_http(
    url: str,
    process: subprocess.Popen[bytes],
    log: Path,
    timeout: float = 30,
    context: ssl.SSLContext | None = None,
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"bench: {url} exited:\n{log.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(url, timeout=1, context=context).close()
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"bench: {url} did not start:\n{log.read_text()[-3000:]}")


@dataclass
class Service:
    name: str
    url: str
    process: subprocess.Popen[bytes]
    auth: bool

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@dataclass(frozen=True)
class TlsFiles:
    """A certificate (PEM) and its private key, for a server speaking HTTPS."""

    cert: Path
    key: Path


def write_tls_files(directory: Path) -> TlsFiles:
    """A self-signed ECDSA P-256 certificate for localhost and 127.0.0.1 (Caddy's default key type),
    valid for a day: one pair for every HTTPS server of a run, so that they do the same work."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    files = TlsFiles(directory / "cert.pem", directory / "key.pem")
    files.cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    # The gateway runs as the bench's user; Caddy too: the key need not be readable by others.
    files.key.chmod(0o600)
    return files


@dataclass
class Bench:
    work: Path
    quick: bool
    workers: int
    services: list[Service] = field(default_factory=list)

    def start(
        self,
        name: str,
        argv: list[str],
        url: str,
        auth: bool,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
        start_timeout: float = 30,
        ca_file: Path | None = None,
    ) -> Service:
        """`ca_file`: the certificate an HTTPS `url` is checked against while waiting for it."""
        log = self.work / f"{name}.log"
        environment = {**os.environ, **(env or {})}
        with log.open("ab") as out:
            process = subprocess.Popen(argv, stdout=out, stderr=out, cwd=cwd, env=environment)
        context = ssl.create_default_context(cafile=str(ca_file)) if ca_file else None
        wait_http(url + "/v2/", process, log, start_timeout, context)
        service = Service(name, url, process, auth)
        self.services.append(service)
        return service

    def stop_all(self) -> None:
        for service in reversed(self.services):
            service.stop()
        self.services.clear()

    def registry(self) -> Service:
        port = free_port()
        config = self.work / "registry.yml"
        config.write_text(
            "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\n"
            f"storage:\n  filesystem:\n    rootdirectory: {self.work / 'storage'}\n"
            "  delete:\n    enabled: true\n"
            f"http:\n  addr: 127.0.0.1:{port}\n"
        )
        return self.start(
            "registry",
            [need("docker-registry"), "serve", str(config)],
            f"http://127.0.0.1:{port}",
            auth=False,
        )

    def nginx(self, upstream: str, htpasswd: Path, tag: str) -> Service:
        prefix = self.work / f"nginx-{tag}"
        (prefix / "tmp").mkdir(parents=True, exist_ok=True)
        (prefix / "tmp").chmod(0o777)
        port = free_port()
        upstream_host = upstream.removeprefix("http://")
        temp = "\n".join(
            f"    {kind}_temp_path {prefix / 'tmp' / kind};"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        (prefix / "nginx.conf").write_text(f"""
worker_processes auto;
pid {prefix / "nginx.pid"};
error_log {prefix / "error.log"} warn;
events {{ worker_connections 4096; }}
http {{
{temp}
    access_log off;
    upstream docker-registry {{ server {upstream_host}; keepalive 32; }}
    map $upstream_http_docker_distribution_api_version $docker_distribution_api_version {{
        '' 'registry/2.0';
    }}
    server {{
        listen 127.0.0.1:{port};
        client_max_body_size 0;
        chunked_transfer_encoding on;
        location /v2/ {{
            auth_basic "Registry realm";
            auth_basic_user_file {htpasswd};
            auth_request /_auth;
            add_header 'Docker-Distribution-Api-Version' $docker_distribution_api_version always;
            proxy_pass http://docker-registry;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_set_header X-Real-IP $remote_addr;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_read_timeout 900;
            proxy_request_buffering off;
            proxy_buffering off;
        }}
        location = /_auth {{
            internal;
            if ($remote_user ~ ^admin) {{ return 200; }}
            if ($request_method ~ ^(GET|HEAD)$) {{ return 200; }}
            return 403;
        }}
    }}
}}
""")
        return self.start(
            f"nginx-{tag}",
            [need("nginx"), "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-g", "daemon off;"],
            f"http://127.0.0.1:{port}",
            auth=True,
        )

    def gateway(
        self,
        upstream: str,
        htpasswd: Path,
        tag: str,
        policy: Path | None = None,
        workers: int | None = None,
        env: dict[str, str] | None = None,
        tls: TlsFiles | None = None,
    ) -> Service:
        port = free_port()
        argv = [
            sys.executable,
            "-m",
            "gateway",
            "serve",
            "--listen",
            f"127.0.0.1:{port}",
            "--upstream",
            upstream,
            "--htpasswd",
            str(htpasswd),
        ]
        if policy is not None:
            argv += ["--policy", str(policy)]
        argv += ["--workers", str(workers or self.workers)]
        scheme = "http"
        if tls is not None:
            argv += ["--tls-cert", str(tls.cert), "--tls-key", str(tls.key)]
            scheme = "https"
        service = self.start(
            f"gateway-{tag}",
            argv,
            f"{scheme}://127.0.0.1:{port}",
            auth=True,
            cwd=ROOT,
            env=env,
            ca_file=tls.cert if tls else None,
        )
        return service

    def caddy(self, upstream: str, tag: str, users: dict[str, str] | None, tls: TlsFiles | None) -> Service:
        """Debian's Caddy 2 in front of `upstream` as docs/operations.md deploys it (`reverse_proxy`,
        streaming with `flush_interval -1`, a 15 min read timeout), behind `basicauth` (bcrypt
        hashes, which the Caddyfile's basicauth caches once checked, as the gateway caches a login)
        when `users` maps names to hashes. Served as https://localhost:PORT with the `tls` files, or
        http://localhost:PORT; no ACME (auto_https off), no admin endpoint, no log file (its own log
        goes to stderr, which the bench keeps in the run's temporary directory). Bound to 127.0.0.1."""
        port = free_port()
        home = self.work / f"caddy-{tag}"
        home.mkdir()
        scheme = "https" if tls else "http"
        tls_line = f"\ttls {tls.cert} {tls.key}\n" if tls else ""
        auth = ""
        if users:
            accounts = "".join(f"\t\t{user} {hashed}\n" for user, hashed in users.items())
            auth = f'\tbasicauth bcrypt "Registry realm" {{\n{accounts}\t}}\n'
        config = home / "Caddyfile"
        config.write_text(
            "{\n\tadmin off\n\tauto_https off\n}\n"
            f"{scheme}://localhost:{port} {{\n\tbind 127.0.0.1\n{tls_line}{auth}"
            f"\treverse_proxy {upstream.removeprefix('http://')} {{\n"
            "\t\tflush_interval -1\n\t\ttransport http {\n\t\t\tread_timeout 15m\n\t\t}\n\t}\n}\n"
        )
        # Caddy keeps its data (certificates, the autosaved config) under $XDG_DATA_HOME and
        # $XDG_CONFIG_HOME, else under $HOME: the run's own directory, never the host's.
        env = {"HOME": str(home), "XDG_DATA_HOME": str(home), "XDG_CONFIG_HOME": str(home)}
        return self.start(
            f"caddy-{tag}",
            [need("caddy"), "run", "--config", str(config), "--adapter", "caddyfile"],
            f"{scheme}://127.0.0.1:{port}",
            auth=bool(users),
            env=env,
            ca_file=tls.cert if tls else None,
        )

    def redis(self) -> tuple[Service, dict[str, str]]:
        """redis-server in the foreground, nothing on disk, with a password (in its config file and
        a file for the gateways, never argv); and the environment that points a gateway at it."""
        port = free_port()
        password = base64.urlsafe_b64encode(os.urandom(18)).decode()
        password_file = self.work / "redis-password"
        password_file.write_text(password + "\n")
        config = self.work / "redis.conf"
        config.write_text(
            f'bind 127.0.0.1\nport {port}\nsave ""\nappendonly no\ndaemonize no\n'
            f'requirepass "{password}"\ndir {self.work}\n'
        )
        config.chmod(0o600)
        log = self.work / "redis.log"
        with log.open("ab") as out:
            process = subprocess.Popen([need("redis-server"), str(config)], stdout=out, stderr=out)
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                raise SystemExit(f"bench: redis-server exited:\n{log.read_text()[-3000:]}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(64):  # -NOAUTH is an answer: it serves
                        break
            except OSError:
                if time.monotonic() > deadline:
                    tail = log.read_text()[-3000:]
                    raise SystemExit(f"bench: redis-server did not start:\n{tail}") from None
                time.sleep(0.05)
        service = Service("redis", f"redis://127.0.0.1:{port}/0", process, auth=False)
        self.services.append(service)
        environment = {"GATEWAY_REDIS_URL": service.url, "GATEWAY_REDIS_PASSWORD_FILE": str(password_file)}
        return service, environment

    def haproxy(self, backends: list[Service], tag: str, auth: bool) -> Service:
        """HAProxy (Debian's, its default threads) in front of `backends`: round robin per request,
        health checks on /v2/, X-Forwarded-For, keep-alive both ways, as a deployment runs it."""
        port = free_port()
        servers = "\n".join(
            f"    server s{index} {backend.url.removeprefix('http://')} check inter 1s"
            for index, backend in enumerate(backends)
        )
        config = self.work / f"haproxy-{tag}.cfg"
        stats = self.work / f"haproxy-{tag}.sock"
        config.write_text(f"""global
    maxconn 4096
    stats socket {stats} mode 600

defaults
    mode http
    timeout connect 2s
    timeout client 300s
    timeout server 300s
    timeout http-request 30s
    option forwardfor

frontend registry
    bind 127.0.0.1:{port}
    default_backend upstream

backend upstream
    balance roundrobin
    option httpchk
    # HTTP/1.1 with a Host: the gateway refuses a request without one (400), as HTTP/1.1 says.
    http-check send meth GET uri /v2/ ver HTTP/1.1 hdr Host localhost
    http-check expect status 200,401
{servers}
""")
        service = self.start(
            f"haproxy-{tag}",
            [need("haproxy"), "-db", "-f", str(config)],
            f"http://127.0.0.1:{port}",
            auth=auth,
        )
        # HAProxy answers 503 until a server's first health check passes: wait for all of them.
        deadline = time.monotonic() + 30
        while (up := haproxy_servers_up(stats)) < len(backends):
            if time.monotonic() > deadline:
                raise SystemExit(f"bench: haproxy-{tag}: {up} of {len(backends)} servers up after 30 s")
            time.sleep(0.1)
        return service


def haproxy_servers_up(stats_socket: Path) -> int:
    """How many servers HAProxy's stats socket (`show stat`, CSV) reports UP."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(5)
        sock.connect(str(stats_socket))
        sock.sendall(b"show stat\n")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    rows = answer.decode().splitlines()
    header = rows[0].lstrip("# ").split(",")
    entries = [dict(zip(header, row.split(","), strict=False)) for row in rows[1:] if row]
    return sum(
        1 for e in entries if e.get("svname") not in ("FRONTEND", "BACKEND") and e.get("status") == "UP"
    )


# --- fixtures on disk ---------------------------------------------------------------------------


def write_htpasswd(path: Path, cost: int, extra_users: int = 0) -> None:
    """The bench user (and a reader) with real hashes, plus `extra_users` sharing one hash."""
    lines = [
        f"{USER}:{bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(cost)).decode()}",
        f"{READER}:{bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(cost)).decode()}",
    ]
    filler = bcrypt.hashpw(b"filler", bcrypt.gensalt(4)).decode()
    lines += [f"user{i:06d}:{filler}" for i in range(extra_users)]
    # The bench user last: nginx scans the file top to bottom on every request.
    lines.append(lines.pop(0))
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o644)


def write_policy(path: Path, rules: int) -> None:
    """`rules` entries, the one that matches the bench user last (the worst case for first-match)."""
    entries = [
        f'  - match: {{account: "user{i:06d}", name: "team{i}/*"}}\n    actions: [pull, push]\n'
        for i in range(rules - 1)
    ]
    entries.append(f'  - match: {{account: "{USER}"}}\n    actions: ["*"]\n')
    path.write_text("acl:\n" + "".join(entries))


def random_file(path: Path, mib: int) -> str:
    block = os.urandom(1 << 20)
    digest = hashlib.sha256()
    with path.open("wb") as out:
        for i in range(mib):
            chunk = i.to_bytes(8, "big") + block[8:]
            digest.update(chunk)
            out.write(chunk)
    return "sha256:" + digest.hexdigest()


def write_big_image(layout: Path, layer: Path, layer_digest: str, tag: str) -> None:
    """An OCI layout whose single (uncompressed) layer is `layer`, hard-linked in."""
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    target = blobs / layer_digest.removeprefix("sha256:")
    if not target.exists():
        os.link(layer, target)

    def put(data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return f"sha256:{digest}"

    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
        }
    ).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": MANIFEST_TYPE,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": put(config),
                "size": len(config),
            },
            "layers": [
                {
                    "mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": layer_digest,
                    "size": layer.stat().st_size,
                }
            ],
        }
    ).encode()
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (layout / "index.json").write_text(
        json.dumps(
            {
                "schemaVersion": 2,
                "manifests": [
                    {
                        "mediaType": MANIFEST_TYPE,
                        "digest": put(manifest),
                        "size": len(manifest),
                        "annotations": {"org.opencontainers.image.ref.name": tag},
                    }
                ],
            }
        )
    )


# --- measurements -------------------------------------------------------------------------------


def basic(user: str = USER) -> str:
    return "Basic " + base64.b64encode(f"{user}:{PASSWORD}".encode()).decode()


@dataclass
class HeyResult:
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int


def hey(
    url: str,
    auth: bool,
    conns: int,
    seconds: float,
    authorization: str | None = None,
    keepalive: bool = True,
    method: str = "HEAD",
    host: str | None = None,
) -> HeyResult:
    """`keepalive` False: a connection per request, each with `Connection: close` (Go's client
    sends it when keep-alive is off), as skopeo and podman send every request. `host`: the Host
    header, which hey also sends as the TLS server name (else the URL's host *with its port*, a
    name no certificate holds: Caddy answers such a handshake with an alert). hey checks no
    certificate (InsecureSkipVerify), so a self-signed one needs nothing more."""
    argv = [
        need("hey"),
        "-z",
        f"{seconds}s",
        "-c",
        str(conns),
        "-m",
        method,
        "-H",
        f"Accept: {MANIFEST_TYPE}",
    ]
    if auth:
        argv += ["-H", f"Authorization: {authorization or basic()}"]
    if not keepalive:
        argv.append("-disable-keepalive")
    if host is not None:
        argv += ["-host", host]
    out = subprocess.run([*argv, url], capture_output=True, text=True, timeout=seconds + 120).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = re.search(r"50% in ([\d.]+) secs", out)
    p99 = re.search(r"99% in ([\d.]+) secs", out)
    statuses = dict(re.findall(r"\[(\d+)\]\s+(\d+) responses", out))
    ok = int(statuses.pop("200", 0))
    errors = sum(int(v) for v in statuses.values()) + len(re.findall(r"Error distribution", out))
    if ok == 0:
        raise SystemExit(f"bench: no successful request to {url}:\n{out[-2000:]}")
    return HeyResult(
        rps, float(p50.group(1)) * 1000 if p50 else 0.0, float(p99.group(1)) * 1000 if p99 else 0.0, errors
    )


def median_of(results: list[HeyResult]) -> dict[str, float]:
    return {
        "rps": statistics.median(r.rps for r in results),
        "p50_ms": statistics.median(r.p50_ms for r in results),
        "p99_ms": statistics.median(r.p99_ms for r in results),
        "errors": sum(r.errors for r in results),
    }


def curl_pull(url: str, auth: bool) -> float:
    """Download a URL to /dev/null; bytes per second."""
    argv = [need("curl"), "-sS", "-f", "-o", "/dev/null", "-w", "%{speed_download}"]
    if auth:
        argv += ["-H", f"Authorization: {basic()}"]
    result = subprocess.run([*argv, url], capture_output=True, text=True, timeout=900, check=True)
    return float(result.stdout)


def start_upload(base: str, repository: str, auth: bool) -> str:
    host = base.removeprefix("http://")
    conn = http.client.HTTPConnection(host, timeout=60)
    headers = {"Authorization": basic()} if auth else {}
    conn.request("POST", f"/v2/{repository}/blobs/uploads/", body=b"", headers=headers)
    response = conn.getresponse()
    response.read()
    location = response.getheader("Location") or ""
    conn.close()
    if response.status != 202:
        raise SystemExit(f"bench: upload start answered {response.status}")
    return location if location.startswith("http") else base + location


def curl_push(base: str, repository: str, blob: Path, digest: str, auth: bool) -> float:
    """A monolithic blob upload (POST, then PUT of the whole file); bytes per second of the PUT."""
    location = start_upload(base, repository, auth)
    separator = "&" if "?" in location else "?"
    argv = [
        need("curl"),
        "-sS",
        "-f",
        "-X",
        "PUT",
        "-T",
        str(blob),
        "-o",
        "/dev/null",
        "-w",
        "%{speed_upload}",
        "-H",
        "Content-Type: application/octet-stream",
    ]
    if auth:
        argv += ["-H", f"Authorization: {basic()}"]
    result = subprocess.run(
        [*argv, f"{location}{separator}digest={digest}"],
        capture_output=True,
        text=True,
        timeout=900,
        check=True,
    )
    return float(result.stdout)


def skopeo_time(argv: list[str], auth_file: Path) -> float:
    started = time.monotonic()
    subprocess.run(
        [
            need("skopeo"),
            "--insecure-policy",
            "copy",
            "--preserve-digests",
            "--src-tls-verify=false",
            "--dest-tls-verify=false",
            "--authfile",
            str(auth_file),
            *argv,
        ],
        check=True,
        capture_output=True,
        timeout=900,
    )
    return time.monotonic() - started


def process_tree(pid: int) -> list[int]:
    pids = [pid]
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        pids.extend(process_tree(int(child)))
    return pids


def rss_kib(pid: int) -> int:
    total = 0
    for member in process_tree(pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{member}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total


def client_cpu_seconds() -> float:
    """CPU the bench's own finished children (curl, hey, skopeo) have used."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def cpu_seconds(pid: int) -> float:
    ticks = 0
    for member in process_tree(pid):
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{member}/stat").read_text().rpartition(")")[2].split()
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def peak_rss(pid: int) -> Iterator[dict[str, int]]:
    peak = {"kib": rss_kib(pid)}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak["kib"] = max(peak["kib"], rss_kib(pid))
            time.sleep(0.02)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield peak
    finally:
        stop.set()
        thread.join()


# --- the run ------------------------------------------------------------------------------------


def seed_manifest(registry: Service, work: Path) -> None:
    from gateway.sample_image import write_image

    layout = work / "seed-image"
    write_image(layout, "1", layers=1, layer_bytes=1000)
    auth = work / "auth-none.json"
    auth.write_text('{"auths": {}}')
    skopeo_time([f"oci:{layout}:1", f"docker://{registry.url.removeprefix('http://')}/bench/app:1"], auth)


def ratio(value: float, reference: float) -> float | None:
    """value / reference; None when the reference measured zero (a run shorter than one CPU tick)."""
    return value / reference if reference > 0 else None


def shown(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def write_plain_htpasswd(path: Path) -> None:
    """nginx's cheapest password scheme, `{PLAIN}`: the floor of what the nginx recipe can cost."""
    path.write_text(f"{USER}:{{PLAIN}}{PASSWORD}\n{READER}:{{PLAIN}}{PASSWORD}\n")


def measured_hey(
    target: Service,
    url_path: str,
    conns: int,
    seconds: float,
    authorization: str | None = None,
    keepalive: bool = True,
    method: str = "HEAD",
) -> tuple[HeyResult, float]:
    """One hey run, and the CPU the target's process tree spent on it per request, in µs."""
    before = cpu_seconds(target.process.pid)
    result = hey(target.url + url_path, target.auth, conns, seconds, authorization, keepalive, method)
    used = cpu_seconds(target.process.pid) - before
    return result, used / max(1.0, result.rps * seconds) * 1e6


def bench_head(b: Bench, registry: Service, rounds: int, seconds: float) -> dict[str, Any]:
    """Authenticated HEAD manifest: the registry direct, the nginx recipe with bcrypt (as deployed)
    and with `{PLAIN}` passwords (nginx at its cheapest), and the gateway, interleaved in rounds,
    with the CPU per request of each one's process tree."""
    results: dict[str, Any] = {}
    url_path = "/v2/bench/app/manifests/1"
    plain = b.work / "htpasswd-plain"
    write_plain_htpasswd(plain)
    nginx_plain = b.nginx(registry.url, plain, "plain")
    for cost in (10, 5):
        htpasswd = b.work / f"htpasswd-cost{cost}"
        write_htpasswd(htpasswd, cost)
        targets = {
            "registry": registry,
            "nginx": b.nginx(registry.url, htpasswd, f"c{cost}"),
            "nginx_plain": nginx_plain,
            "gateway": b.gateway(registry.url, htpasswd, f"c{cost}"),
        }
        for conns in (2, 32):
            runs: dict[str, list[HeyResult]] = {name: [] for name in targets}
            cpu: dict[str, list[float]] = {name: [] for name in targets}
            for _ in range(rounds):
                for name, target in targets.items():
                    result, per_request = measured_hey(target, url_path, conns, seconds)
                    runs[name].append(result)
                    cpu[name].append(per_request)
            summary: dict[str, Any] = {
                name: {**median_of(runs[name]), "cpu_us_per_request": statistics.median(cpu[name])}
                for name in targets
            }
            summary["ratios"] = {
                "gateway_vs_nginx": summary["gateway"]["rps"] / summary["nginx"]["rps"],
                "gateway_vs_direct": summary["gateway"]["rps"] / summary["registry"]["rps"],
                "nginx_vs_direct": summary["nginx"]["rps"] / summary["registry"]["rps"],
                "nginx_plain_vs_direct": summary["nginx_plain"]["rps"] / summary["registry"]["rps"],
                "gateway_added_p50_ms": summary["gateway"]["p50_ms"] - summary["registry"]["p50_ms"],
                "nginx_added_p50_ms": summary["nginx"]["p50_ms"] - summary["registry"]["p50_ms"],
                "nginx_plain_added_p50_ms": summary["nginx_plain"]["p50_ms"] - summary["registry"]["p50_ms"],
                "gateway_cpu_vs_nginx_plain": ratio(
                    summary["gateway"]["cpu_us_per_request"], summary["nginx_plain"]["cpu_us_per_request"]
                ),
            }
            results[f"cost{cost}_c{conns}"] = summary
        for name in ("nginx", "gateway"):
            targets[name].stop()
            b.services.remove(targets[name])
    nginx_plain.stop()
    b.services.remove(nginx_plain)
    return results


def bench_token(b: Bench, registry: Service, rounds: int, seconds: float) -> dict[str, Any]:
    """HEAD manifest at 2 connections: Basic credentials (login cache warm) beside a Bearer token
    the gateway issued (token cache warm), both with one worker, and nginx with `{PLAIN}` passwords
    as the reference, with CPU per request for each; then Basic and nginx `{PLAIN}` again with a
    connection per request (`Connection: close`, as skopeo and podman send); and GET of the
    manifest (its body too, as every pull asks for it), Basic and nginx `{PLAIN}`."""
    htpasswd = b.work / "htpasswd-token"
    write_htpasswd(htpasswd, 10)
    plain = b.work / "htpasswd-token-plain"
    write_plain_htpasswd(plain)
    url_path = "/v2/bench/app/manifests/1"
    basic_gateway = b.gateway(registry.url, htpasswd, "basic", workers=1)
    bearer_gateway = b.gateway(
        registry.url, htpasswd, "bearer", workers=1, env={"GATEWAY_CHALLENGE": "bearer"}
    )
    # The same with every request on aiohttp's full path: what the fast path saves.
    full_path_gateway = b.gateway(
        registry.url, htpasswd, "full-path", workers=1, env={"GATEWAY_FAST_PATH": "false"}
    )
    nginx_plain = b.nginx(registry.url, plain, "token-plain")
    request = urllib.request.Request(
        f"{bearer_gateway.url}/token?service=registry-gateway&scope=repository:bench/app:pull",
        headers={"Authorization": basic()},
    )
    with urllib.request.urlopen(request) as response:
        token = json.loads(response.read())["token"]
    modes = {
        "basic": (basic_gateway, basic(), True, "HEAD"),
        "bearer": (bearer_gateway, f"Bearer {token}", True, "HEAD"),
        "basic_full_path": (full_path_gateway, basic(), True, "HEAD"),
        "nginx_plain": (nginx_plain, basic(), True, "HEAD"),
        "basic_new_connections": (basic_gateway, basic(), False, "HEAD"),
        "nginx_plain_new_connections": (nginx_plain, basic(), False, "HEAD"),
        "basic_get": (basic_gateway, basic(), True, "GET"),
        "nginx_plain_get": (nginx_plain, basic(), True, "GET"),
    }
    runs: dict[str, list[HeyResult]] = {mode: [] for mode in modes}
    cpu: dict[str, list[float]] = {mode: [] for mode in modes}
    for _ in range(rounds):
        for mode, (target, authorization, keepalive, method) in modes.items():
            result, per_request = measured_hey(target, url_path, 2, seconds, authorization, keepalive, method)
            runs[mode].append(result)
            cpu[mode].append(per_request)
    summary: dict[str, Any] = {}
    for mode in modes:
        summary[mode] = {**median_of(runs[mode]), "cpu_us_per_request": statistics.median(cpu[mode])}
    summary["bearer_vs_basic_rps"] = summary["bearer"]["rps"] / summary["basic"]["rps"]
    for mode in ("basic", "bearer", "basic_full_path"):
        summary[f"{mode}_cpu_vs_nginx_plain"] = ratio(
            summary[mode]["cpu_us_per_request"], summary["nginx_plain"]["cpu_us_per_request"]
        )
    summary["basic_new_connections_cpu_vs_nginx_plain"] = ratio(
        summary["basic_new_connections"]["cpu_us_per_request"],
        summary["nginx_plain_new_connections"]["cpu_us_per_request"],
    )
    summary["basic_get_cpu_vs_nginx_plain"] = ratio(
        summary["basic_get"]["cpu_us_per_request"], summary["nginx_plain_get"]["cpu_us_per_request"]
    )
    for target in {id(target): target for target, _, _, _ in modes.values()}.values():
        target.stop()
        b.services.remove(target)
    return summary


PULLS_PER_ROUND = 3


def bench_transfer(b: Bench, registry: Service, mib: int, rounds: int, use_skopeo: bool) -> dict[str, Any]:
    htpasswd = b.work / "htpasswd-transfer"
    write_htpasswd(htpasswd, 5)
    targets = [registry, b.nginx(registry.url, htpasswd, "xfer"), b.gateway(registry.url, htpasswd, "xfer")]
    blob = b.work / "blob.bin"
    digest = random_file(blob, mib)
    size = blob.stat().st_size
    curl_push(registry.url, "bench/blob", blob, digest, auth=False)
    pull: dict[str, list[float]] = {}
    push: dict[str, list[float]] = {}
    pull_cpu: dict[str, list[float]] = {}
    pull_all_cpu: dict[str, list[float]] = {}
    push_cpu: dict[str, list[float]] = {}
    gigabytes = size / 1e9
    for _ in range(rounds):
        # A pull takes a fraction of a second, so one per round is at the mercy of a single hiccup
        # of the machine: PULLS_PER_ROUND of them, interleaved over the targets.
        for _ in range(PULLS_PER_ROUND):
            for target in targets:
                name = target.name.split("-")[0]
                before = cpu_seconds(target.process.pid)
                # Everything the pull costs the machine: the registry's CPU, the proxy's, curl's.
                before_all = client_cpu_seconds() + cpu_seconds(registry.process.pid)
                pull.setdefault(name, []).append(
                    curl_pull(f"{target.url}/v2/bench/blob/blobs/{digest}", target.auth)
                )
                used = cpu_seconds(target.process.pid) - before
                pull_cpu.setdefault(name, []).append(used / gigabytes)
                used_all = client_cpu_seconds() + cpu_seconds(registry.process.pid) - before_all
                if target is not registry:
                    used_all += used
                pull_all_cpu.setdefault(name, []).append(used_all / gigabytes)
        for target in targets:
            name = target.name.split("-")[0]
            before = cpu_seconds(target.process.pid)
            push.setdefault(name, []).append(
                curl_push(target.url, f"bench/push-{name}", blob, digest, target.auth)
            )
            push_cpu.setdefault(name, []).append((cpu_seconds(target.process.pid) - before) / gigabytes)
    result: dict[str, Any] = {
        "blob_mib": mib,
        "pull_MBps": {k: statistics.median(v) / 1e6 for k, v in pull.items()},
        "push_MBps": {k: statistics.median(v) / 1e6 for k, v in push.items()},
        # CPU seconds per GB moved, each process tree (the registry's own work included in its row)
        "pull_cpu_s_per_GB": {k: statistics.median(v) for k, v in pull_cpu.items()},
        "push_cpu_s_per_GB": {k: statistics.median(v) for k, v in push_cpu.items()},
        # The registry, the proxy and curl together, and what the machine's cores could move at
        # that cost if all three ran all the time: the ceiling of a pull rate on this machine.
        "pull_all_cpu_s_per_GB": {k: statistics.median(v) for k, v in pull_all_cpu.items()},
    }
    cores = os.cpu_count() or 1
    result["pull_ceiling_MBps"] = {k: cores / v * 1e3 for k, v in result["pull_all_cpu_s_per_GB"].items()}
    result["ratios"] = {
        "pull_gateway_vs_nginx": result["pull_MBps"]["gateway"] / result["pull_MBps"]["nginx"],
        "pull_gateway_vs_direct": result["pull_MBps"]["gateway"] / result["pull_MBps"]["registry"],
        "push_gateway_vs_direct": result["push_MBps"]["gateway"] / result["push_MBps"]["registry"],
        "push_nginx_vs_direct": result["push_MBps"]["nginx"] / result["push_MBps"]["registry"],
        "pull_gateway_ceiling_vs_direct": (
            result["pull_ceiling_MBps"]["gateway"] / result["pull_MBps"]["registry"]
        ),
    }
    if use_skopeo:
        auth_file = b.work / "auth.json"
        auth_file.write_text(
            json.dumps(
                {
                    "auths": {
                        t.url.removeprefix("http://"): {
                            "auth": base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
                        }
                        for t in targets[1:]
                    }
                }
            )
        )
        skopeo_push: dict[str, list[float]] = {}
        skopeo_pull: dict[str, list[float]] = {}
        for round_index in range(rounds):
            for target in targets:
                name = target.name.split("-")[0]
                host = target.url.removeprefix("http://")
                # A layer of its own for every push: a layer the registry already has anywhere would
                # be mounted or skipped by skopeo, and nothing would be measured.
                layer = b.work / f"skopeo-layer-{name}-{round_index}.bin"
                layer_digest = random_file(layer, mib)
                layout = b.work / f"skopeo-image-{name}-{round_index}"
                write_big_image(layout, layer, layer_digest, "1")
                repo = f"bench/skopeo-{name}-{round_index}"
                seconds = skopeo_time([f"oci:{layout}:1", f"docker://{host}/{repo}:1"], auth_file)
                skopeo_push.setdefault(name, []).append(size / seconds / 1e6)
                shutil.rmtree(layout)
                layer.unlink()
                out = b.work / f"pulled-{name}"
                shutil.rmtree(out, ignore_errors=True)
                seconds = skopeo_time([f"docker://{host}/{repo}:1", f"oci:{out}:1"], auth_file)
                skopeo_pull.setdefault(name, []).append(size / seconds / 1e6)
                shutil.rmtree(out, ignore_errors=True)
        result["skopeo_push_MBps"] = {k: statistics.median(v) for k, v in skopeo_push.items()}
        result["skopeo_pull_MBps"] = {k: statistics.median(v) for k, v in skopeo_pull.items()}
    blob.unlink()
    for target in targets[1:]:
        target.stop()
        b.services.remove(target)
    return result


def bench_memory(b: Bench, registry: Service, big_mib: int, small_mib: int) -> dict[str, Any]:
    htpasswd = b.work / "htpasswd-memory"
    write_htpasswd(htpasswd, 5)
    gateway = b.gateway(registry.url, htpasswd, "memory", workers=1)
    pid = gateway.process.pid
    for _ in range(20):  # warm up: first connections, the credential cache
        curl_pull(f"{gateway.url}/v2/", auth=True)
    result: dict[str, Any] = {"baseline_rss_mib": rss_kib(pid) / 1024}
    for label, mib in (("small", small_mib), ("big", big_mib)):
        blob = b.work / f"mem-{label}.bin"
        digest = random_file(blob, mib)
        cpu_before = cpu_seconds(pid)
        with peak_rss(pid) as push_peak:
            curl_push(gateway.url, f"bench/mem-{label}", blob, digest, auth=True)
        with peak_rss(pid) as pull_peak:
            curl_pull(f"{gateway.url}/v2/bench/mem-{label}/blobs/{digest}", auth=True)
        cpu = cpu_seconds(pid) - cpu_before
        gb = 2 * blob.stat().st_size / 1e9
        result[label] = {
            "mib": mib,
            "push_peak_rss_mib": push_peak["kib"] / 1024,
            "pull_peak_rss_mib": pull_peak["kib"] / 1024,
            "cpu_seconds_per_GB": cpu / gb,
        }
        blob.unlink()
    result["big_minus_small_peak_mib"] = max(
        result["big"]["push_peak_rss_mib"], result["big"]["pull_peak_rss_mib"]
    ) - max(result["small"]["push_peak_rss_mib"], result["small"]["pull_peak_rss_mib"])
    gateway.stop()
    b.services.remove(gateway)
    return result


def bench_scaling(
    b: Bench, registry: Service, user_counts: list[int], rule_counts: list[int], rounds: int, seconds: float
) -> dict[str, Any]:
    url_path = "/v2/bench/app/manifests/1"
    results: dict[str, Any] = {"users": {}, "rules": {}}

    def measure(targets: list[Service]) -> dict[str, dict[str, float]]:
        runs: dict[str, list[HeyResult]] = {t.name: [] for t in targets}
        for _ in range(rounds):
            for target in targets:
                runs[target.name].append(hey(target.url + url_path, True, 32, seconds))
        return {name: median_of(r) for name, r in runs.items()}

    # All configurations run at once and are measured in interleaved rounds, so that drift of the
    # machine during the run does not pass for an effect of the user or rule count.
    user_targets: dict[int, list[Service]] = {}
    for count in user_counts:
        htpasswd = b.work / f"htpasswd-{count}"
        write_htpasswd(htpasswd, 5, extra_users=max(0, count - 2))
        user_targets[count] = [
            b.nginx(registry.url, htpasswd, f"u{count}"),
            b.gateway(registry.url, htpasswd, f"u{count}"),
        ]
    htpasswd = b.work / "htpasswd-rules"
    write_htpasswd(htpasswd, 5)
    rule_targets: dict[int, Service] = {}
    for count in rule_counts:
        policy = b.work / f"policy-{count}.yml"
        write_policy(policy, count)
        rule_targets[count] = b.gateway(registry.url, htpasswd, f"r{count}", policy=policy)
    everything = [t for ts in user_targets.values() for t in ts] + list(rule_targets.values())
    runs = measure(everything)
    for count, (nginx, gateway) in user_targets.items():
        results["users"][str(count)] = {"nginx": runs[nginx.name], "gateway": runs[gateway.name]}
    for count, gateway in rule_targets.items():
        results["rules"][str(count)] = {"gateway": runs[gateway.name]}
    for target in everything:
        target.stop()
        b.services.remove(target)
    base_users = results["users"][str(user_counts[0])]["gateway"]["rps"]
    base_rules = results["rules"][str(rule_counts[0])]["gateway"]["rps"]
    results["ratios"] = {
        "users_max_vs_min": results["users"][str(user_counts[-1])]["gateway"]["rps"] / base_users,
        "rules_max_vs_min": results["rules"][str(rule_counts[-1])]["gateway"]["rps"] / base_rules,
    }
    return results


# --- replicas behind HAProxy --------------------------------------------------------------------


@dataclass
class ReplicaTarget:
    """What hey talks to (`front`) and every process a request through it costs CPU in."""

    label: str
    front: Service
    parts: dict[str, list[Service]]


def warm_up(target: Service, url_path: str, requests: int) -> None:
    """Requests until every replica has seen a few: the first login on each gateway is a bcrypt
    check (its login cache is its own), and connections to the backends get opened."""
    for _ in range(requests):
        request = urllib.request.Request(target.url + url_path, method="HEAD")
        request.add_header("Accept", MANIFEST_TYPE)
        if target.auth:
            request.add_header("Authorization", basic())
        with urllib.request.urlopen(request, timeout=30) as response:
            if response.status != 200:
                raise SystemExit(f"bench: warm-up of {target.name} answered {response.status}")


def machine_busy_seconds() -> float:
    """CPU seconds all cores of the machine spent on anything but idling, from /proc/stat."""
    # cpu  user nice system idle iowait irq softirq steal ...: all but idle and iowait.
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    busy = sum(fields) - fields[3] - fields[4]
    return busy / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds(services: list[Service]) -> float:
    """CPU the bench has spent: this process, its finished children (hey) and its servers."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    servers = sum(cpu_seconds(s.process.pid) for s in services)
    return usage.ru_utime + usage.ru_stime + client_cpu_seconds() + servers


def parts_cpu(parts: dict[str, list[Service]]) -> dict[str, float]:
    return {part: sum(cpu_seconds(s.process.pid) for s in services) for part, services in parts.items()}


def bench_replicas(
    b: Bench, registry: Service, replica_counts: list[int], rounds: int, seconds: float, conns_list: list[int]
) -> dict[str, Any]:
    """HEAD manifest against one registry: direct, through HAProxy alone (the cost of the hop), and
    through HAProxy in front of 1, 2, 3... gateways (one worker each, one Redis shared, Basic
    credentials with the login cached), all started at once and measured in interleaved rounds,
    with the CPU per request of every process involved and of the gateways alone."""
    url_path = "/v2/bench/app/manifests/1"
    htpasswd = b.work / "htpasswd-replicas"
    write_htpasswd(htpasswd, 10)
    redis, redis_env = b.redis()
    # As deployed behind a proxy: the gateways believe HAProxy's X-Forwarded-For.
    gateway_env = {**redis_env, "GATEWAY_TRUSTED_PROXIES": "127.0.0.1"}
    hop = b.haproxy([registry], "registry", auth=False)
    targets = [
        ReplicaTarget("direct", registry, {"registry": [registry]}),
        ReplicaTarget("haproxy_registry", hop, {"haproxy": [hop], "registry": [registry]}),
    ]
    started: list[Service] = [redis, hop]
    for count in replica_counts:
        gateways = [
            b.gateway(registry.url, htpasswd, f"replica{count}-{index}", workers=1, env=gateway_env)
            for index in range(count)
        ]
        front = b.haproxy(gateways, f"gateways{count}", auth=True)
        started += [*gateways, front]
        targets.append(
            ReplicaTarget(
                f"haproxy_gateways_{count}",
                front,
                {"haproxy": [front], "gateways": gateways, "registry": [registry], "redis": [redis]},
            )
        )
    for target in targets:
        warm_up(target.front, url_path, 4 * max(replica_counts))
    results: dict[str, Any] = {
        "replica_counts": replica_counts,
        "cpus": os.cpu_count(),
        "note": scaling_note(max(replica_counts)),
    }
    # The machine is shared: what other work took of its cores while the rounds ran is measured
    # (all busy CPU minus the bench's own), as the load average cannot tell the two apart.
    wall_before, busy_before = time.monotonic(), machine_busy_seconds()
    own_before = own_cpu_seconds(b.services)
    for conns in conns_list:
        runs: dict[str, list[HeyResult]] = {t.label: [] for t in targets}
        cpu: dict[str, dict[str, list[float]]] = {t.label: {} for t in targets}
        for _ in range(rounds):
            for target in targets:
                before = parts_cpu(target.parts)
                client_before = client_cpu_seconds()
                result = hey(target.front.url + url_path, target.front.auth, conns, seconds)
                client = client_cpu_seconds() - client_before
                after = parts_cpu(target.parts)
                requests = max(1.0, result.rps * seconds)
                per_request = {part: (after[part] - before[part]) / requests * 1e6 for part in before}
                # Everything the servers spent (hey, the load, apart: it is not part of a deployment).
                per_request["all"] = sum(per_request.values())
                per_request["client"] = client / requests * 1e6
                runs[target.label].append(result)
                for part, value in per_request.items():
                    cpu[target.label].setdefault(part, []).append(value)
        summary: dict[str, Any] = {}
        for target in targets:
            summary[target.label] = {
                **median_of(runs[target.label]),
                "cpu_us_per_request": {
                    part: statistics.median(values) for part, values in cpu[target.label].items()
                },
            }
        direct, hop_only = summary["direct"], summary["haproxy_registry"]
        for s in summary.values():
            s["ratios"] = {
                "rps_vs_direct": s["rps"] / direct["rps"],
                "rps_vs_haproxy_registry": s["rps"] / hop_only["rps"],
                "cpu_all_vs_direct": ratio(
                    s["cpu_us_per_request"]["all"], direct["cpu_us_per_request"]["all"]
                ),
                "cpu_all_vs_haproxy_registry": ratio(
                    s["cpu_us_per_request"]["all"], hop_only["cpu_us_per_request"]["all"]
                ),
                "added_p50_ms_vs_direct": s["p50_ms"] - direct["p50_ms"],
            }
        results[f"c{conns}"] = summary
    wall = time.monotonic() - wall_before
    others = (machine_busy_seconds() - busy_before) - (own_cpu_seconds(b.services) - own_before)
    results["other_work_cores"] = max(0.0, others / wall)
    for service in reversed(started):
        service.stop()
        b.services.remove(service)
    return results


def scaling_note(most_replicas: int) -> str:
    cores = os.cpu_count() or 1
    return (
        f"{most_replicas} gateway replicas on {cores} cores, shared with the registry, HAProxy, Redis "
        "and hey: these figures measure the hop and the sharing, not scaling (replicas add throughput "
        "only with cores of their own)"
    )


def replica_label(label: str) -> str:
    if label == "direct":
        return "registry direct"
    if label == "haproxy_registry":
        return "HAProxy -> registry"
    count = int(label.rpartition("_")[2])
    return f"HAProxy -> {count} gateway{'s' if count > 1 else ''}"


def replicas_table(results: dict[str, Any]) -> str:
    lines = [""]
    for key in (k for k in results if re.fullmatch(r"c\d+", k)):
        summary = results[key]
        lines.append(
            f"== replicas behind HAProxy: HEAD manifest, {key[1:]} connections (median of rounds); "
            "CPU us per request =="
        )
        lines.append(
            f"{'target':<24}{'req/s':>8}{'p50 ms':>8}{'cpu all':>9}{'gateways':>9}{'haproxy':>9}"
            f"{'registry':>9}{'redis':>7}{'rps/hop':>9}{'rps/direct':>11}{'cpu/hop':>9}{'cpu/direct':>11}"
        )
        for label, s in summary.items():
            c, r = s["cpu_us_per_request"], s["ratios"]

            def part(name: str, width: int, c: dict[str, float] = c) -> str:
                return f"{c[name]:>{width}.0f}" if name in c else f"{'-':>{width}}"

            lines.append(
                f"{replica_label(label):<24}{s['rps']:>8.0f}{s['p50_ms']:>8.1f}{c['all']:>9.0f}"
                f"{part('gateways', 9)}{part('haproxy', 9)}{part('registry', 9)}{part('redis', 7)}"
                f"{r['rps_vs_haproxy_registry']:>9.2f}{r['rps_vs_direct']:>11.2f}"
                f"{shown(r['cpu_all_vs_haproxy_registry']):>9}{shown(r['cpu_all_vs_direct']):>11}"
            )
        errors = {label: s["errors"] for label, s in summary.items() if s["errors"]}
        if errors:
            lines.append(f"errors (non-200 answers): {errors}")
        lines.append("")
    lines.append(
        "hop: HAProxy -> registry; cpu all: haproxy + gateways + registry + redis (hey apart); "
        "gateways: their share alone"
    )
    lines.append(
        f"other work on the machine during the rounds: {results['other_work_cores']:.2f} of "
        f"{results['cpus']} cores (all busy CPU minus the bench's own)"
    )
    lines.append(f"note: {results['note']}")
    return "\n".join(lines)


# --- Caddy beside the gateway -------------------------------------------------------------------

# Every target of the Caddy run is asked for this Host, which hey also sends as the TLS server name.
TLS_HOST = "localhost"

CADDY_LABELS = {
    "direct": "registry direct",
    "caddy_plain_http": "Caddy proxy, HTTP",
    "caddy_plain_tls": "Caddy proxy, TLS",
    "caddy_basic_http": "Caddy basicauth, HTTP",
    "caddy_basic_tls": "Caddy basicauth, TLS",
    "gateway_http": "gateway Basic, HTTP",
    "gateway_tls": "gateway Basic, TLS",
}

# gateway/Caddy for the same job: the gateway (Basic, login cached) against Caddy's bare proxy
# (the floor of a proxy) and against Caddy's basicauth (bcrypt, its hash cache warm), each over
# HTTP and over TLS.
CADDY_COMPARISONS = {
    "plain_http": ("gateway_http", "caddy_plain_http"),
    "plain_tls": ("gateway_tls", "caddy_plain_tls"),
    "basicauth_http": ("gateway_http", "caddy_basic_http"),
    "basicauth_tls": ("gateway_tls", "caddy_basic_tls"),
}

# What TLS adds to each proxy: its TLS target against its HTTP one.
TLS_PAIRS = {
    "gateway": ("gateway_tls", "gateway_http"),
    "caddy_basicauth": ("caddy_basic_tls", "caddy_basic_http"),
    "caddy_plain": ("caddy_plain_tls", "caddy_plain_http"),
}

# (key, connections, keep-alive): the TLS handshake shows only with a connection per request.
CADDY_CASES = (("c2", 2, True), ("c32", 32, True), ("c2_new_connections", 2, False))


def caddy_hashes(cost: int) -> dict[str, str]:
    """`$2a$` bcrypt hashes of the bench users' password for Caddy's basicauth. Caddy 2.6's
    `caddy hash-password --algorithm bcrypt` uses cost 14; the issue's cost is 10, which Python's
    bcrypt makes in Caddy's own `$2a$` flavour (Go's bcrypt reads it as it reads its own)."""
    return {
        user: bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(cost, prefix=b"2a")).decode()
        for user in (USER, READER)
    }


def bench_caddy(
    b: Bench, registry: Service, rounds: int, seconds: float, cases: tuple[tuple[str, int, bool], ...]
) -> dict[str, Any]:
    """HEAD manifest against one registry: direct; Caddy's `reverse_proxy` alone and behind
    `basicauth` (bcrypt cost 10), each over HTTP and over TLS; the gateway (one worker, Basic
    credentials, login cached) over HTTP and over TLS (`tls_cert`, `tls_key`); the same
    self-signed certificate for all. Every target runs at once and is measured in interleaved
    rounds, with the CPU per request of every process a request passes through (the proxy and the
    registry; hey apart) and of the proxy alone."""
    url_path = "/v2/bench/app/manifests/1"
    htpasswd = b.work / "htpasswd-caddy"
    write_htpasswd(htpasswd, 10)
    tls = write_tls_files(b.work)
    hashes = caddy_hashes(10)
    started: list[Service] = []
    targets: list[ReplicaTarget] = [ReplicaTarget("direct", registry, {"registry": [registry]})]
    proxies: dict[str, tuple[str, Callable[[], Service]]] = {
        "caddy_plain_http": ("caddy", lambda: b.caddy(registry.url, "plain-http", None, None)),
        "caddy_plain_tls": ("caddy", lambda: b.caddy(registry.url, "plain-tls", None, tls)),
        "caddy_basic_http": ("caddy", lambda: b.caddy(registry.url, "basic-http", hashes, None)),
        "caddy_basic_tls": ("caddy", lambda: b.caddy(registry.url, "basic-tls", hashes, tls)),
        "gateway_http": ("gateway", lambda: b.gateway(registry.url, htpasswd, "http", workers=1)),
        "gateway_tls": ("gateway", lambda: b.gateway(registry.url, htpasswd, "tls", workers=1, tls=tls)),
    }
    for label, (part, make) in proxies.items():
        proxy = make()
        started.append(proxy)
        targets.append(ReplicaTarget(label, proxy, {part: [proxy], "registry": [registry]}))
    context = ssl.create_default_context(cafile=str(tls.cert))
    for target in targets:
        # What is measured is what it says: the proxies with authentication refuse a request
        # without credentials, the others answer it.
        status = anonymous_status(target.front.url + url_path, context)
        if status != (401 if target.front.auth else 200):
            raise SystemExit(f"bench: {target.label} answered {status} to a request without credentials")
        # Warm-up: the first login is a bcrypt check on both (then cached), connections to the registry.
        hey(target.front.url + url_path, target.front.auth, 2, 0.3, host=TLS_HOST)
    results: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "caddy_version": caddy_version(),
        "bcrypt_cost": 10,
        "certificate": "self-signed ECDSA P-256, the same for Caddy and the gateway",
    }
    wall_before, busy_before = time.monotonic(), machine_busy_seconds()
    own_before = own_cpu_seconds(b.services)
    for key, conns, keepalive in cases:
        runs: dict[str, list[HeyResult]] = {t.label: [] for t in targets}
        cpu: dict[str, dict[str, list[float]]] = {t.label: {} for t in targets}
        for _ in range(rounds):
            for target in targets:
                before = parts_cpu(target.parts)
                client_before = client_cpu_seconds()
                result = hey(
                    target.front.url + url_path,
                    target.front.auth,
                    conns,
                    seconds,
                    keepalive=keepalive,
                    host=TLS_HOST,
                )
                client = client_cpu_seconds() - client_before
                after = parts_cpu(target.parts)
                requests = max(1.0, result.rps * seconds)
                per_request = {part: (after[part] - before[part]) / requests * 1e6 for part in before}
                per_request["all"] = sum(per_request.values())
                per_request["client"] = client / requests * 1e6
                runs[target.label].append(result)
                for part, value in per_request.items():
                    cpu[target.label].setdefault(part, []).append(value)
        summary: dict[str, Any] = {}
        for target in targets:
            summary[target.label] = {
                **median_of(runs[target.label]),
                "cpu_us_per_request": {
                    part: statistics.median(values) for part, values in cpu[target.label].items()
                },
            }
            summary[target.label]["rps_vs_direct"] = summary[target.label]["rps"] / summary["direct"]["rps"]
        results[key] = {
            "connections": conns,
            "keepalive": keepalive,
            "targets": summary,
            "gateway_vs_caddy": caddy_comparisons(summary),
            "tls_cost": tls_costs(summary),
        }
    wall = time.monotonic() - wall_before
    others = (machine_busy_seconds() - busy_before) - (own_cpu_seconds(b.services) - own_before)
    results["other_work_cores"] = max(0.0, others / wall)
    for service in reversed(started):
        service.stop()
        b.services.remove(service)
    return results


def anonymous_status(url: str, context: ssl.SSLContext) -> int:
    request = urllib.request.Request(url, method="HEAD", headers={"Accept": MANIFEST_TYPE, "Host": TLS_HOST})
    try:
        with urllib.request.urlopen(request, timeout=30, context=context) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return error.code


def proxy_cpu(target: dict[str, Any]) -> float:
    """The proxy's own CPU per request: Caddy's or the gateway's share."""
    cpu = target["cpu_us_per_request"]
    return float(cpu.get("gateway", cpu.get("caddy", 0.0)))


def caddy_comparisons(summary: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    compared: dict[str, dict[str, float | None]] = {}
    for name, (gateway_label, caddy_label) in CADDY_COMPARISONS.items():
        gateway, caddy = summary[gateway_label], summary[caddy_label]
        compared[name] = {
            "rps": gateway["rps"] / caddy["rps"],
            "added_p50_ms": gateway["p50_ms"] - caddy["p50_ms"],
            "cpu_all": ratio(gateway["cpu_us_per_request"]["all"], caddy["cpu_us_per_request"]["all"]),
            "cpu_proxy": ratio(proxy_cpu(gateway), proxy_cpu(caddy)),
        }
    return compared


def tls_costs(summary: dict[str, Any]) -> dict[str, Any]:
    """What TLS termination adds per request to each proxy (its TLS target minus its HTTP one),
    and the gateway's addition against Caddy's."""
    costs: dict[str, Any] = {}
    for name, (tls_label, http_label) in TLS_PAIRS.items():
        over_tls, over_http = summary[tls_label], summary[http_label]
        costs[name] = {
            "added_proxy_cpu_us": proxy_cpu(over_tls) - proxy_cpu(over_http),
            "added_all_cpu_us": over_tls["cpu_us_per_request"]["all"]
            - over_http["cpu_us_per_request"]["all"],
            "added_client_cpu_us": (
                over_tls["cpu_us_per_request"]["client"] - over_http["cpu_us_per_request"]["client"]
            ),
            "rps_tls_vs_http": over_tls["rps"] / over_http["rps"],
        }
    for caddy in ("caddy_basicauth", "caddy_plain"):
        costs[f"gateway_vs_{caddy}_added_proxy_cpu"] = ratio(
            costs["gateway"]["added_proxy_cpu_us"], costs[caddy]["added_proxy_cpu_us"]
        )
    return costs


def caddy_version() -> str:
    """`caddy version`'s answer: Debian's build says "2.6.2", upstream's "v2.6.2 h1:..."."""
    run = subprocess.run([need("caddy"), "version"], capture_output=True, text=True, timeout=30)
    return run.stdout.strip() or "unknown"


def caddy_table(results: dict[str, Any]) -> str:
    lines = [""]
    for case in (v for v in results.values() if isinstance(v, dict) and "targets" in v):
        how = "kept alive" if case["keepalive"] else "a connection per request"
        lines.append(
            f"== Caddy beside the gateway: HEAD manifest, {case['connections']} connections, {how} "
            "(median of rounds); "
            "CPU us per request =="
        )
        lines.append(
            f"{'target':<24}{'req/s':>8}{'p50 ms':>8}{'cpu all':>9}{'proxy':>8}{'registry':>9}"
            f"{'hey':>7}{'rps/direct':>11}"
        )
        for label, s in case["targets"].items():
            c = s["cpu_us_per_request"]
            proxy = f"{proxy_cpu(s):>8.0f}" if label != "direct" else f"{'-':>8}"
            lines.append(
                f"{CADDY_LABELS[label]:<24}{s['rps']:>8.0f}{s['p50_ms']:>8.1f}{c['all']:>9.0f}{proxy}"
                f"{c['registry']:>9.0f}{c['client']:>7.0f}{s['rps_vs_direct']:>11.2f}"
            )
        errors = {label: s["errors"] for label, s in case["targets"].items() if s["errors"]}
        if errors:
            lines.append(f"errors (non-200 answers): {errors}")
        lines.append("gateway/Caddy, same job:      req/s   cpu all   cpu proxy   added p50 ms")
        for name, r in case["gateway_vs_caddy"].items():
            lines.append(
                f"  {name:<26}{r['rps']:>8.2f}{shown(r['cpu_all']):>10}{shown(r['cpu_proxy']):>12}"
                f"{r['added_p50_ms']:>15.1f}"
            )
        t = case["tls_cost"]
        lines.append(
            "TLS termination, proxy CPU us per request added by TLS (rate TLS/HTTP): "
            + ", ".join(
                f"{name} {t[name]['added_proxy_cpu_us']:+.0f} ({t[name]['rps_tls_vs_http']:.2f})"
                for name in TLS_PAIRS
            )
        )
        lines.append(
            "  gateway's TLS cost / Caddy's: vs basicauth "
            f"{shown(t['gateway_vs_caddy_basicauth_added_proxy_cpu'])}, "
            f"vs plain proxy {shown(t['gateway_vs_caddy_plain_added_proxy_cpu'])}"
        )
        lines.append("")
    lines.append(
        f"Caddy {results['caddy_version'].split()[0].removeprefix('v')}; bcrypt cost "
        f"{results['bcrypt_cost']}, logins cached by both; {results['certificate']}; "
        "cpu all: proxy + registry (hey apart); proxy: Caddy's or the gateway's share"
    )
    lines.append(
        f"other work on the machine during the rounds: {results['other_work_cores']:.2f} of "
        f"{results['cpus']} cores (all busy CPU minus the bench's own)"
    )
    return "\n".join(lines)


def table(results: dict[str, Any]) -> str:
    lines = ["", "== authenticated HEAD manifest (median of rounds): req/s / p50 ms / CPU us per request =="]
    names = (
        ("registry", "direct"),
        ("nginx", "nginx"),
        ("nginx_plain", "nginx-plain"),
        ("gateway", "gateway"),
    )
    lines.append(
        f"{'case':<12}"
        + "".join(f"{label:>22}" for _, label in names)
        + f"{'gw/direct':>11}{'gw cpu/plain':>14}"
    )
    for case, s in results["head"].items():
        cells = "".join(
            f"{s[name]['rps']:>7.0f} /{s[name]['p50_ms']:>6.1f} /{s[name]['cpu_us_per_request']:>6.0f}"
            for name, _ in names
        )
        lines.append(
            f"{case:<12}{cells}{s['ratios']['gateway_vs_direct']:>11.2f}"
            f"{shown(s['ratios']['gateway_cpu_vs_nginx_plain']):>14}"
        )
    k = results["token"]
    lines.append(
        "\n== HEAD manifest at 2 connections: Basic vs a Bearer token (gateway, 1 worker; "
        "basic_full_path: fast_path false) =="
    )
    for mode in (
        "basic",
        "bearer",
        "basic_full_path",
        "nginx_plain",
        "basic_new_connections",
        "nginx_plain_new_connections",
        "basic_get",
        "nginx_plain_get",
    ):
        if mode not in k:
            continue
        lines.append(
            f"{mode:<28}{k[mode]['rps']:>9.0f} req/s  p50 {k[mode]['p50_ms']:.2f} ms  "
            f"CPU {k[mode]['cpu_us_per_request']:.0f} us/request"
        )
    lines.append(
        f"gateway CPU vs nginx-plain: basic {shown(k['basic_cpu_vs_nginx_plain'])}, "
        f"bearer {shown(k['bearer_cpu_vs_nginx_plain'])}, a connection per request "
        f"{shown(k.get('basic_new_connections_cpu_vs_nginx_plain'))}, GET "
        f"{shown(k.get('basic_get_cpu_vs_nginx_plain'))}"
    )
    t = results["transfer"]
    lines.append(f"\n== {t['blob_mib']} MiB blob, MB/s (direct / nginx / gateway) ==")
    for key in (
        "pull_MBps",
        "push_MBps",
        "skopeo_push_MBps",
        "skopeo_pull_MBps",
        "pull_cpu_s_per_GB",
        "push_cpu_s_per_GB",
        "pull_all_cpu_s_per_GB",
        "pull_ceiling_MBps",
    ):
        if key in t:
            v = t[key]
            lines.append(f"{key:<22}{v['registry']:>9.1f}{v['nginx']:>9.1f}{v['gateway']:>9.1f}")
    lines.append("ratios: " + ", ".join(f"{k} {v:.2f}" for k, v in t["ratios"].items()))
    m = results["memory"]
    lines.append("\n== gateway memory and CPU ==")
    lines.append(f"baseline RSS {m['baseline_rss_mib']:.1f} MiB")
    for label in ("small", "big"):
        r = m[label]
        lines.append(
            f"{r['mib']:>6} MiB: peak RSS push {r['push_peak_rss_mib']:.1f} MiB, pull "
            f"{r['pull_peak_rss_mib']:.1f} MiB, CPU {r['cpu_seconds_per_GB']:.2f} s/GB"
        )
    lines.append(f"big minus small peak: {m['big_minus_small_peak_mib']:.1f} MiB")
    s = results["scaling"]
    lines.append("\n== scaling, HEAD at 32 connections, requests/s ==")
    for count, r in s["users"].items():
        lines.append(
            f"{count:>7} users: nginx {r['nginx']['rps']:>7.0f}  gateway {r['gateway']['rps']:>7.0f}"
        )
    for count, r in s["rules"].items():
        lines.append(f"{count:>7} rules: gateway {r['gateway']['rps']:>7.0f}")
    lines.append("ratios: " + ", ".join(f"{k} {v:.2f}" for k, v in s["ratios"].items()))
    return "\n".join(lines)


def commit() -> dict[str, Any]:
    """The build measured: the checkout's commit, and whether files differed from it."""

    def git(*args: str) -> str | None:
        try:
            run = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30)
        except OSError:
            return None
        return run.stdout.strip() if run.returncode == 0 else None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {
        "hash": git("rev-parse", "HEAD"),
        "date": git("show", "-s", "--format=%cI", "HEAD"),
        "dirty": None if status is None else bool(status),
    }


def machine() -> dict[str, Any]:
    """What the figures depend on besides the build."""
    cpu_model = memory_mib = None
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.partition(":")[2].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory_mib = int(line.split()[1]) // 1024
                break
    return {
        "cpus": os.cpu_count(),
        "cpu_model": cpu_model,
        "memory_mib": memory_mib,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def replica_counts(text: str) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected counts separated by commas (1,2,3): {text!r}") from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"every replica count must be at least 1: {text!r}")
    return counts


def main_mode(
    mode: str,
    binaries: tuple[str, ...],
    out: Path,
    quick: bool,
    rounds: int,
    seconds: float,
    measure: Callable[[Bench, Service], dict[str, Any]],
    render: Callable[[dict[str, Any]], str],
) -> int:
    """A run of one part only (`--replicas`, `--caddy`): the registry seeded with a manifest,
    `measure`'s figures under `mode` in the results, and the load average it started and ended
    with, since other work on the machine distorts every figure."""
    for binary in ("docker-registry", "hey", "skopeo", *binaries):
        need(binary)
    work = Path(tempfile.mkdtemp(prefix="gateway-bench-"))
    work.chmod(0o755)
    bench = Bench(work, quick, 1)
    started = time.monotonic()
    try:
        registry = bench.registry()
        seed_manifest(registry, work)
        results: dict[str, Any] = {
            "commit": commit(),
            "machine": machine(),
            "run": {
                "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "mode": mode,
                "quick": quick,
                "rounds": rounds,
                "seconds_per_run": seconds,
                "gateway_workers": 1,
                "load_average_at_start": os.getloadavg(),
            },
        }
        results[mode] = measure(bench, registry)
        results["run"]["load_average_at_end"] = os.getloadavg()
        results["elapsed_seconds"] = time.monotonic() - started
    finally:
        bench.stop_all()
        shutil.rmtree(work, ignore_errors=True)
    results["table"] = render(results[mode])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(results["table"])
    loads = (results["run"]["load_average_at_start"], results["run"]["load_average_at_end"])
    start_load, end_load = (" ".join(f"{value:.2f}" for value in load) for load in loads)
    print(f"\nload average (1, 5, 15 min) at start {start_load}, at end {end_load}")
    print(f"results written to {out} ({results['elapsed_seconds']:.0f} s)")
    return 0


def main_replicas(counts: list[int], out: Path, quick: bool, rounds: int, seconds: float) -> int:
    return main_mode(
        "replicas",
        ("haproxy", "redis-server"),
        out,
        quick,
        rounds,
        seconds,
        lambda bench, registry: bench_replicas(bench, registry, counts, rounds, seconds, [2, 32]),
        replicas_table,
    )


def main_caddy(out: Path, quick: bool, rounds: int, seconds: float) -> int:
    return main_mode(
        "caddy",
        ("caddy",),
        out,
        quick,
        rounds,
        seconds,
        lambda bench, registry: bench_caddy(bench, registry, rounds, seconds, CADDY_CASES),
        caddy_table,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="seconds-long smoke run")
    parser.add_argument(
        "--out", type=Path, default=None, help="default: bench/results/latest.json (--quick: quick.json)"
    )
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--seconds", type=float, default=None, help="length of one hey run")
    parser.add_argument(
        "--workers", type=int, default=1, help="gateway worker processes (default 1, as the gateway)"
    )
    parser.add_argument("--blob-mib", type=int, default=None)
    parser.add_argument("--big-mib", type=int, default=None)
    parser.add_argument("--no-skopeo", action="store_true")
    parser.add_argument(
        "--replicas",
        type=replica_counts,
        default=None,
        metavar="N,N,...",
        help="only the replicas run: HAProxy -> registry and HAProxy -> N gateways for each N "
        "(default out: bench/results/replicas.json)",
    )
    parser.add_argument(
        "--caddy",
        action="store_true",
        help="only Caddy beside the gateway: Caddy's reverse_proxy and basicauth and the gateway, "
        "each over HTTP and TLS (default out: bench/results/caddy.json)",
    )
    args = parser.parse_args(argv)
    quick = args.quick
    if args.replicas and args.caddy:
        parser.error("--replicas and --caddy are runs of their own: give one")
    if args.out is None:
        kept = "replicas.json" if args.replicas else "caddy.json" if args.caddy else "latest.json"
        args.out = ROOT / "bench" / "results" / ("quick.json" if quick else kept)
    rounds = args.rounds or (1 if quick else 3)
    seconds = args.seconds or (0.5 if quick else 3.0)
    if args.replicas:
        return main_replicas(args.replicas, args.out, quick, rounds, seconds)
    if args.caddy:
        return main_caddy(args.out, quick, rounds, seconds)
    blob_mib = args.blob_mib or (8 if quick else 512)
    big_mib = args.big_mib or (32 if quick else 2048)
    user_counts = [1, 1000] if quick else [1, 10_000, 100_000]
    rule_counts = [1, 50] if quick else [1, 100, 10_000]
    for binary in ("docker-registry", "nginx", "hey", "curl", "skopeo"):
        need(binary)

    work = Path(tempfile.mkdtemp(prefix="gateway-bench-"))
    work.chmod(0o755)  # nginx workers run as nobody and read the htpasswd file
    bench = Bench(work, quick, args.workers)
    started = time.monotonic()
    try:
        registry = bench.registry()
        seed_manifest(registry, work)
        results: dict[str, Any] = {
            "commit": commit(),
            "machine": machine(),
            "run": {
                "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "quick": quick,
                "rounds": rounds,
                "seconds_per_run": seconds,
                "gateway_workers": args.workers,
            },
        }
        results["head"] = bench_head(bench, registry, rounds, seconds)
        results["token"] = bench_token(bench, registry, rounds, seconds)
        results["transfer"] = bench_transfer(bench, registry, blob_mib, rounds, use_skopeo=not args.no_skopeo)
        results["memory"] = bench_memory(bench, registry, big_mib, max(1, min(64, big_mib // 4)))
        results["scaling"] = bench_scaling(bench, registry, user_counts, rule_counts, rounds, seconds)
        results["elapsed_seconds"] = time.monotonic() - started
    finally:
        bench.stop_all()
        shutil.rmtree(work, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(table(results))
    print(f"\nresults written to {args.out} ({results['elapsed_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
