"""The edge: slowloris, connection limits, graceful shutdown, and load, against the real registry."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import http.client
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import USERS, Gateway, Registry, http_request, start_gateway, stop


def basic(user: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{USERS[user]}".encode()).decode()}


def get_status(gw: Gateway, path: str = "/v2/", user: str = "alice") -> int:
    return http_request(gw.host, "GET", path, (user, USERS[user]))[0]


def closed_by_peer(sock: socket.socket, within: float) -> bool:
    sock.settimeout(within)
    try:
        return sock.recv(1024) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_slowloris_cut_off_without_hurting_others(
    tmp_path: Path, registry: Registry, users_file: Path
) -> None:
    gw = start_gateway(tmp_path, registry.url, users_file, env={"GATEWAY_HEADER_TIMEOUT": "1"})
    address, port = gw.host.split(":")
    slow = []
    try:
        for _ in range(50):
            sock = socket.create_connection((address, int(port)), timeout=5)
            sock.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n")  # and never the rest
            slow.append(sock)
        # Other clients are served meanwhile.
        assert all(get_status(gw) == 200 for _ in range(20))
        assert all(closed_by_peer(sock, within=5) for sock in slow)
        # A huge header is refused with 400, and the gateway carries on.
        with socket.create_connection((address, int(port)), timeout=5) as sock:
            sock.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n")
            assert sock.recv(1024).startswith((b"HTTP/1.0 400", b"HTTP/1.1 400"))
        assert get_status(gw) == 200
    finally:
        for sock in slow:
            sock.close()
        stop(gw.process)


def test_connection_limit(tmp_path: Path, registry: Registry, users_file: Path) -> None:
    gw = start_gateway(tmp_path, registry.url, users_file, env={"GATEWAY_MAX_CONNECTIONS": "10"})
    address, port = gw.host.split(":")
    held = [socket.create_connection((address, int(port)), timeout=5) for _ in range(10)]
    try:
        time.sleep(0.3)
        extra = socket.create_connection((address, int(port)), timeout=5)
        assert closed_by_peer(extra, within=5)
        extra.close()
        for sock in held[:5]:
            sock.close()
        time.sleep(0.3)
        assert get_status(gw) == 200
        assert "max_connections" in gw.log.read_text()
    finally:
        for sock in held:
            sock.close()
        stop(gw.process)


@pytest.mark.parametrize("path", ["fast", "full"])
def test_sigterm_lets_transfers_in_flight_finish(
    tmp_path: Path, registry: Registry, users_file: Path, path: str
) -> None:
    gw = start_gateway(tmp_path, registry.url, users_file)
    try:
        blob = os.urandom(32 * 1024 * 1024)
        digest = "sha256:" + hashlib.sha256(blob).hexdigest()
        conn = http.client.HTTPConnection(gw.host, timeout=30)
        conn.request("POST", "/v2/drain/app/blobs/uploads/", body=b"", headers=basic("admin"))
        response = conn.getresponse()
        response.read()
        location = (response.getheader("Location") or "").removeprefix(f"http://{gw.host}")
        conn.request("PUT", f"{location}&digest={digest}", body=blob, headers=basic("admin"))
        assert conn.getresponse().status == 201
        conn.close()

        if path == "fast":
            # A login the gateway has checked already: the download is served on the fast path
            # (a first login is checked, and its connection served, by the full path).
            conn = http.client.HTTPConnection(gw.host, timeout=30)
            conn.request("GET", "/v2/", headers=basic("alice"))
            assert conn.getresponse().status == 200
            conn.close()
        conn = http.client.HTTPConnection(gw.host, timeout=30)
        conn.request("GET", f"/v2/drain/app/blobs/{digest}", headers=basic("alice"))
        response = conn.getresponse()
        received = response.read(1024 * 1024)
        gw.process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        # New connections are refused while the transfer drains ...
        with pytest.raises(OSError):
            socket.create_connection(tuple(gw.host.split(":")), timeout=2).close()  # type: ignore[arg-type]
        while chunk := response.read(1024 * 1024):
            received += chunk
            time.sleep(0.02)  # a slow reader
        conn.close()
        # ... and the transfer in flight completes, byte for byte.
        assert len(received) == len(blob), (len(received), gw.process.poll(), gw.log.read_text()[-2000:])
        assert hashlib.sha256(received).hexdigest() == digest.removeprefix("sha256:")
        assert gw.process.wait(timeout=30) == 0
    finally:
        stop(gw.process)


def test_sigterm_lets_an_upload_in_flight_finish(
    tmp_path: Path, registry: Registry, users_file: Path
) -> None:
    """aiohttp drops the bytes that reach a connection once shutdown began: an upload whose body
    was still arriving used to stall until shutdown_grace ran out and then fail with 502."""
    gw = start_gateway(tmp_path, registry.url, users_file, env={"GATEWAY_SHUTDOWN_GRACE": "15"})
    try:
        conn = http.client.HTTPConnection(gw.host, timeout=30)
        conn.request("POST", "/v2/drain/up/blobs/uploads/", body=b"", headers=basic("admin"))
        response = conn.getresponse()
        response.read()
        location = (response.getheader("Location") or "").removeprefix(f"http://{gw.host}")
        chunks = [os.urandom(64 * 1024) for _ in range(8)]

        def body() -> Iterator[bytes]:
            for index, chunk in enumerate(chunks):
                if index == 2:
                    gw.process.send_signal(signal.SIGTERM)
                time.sleep(0.3)
                yield chunk

        started = time.monotonic()
        conn.request("PATCH", location, body=body(), headers=basic("admin"), encode_chunked=True)
        response = conn.getresponse()
        response.read()
        assert response.status == 202, gw.log.read_text()[-2000:]
        assert response.getheader("Range") == f"0-{8 * 64 * 1024 - 1}"
        assert time.monotonic() - started < 10  # finished, not cut at the end of shutdown_grace
        conn.close()
        assert gw.process.wait(timeout=30) == 0
    finally:
        stop(gw.process)


LOAD_SECONDS = float(os.environ.get("GATEWAY_LOAD_SECONDS", "30"))


def test_500_clients_pull_and_push_for_30_seconds(
    tmp_path: Path, registry: Registry, users_file: Path
) -> None:
    gw = start_gateway(tmp_path, registry.url, users_file)
    rss_samples: list[int] = []
    stop_sampling = threading.Event()

    def sample() -> None:
        while not stop_sampling.is_set():
            rss_samples.append(gw.rss_kib())
            time.sleep(0.2)

    async def run() -> Counter[str]:
        outcomes: Counter[str] = Counter()
        base = gw.url
        seed = os.urandom(256 * 1024)
        seed_digest = "sha256:" + hashlib.sha256(seed).hexdigest()
        connector = aiohttp.TCPConnector(limit=0)
        timeout = aiohttp.ClientTimeout(total=120)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

            async def push(data: bytes, repo: str) -> str:
                digest = "sha256:" + hashlib.sha256(data).hexdigest()
                async with session.post(f"{base}/v2/{repo}/blobs/uploads/", headers=basic("admin")) as r:
                    outcomes[f"post {r.status}"] += 1
                    location = r.headers.get("Location", "")
                separator = "&" if "?" in location else "?"
                async with session.put(
                    f"{location}{separator}digest={digest}", data=data, headers=basic("admin")
                ) as r:
                    outcomes[f"put {r.status}"] += 1
                return digest

            await push(seed, "load/seed")
            deadline = time.monotonic() + LOAD_SECONDS

            async def puller() -> None:
                while time.monotonic() < deadline:
                    async with session.get(
                        f"{base}/v2/load/seed/blobs/{seed_digest}", headers=basic("alice")
                    ) as r:
                        body = await r.read()
                        ok = r.status == 200 and len(body) == len(seed)
                        outcomes["pull ok" if ok else f"pull {r.status}"] += 1

            async def pusher(index: int) -> None:
                while time.monotonic() < deadline:
                    await push(os.urandom(32 * 1024), f"load/push{index % 10}")

            results = await asyncio.gather(
                *[puller() for _ in range(450)], *[pusher(i) for i in range(50)], return_exceptions=True
            )
            for result in results:
                if isinstance(result, BaseException):
                    outcomes[f"exception {type(result).__name__}"] += 1
        return outcomes

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        outcomes = asyncio.run(run())
    finally:
        stop_sampling.set()
        sampler.join()
        stop(gw.process)
    print(outcomes, "peak RSS KiB", max(rss_samples))
    bad = {k: v for k, v in outcomes.items() if not (k == "pull ok" or k.endswith((" 201", " 202")))}
    assert not bad, outcomes
    assert outcomes["pull ok"] > 500 and outcomes["put 201"] > 50, outcomes
    assert max(rss_samples) < 200 * 1024, max(rss_samples)  # bounded: no growth with request count
    assert "Traceback" not in gw.log.read_text()


def test_workers_share_the_port_reload_and_stop_together(
    tmp_path: Path, registry: Registry, users_file: Path
) -> None:
    gw = start_gateway(
        tmp_path, registry.url, users_file, "--workers", "2", env={"GATEWAY_RELOAD_INTERVAL": "3600"}
    )
    try:
        deadline = time.monotonic() + 10
        children: list[str] = []
        while len(children) < 2 and time.monotonic() < deadline:
            children = Path(f"/proc/{gw.process.pid}/task/{gw.process.pid}/children").read_text().split()
            time.sleep(0.1)
        assert len(children) == 2
        assert all(get_status(gw) == 200 for _ in range(20))

        # A user added to the file and a SIGHUP to the supervisor: every worker knows the user.
        subprocess_env = {**os.environ, "GATEWAY_HTPASSWD": str(users_file)}
        added = subprocess.run(
            [sys.executable, "-m", "gateway", "user", "add", "late", "--password-stdin", "--cost", "4"],
            input="late-pw\n",
            capture_output=True,
            text=True,
            env=subprocess_env,
            timeout=60,
        )
        assert added.returncode == 0, added.stderr
        gw.process.send_signal(signal.SIGHUP)
        time.sleep(1)
        statuses = {http_request(gw.host, "GET", "/v2/", ("late", "late-pw"))[0] for _ in range(40)}
        assert statuses == {200}

        gw.process.send_signal(signal.SIGTERM)
        assert gw.process.wait(timeout=30) == 0
        assert not any(Path(f"/proc/{child}").exists() for child in children)
    finally:
        stop(gw.process)


def worker_pids(gw: Gateway, count: int) -> list[str]:
    """The supervisor's `count` workers, once it has that many."""
    deadline = time.monotonic() + 15
    while True:
        children = Path(f"/proc/{gw.process.pid}/task/{gw.process.pid}/children").read_text().split()
        if len(children) == count:
            return children
        assert time.monotonic() < deadline, f"workers: {children}"
        time.sleep(0.1)


VALID_POLICY = 'acl:\n  - match: {account: "alice"}\n    actions: ["pull"]\n'
INVALID_POLICY = (
    'acl:\n  - match: {account: "alice"}\n    actions: ["pull"]\naccounts:\n  alice: {expires: 2027-13-31}\n'
)


@pytest.mark.parametrize("broken", ["audit_log", "policy", "token_key"])
def test_a_replacement_that_cannot_start_is_retried_while_the_others_serve(
    tmp_path: Path, registry: Registry, users_file: Path, broken: str
) -> None:
    """A worker that dies is replaced. While a file is broken, its replacement cannot start: the
    other workers go on serving on what they loaded (before, the replacement was started every
    second, forever, a traceback each time), it is tried again less and less often, and it
    starts once the file is fixed."""
    from gateway.tokens import keys

    directory = tmp_path / "adir"
    directory.mkdir()
    policy = tmp_path / "policy.yml"
    policy.write_text(VALID_POLICY)
    key = tmp_path / "token.pem"
    keys.write_private(keys.generate(), key)
    good_key = key.read_bytes()
    bearer = {"GATEWAY_CHALLENGE": "bearer", "GATEWAY_TOKEN_KEY": str(key)} if broken == "token_key" else {}
    gw = start_gateway(
        tmp_path,
        registry.url,
        users_file,
        "--workers",
        "2",
        "--audit-log",
        str(directory / "audit.log"),
        "--policy",
        str(policy),
        env={"GATEWAY_RELOAD_INTERVAL": "3600", **bearer},  # the running workers keep what they loaded
    )

    def wait_for_listening(count: int, what: str) -> None:
        deadline = time.monotonic() + 20
        while gw.log.read_text().count(" listening on ") < count:
            assert time.monotonic() < deadline, what
            time.sleep(0.1)

    try:
        wait_for_listening(2, "the workers did not start")
        first = worker_pids(gw, 2)[0]
        os.kill(int(first), signal.SIGKILL)  # dies while serving: replaced
        wait_for_listening(3, "the killed worker was not replaced")
        replaced = worker_pids(gw, 2)
        assert first not in replaced
        assert all(get_status(gw) == 200 for _ in range(10))

        if broken == "audit_log":
            moved = tmp_path / "adir-moved"
            directory.rename(moved)
            expected = f"audit_log (--audit-log): no such directory: {directory}"
        elif broken == "policy":
            policy.write_text(INVALID_POLICY)
            expected = "cannot load users and rules: "
        else:
            key.write_text("not a key\n")
            expected = f"token_key (GATEWAY_TOKEN_KEY): {key}"
        os.kill(int(replaced[0]), signal.SIGKILL)  # its replacement cannot start
        deadline = time.monotonic() + 20
        while gw.log.read_text().count("the other workers keep serving") < 2:  # tried twice
            assert time.monotonic() < deadline, gw.log.read_text()[-3000:]
            time.sleep(0.2)
        assert gw.process.poll() is None
        assert all(get_status(gw) == 200 for _ in range(10))  # the other worker serves
        if broken == "audit_log":
            moved.rename(directory)
        elif broken == "policy":
            policy.write_text(VALID_POLICY)
        else:
            key.write_bytes(good_key)
        wait_for_listening(4, "the replacement did not start once the file was fixed")
        assert len(worker_pids(gw, 2)) == 2
    finally:
        stop(gw.process)
    log = gw.log.read_text()
    assert expected in log
    assert "another try in 1s" in log and "another try in 2s" in log
    assert "Traceback" not in log
