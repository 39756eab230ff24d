"""Guards that hold on every path, tried as an attacker would, against the real registry:
the lockout (every way a secret arrives, every worker), client addresses read one way, and no
secret a client sends written to a log."""

from __future__ import annotations

import base64
import http.client
import json
import re
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.sample_image import write_image
from tests.conftest import (
    USERS,
    Gateway,
    Registry,
    basic_header,
    free_port,
    htpasswd_add,
    make_token_key,
    skopeo_copy,
    start_gateway,
    start_registry,
    stop,
    users_with,
    write_authfile,
)

DAVE = ("dave", "dave-secret-pw")
Answer = tuple[int, dict[str, str], bytes]


def ask(
    gateway: Gateway,
    method: str,
    path: str,
    credentials: tuple[str, str] | None = None,
    *,
    source: str = "127.0.0.1",
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    connection: http.client.HTTPConnection | None = None,
) -> Answer:
    """One request from the loopback address `source` (the whole of 127/8 is ours), on a fresh
    connection unless one is given."""
    all_headers = dict(headers or {})
    if credentials is not None:
        all_headers["Authorization"] = basic_header(credentials)
    conn = connection or http.client.HTTPConnection(gateway.host, timeout=30, source_address=(source, 0))
    try:
        conn.request(method, path, body=body, headers=all_headers)
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        if connection is None:
            conn.close()


def password_checks(metrics: str) -> float:
    with urllib.request.urlopen(f"http://{metrics}/metrics") as response:
        text = response.read().decode()
    match = re.search(r"^registry_gateway_password_checks_total (\S+)$", text, re.M)
    assert match is not None, text
    return float(match.group(1))


@dataclass
class Stack:
    registry: Registry
    gateway: Gateway
    metrics: str
    audit: Path
    tmp: Path


@pytest.fixture
def bearer_stack(tmp_path: Path) -> Iterator[Stack]:
    """The gateway in bearer mode (a token endpoint, refresh tokens), lockout after 3 failures."""
    registry = start_registry(tmp_path)
    gateway = None
    try:
        users = users_with(tmp_path / "htpasswd", DAVE)
        key = make_token_key(tmp_path / "token.key")
        metrics = f"127.0.0.1:{free_port()}"
        audit = tmp_path / "audit.log"
        gateway = start_gateway(
            tmp_path,
            registry.url,
            users,
            "--metrics-listen",
            metrics,
            env={
                "GATEWAY_CHALLENGE": "bearer",
                "GATEWAY_TOKEN_KEY": str(key),
                "GATEWAY_REFRESH_TOKEN_LIFETIME": "3600",
                "GATEWAY_LOCKOUT_ATTEMPTS": "3",
                "GATEWAY_AUDIT_LOG": str(audit),
            },
        )
        yield Stack(registry, gateway, metrics, audit, tmp_path)
    finally:
        if gateway is not None:
            stop(gateway.process)
        stop(registry.process)


def _form(fields: dict[str, str]) -> tuple[bytes, dict[str, str]]:
    return urllib.parse.urlencode(fields).encode(), {"Content-Type": "application/x-www-form-urlencoded"}


def _refresh_token(stack: Stack, source: str) -> str:
    body, headers = _form(
        {"grant_type": "password", "username": DAVE[0], "password": DAVE[1], "service": "registry-gateway"}
    )
    status, _, answer = ask(
        stack.gateway, "POST", "/token?offline_token=true", source=source, body=body, headers=headers
    )
    assert status == 200, answer
    token = json.loads(answer)["refresh_token"]
    assert isinstance(token, str)
    return token


def _forged_refresh_token(subject: str, serial: int = 0) -> str:
    """A token that claims `subject`, signed by no key of the gateway's."""

    def part(value: dict[str, object]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    claims = {
        "sub": subject,
        "iss": "registry-gateway",
        "exp": int(time.time()) + 600,
        "token_use": "refresh",
        "jti": str(serial),
    }
    return f"{part({'alg': 'ES256', 'typ': 'JWT'})}.{part(claims)}.{'A' * 86}"


def _every_way_a_secret_arrives(stack: Stack, password: str, refresh: str, source: str) -> list[Answer]:
    """Dave's secret to every endpoint and path that checks one, from `source`."""
    gateway = stack.gateway
    credentials = (DAVE[0], password)
    token_form, form_headers = _form(
        {"grant_type": "password", "username": DAVE[0], "password": password, "service": "registry-gateway"}
    )
    refresh_form, _ = _form(
        {"grant_type": "refresh_token", "refresh_token": refresh, "service": "registry-gateway"}
    )
    query = "/token?service=registry-gateway&scope=repository:dave/app:pull"
    return [
        ask(gateway, "GET", "/v2/", credentials, source=source),  # the fast path's
        ask(gateway, "HEAD", "/v2/dave/app/manifests/1", credentials, source=source),
        ask(gateway, "POST", "/v2/dave/app/blobs/uploads/", credentials, source=source),  # the full path's
        ask(gateway, "GET", query, credentials, source=source),
        ask(gateway, "POST", "/token", source=source, body=token_form, headers=form_headers),
        ask(gateway, "POST", "/token", source=source, body=refresh_form, headers=form_headers),
    ]


def _locked_answers_alike(answers: list[Answer]) -> list[tuple[int, str, bytes]]:
    """What a locked pair is told, less the Retry-After countdown (the same for every secret)."""
    told = []
    for status, headers, body in answers:
        assert status == 429, (status, body)
        assert int(headers["Retry-After"]) > 0
        names = ",".join(
            sorted(name.lower() for name in headers if name.lower() not in ("date", "retry-after"))
        )
        told.append((status, names, body))
    return told


def test_a_locked_pair_learns_nothing_from_any_path(bearer_stack: Stack) -> None:
    """The oracle of 27cb724: once dave logged in from another address, a locked address got
    200 for his right password and 429 for wrong ones, with no bcrypt and no limit."""
    stack = bearer_stack
    gateway = stack.gateway
    # A connection that proved dave's password before the lock (the per-connection memo).
    early = http.client.HTTPConnection(gateway.host, timeout=30, source_address=("127.0.0.1", 0))
    try:
        assert ask(gateway, "GET", "/v2/", DAVE, connection=early)[0] == 200
        for attempt in range(3):
            assert ask(gateway, "GET", "/v2/", (DAVE[0], f"guess-{attempt}"))[0] == 401
        # Dave works from elsewhere: his password is in the login cache, and he holds a refresh token.
        assert ask(gateway, "GET", "/v2/", DAVE, source="127.0.0.2")[0] == 200
        refresh = _refresh_token(stack, "127.0.0.2")
        checks = password_checks(stack.metrics)

        right = _every_way_a_secret_arrives(stack, DAVE[1], refresh, "127.0.0.1")
        wrong = _every_way_a_secret_arrives(stack, "guess-9", _forged_refresh_token("dave"), "127.0.0.1")
        assert _locked_answers_alike(right) == _locked_answers_alike(wrong)
        assert ask(gateway, "GET", "/v2/", DAVE, connection=early)[0] == 429
        assert password_checks(stack.metrics) == checks  # not one password checked for the locked pair
    finally:
        early.close()

    # Dave elsewhere is not locked, and his refresh token works there.
    assert all(
        status != 429 for status, _, _ in _every_way_a_secret_arrives(stack, DAVE[1], refresh, "127.0.0.2")
    )
    # Refused refresh tokens count like wrong passwords: three lock the pair at 127.0.0.3.
    form, headers = _form(
        {
            "grant_type": "refresh_token",
            "refresh_token": _forged_refresh_token("dave"),
            "service": "registry-gateway",
        }
    )
    for attempt in range(3):
        forged, _ = _form(
            {
                "grant_type": "refresh_token",
                "refresh_token": _forged_refresh_token("dave", attempt),
                "service": "registry-gateway",
            }
        )
        assert ask(gateway, "POST", "/token", source="127.0.0.3", body=forged, headers=headers)[0] == 401
    assert ask(gateway, "GET", "/v2/", DAVE, source="127.0.0.3")[0] == 429
    assert ask(gateway, "POST", "/token", source="127.0.0.3", body=form, headers=headers)[0] == 429
    records = [json.loads(line) for line in stack.audit.read_text().splitlines()]
    assert any(r["decision"] == "locked" and r["client"] == "127.0.0.3" for r in records)


def test_the_lockout_holds_across_workers(tmp_path: Path, registry: Registry) -> None:
    """27cb724 counted per worker: with 2 workers and lockout_attempts 5, 30 guesses on fresh
    connections (which the kernel spreads over the workers) got 10 password checks."""
    users = tmp_path / "htpasswd"
    htpasswd_add(users, *DAVE, "-B")
    gateway = start_gateway(
        tmp_path, registry.url, users, env={"GATEWAY_WORKERS": "2", "GATEWAY_LOCKOUT_ATTEMPTS": "5"}
    )
    try:
        deadline = time.monotonic() + 30
        while gateway.log.read_text().count(" listening on ") < 2:  # both workers take connections
            assert time.monotonic() < deadline, gateway.log.read_text()
            time.sleep(0.1)
        statuses = [ask(gateway, "GET", "/v2/", (DAVE[0], f"guess-{attempt}"))[0] for attempt in range(30)]
        assert statuses == [401] * 5 + [429] * 25
        # The supervisor's workers really shared the work: both answered some of those.
        workers = subprocess.run(
            ["pgrep", "-P", str(gateway.process.pid)], capture_output=True, text=True
        ).stdout.split()
        assert len(workers) >= 2
        # A worker replaced after a crash shares the table too: its first answer is 429.
        for pid in workers:
            subprocess.run(["kill", "-KILL", pid], check=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                status = ask(gateway, "GET", "/v2/", DAVE)[0]
            except OSError:
                time.sleep(0.2)
                continue
            break
        assert status == 429
    finally:
        stop(gateway.process)


OCI = {"Accept": "application/vnd.oci.image.manifest.v1+json"}
POLICY_BEHIND_A_PROXY = """\
users:
  "": {}
  bob: {password: "%s"}
acl:
  - match: {ip: "10.0.0.0/8"}
    actions: []
    comment: the office network may do nothing
  - match: {account: "bob"}
    actions: ["pull", "push"]
  - match: {account: ""}
    actions: ["pull"]
"""


@pytest.mark.parametrize(
    "written_as",
    [
        "::ffff:10.1.2.3",
        "::ffff:a01:203",
        "0:0:0:0:0:FFFF:0A01:0203",
        "10.1.2.3:40001",  # a proxy that adds the client's port (Azure's Application Gateway)
        "[::ffff:10.1.2.3]:443",
    ],
)
def test_ipv4_mapped_addresses_meet_the_ip_rules(tmp_path: Path, registry: Registry, written_as: str) -> None:
    """A dual-stack proxy (nginx ipv6only=off, HAProxy v4v6) writes 10.1.2.3 as ::ffff:10.1.2.3;
    27cb724 let that through an `ip: 10.0.0.0/8` deny rule, for anonymous and bob alike."""
    import bcrypt

    users = tmp_path / "htpasswd"
    htpasswd_add(users, *DAVE, "-B")
    policy = tmp_path / "policy.yml"
    bob = ("bob", "bob-secret-pw")
    policy.write_text(POLICY_BEHIND_A_PROXY % bcrypt.hashpw(bob[1].encode(), bcrypt.gensalt(10)).decode())
    audit = tmp_path / "audit.log"
    gateway = start_gateway(
        tmp_path,
        registry.url,
        users,
        "--policy",
        str(policy),
        env={
            "GATEWAY_TRUSTED_PROXIES": "127.0.0.1",
            "GATEWAY_AUDIT_LOG": str(audit),
            "GATEWAY_LOCKOUT_ATTEMPTS": "3",
        },
    )
    try:
        image = tmp_path / "image"
        write_image(image, "1", layers=1, layer_bytes=1000)
        # From elsewhere, bob pushes and anonymous pulls: the rules do their work.
        pushed = skopeo_copy(
            f"oci:{image}:1",
            f"docker://{gateway.host}/team/app:1",
            write_authfile(tmp_path / "a.json", gateway.host, bob),
        )
        assert pushed.returncode == 0, pushed.stderr
        assert (
            ask(gateway, "GET", "/v2/team/app/manifests/1", headers={"X-Forwarded-For": "192.0.2.1", **OCI})[
                0
            ]
            == 200
        )

        office = {"X-Forwarded-For": written_as, **OCI}
        for credentials in (None, bob):
            status, _, _ = ask(gateway, "GET", "/v2/team/app/manifests/1", credentials, headers=office)
            assert status in (401, 403)
            status, _, body = ask(
                gateway, "PUT", "/v2/team/app/manifests/2", credentials, headers=office, body=b"{}"
            )
            assert status in (401, 403), body
        status, _, body = ask(gateway, "POST", "/v2/office/app/blobs/uploads/", bob, headers=office)
        assert status == 403, body
        assert registry.repositories() == {"team/app"}
        tags = registry.storage / "docker/registry/v2/repositories/team/app/_manifests/tags"
        assert sorted(path.name for path in tags.iterdir()) == ["1"]

        # Failed logins from the mapped form and the plain one are one pair's.
        ask(gateway, "GET", "/v2/", ("bob", "guess-1"), headers={"X-Forwarded-For": "10.1.2.3"})
        ask(gateway, "GET", "/v2/", ("bob", "guess-2"), headers=office)
        ask(gateway, "GET", "/v2/", ("bob", "guess-3"), headers={"X-Forwarded-For": "::ffff:10.1.2.3"})
        assert (
            ask(gateway, "GET", "/v2/", ("bob", "guess-4"), headers={"X-Forwarded-For": "10.1.2.3"})[0] == 429
        )
        records = [json.loads(line) for line in audit.read_text().splitlines()]
        office_records = [r for r in records if r["client"] not in ("127.0.0.1", "192.0.2.1")]
        assert office_records and {r["client"] for r in office_records} == {"10.1.2.3"}
    finally:
        stop(gateway.process)


def test_no_userinfo_reaches_the_audit_or_diagnostic_log(
    tmp_path: Path, registry: Registry, users_file: Path
) -> None:
    audit = tmp_path / "audit.log"
    gateway = start_gateway(tmp_path, registry.url, users_file, env={"GATEWAY_AUDIT_LOG": str(audit)})
    try:
        host, port = gateway.host.split(":")
        for target in (
            "http://bob:Sekr3tPW@registry.example/v2/",
            "//bob:Sekr3tPW@x/v2/",
            "//bob:Sekr3tPW@x/v2/?password=Sekr3tPW",
            "bob:Sekr3tPW@x:443",
        ):
            with socket.create_connection((host, int(port))) as sock:
                sock.sendall(
                    f"GET {target} HTTP/1.1\r\nHost: {gateway.host}\r\nConnection: close\r\n\r\n".encode()
                )
                sock.settimeout(10)
                answer = b""
                while chunk := sock.recv(65536):
                    answer += chunk
            assert answer.startswith(b"HTTP/1.1 4"), answer
            assert b"Sekr3tPW" not in answer
    finally:
        stop(gateway.process)
    records = audit.read_text()
    assert records.count("\n") >= 3
    assert "Sekr3tPW" not in records
    assert "***@" in records  # the host is still there to read
    assert "Sekr3tPW" not in gateway.log.read_text()


def test_the_metrics_token_is_guarded_by_the_lockout(
    tmp_path: Path, registry: Registry, users_file: Path
) -> None:
    """metrics_token_file is a secret like a password: guesses lock the scraper's address out,
    and then the right token gets the same 429 as a wrong one."""
    token = "metrics-token-0123456789abcdef"
    token_file = tmp_path / "metrics.token"
    token_file.write_text(token + "\n")
    metrics = f"127.0.0.1:{free_port()}"
    gateway = start_gateway(
        tmp_path,
        registry.url,
        users_file,
        env={
            "GATEWAY_METRICS_LISTEN": metrics,
            "GATEWAY_METRICS_TOKEN_FILE": str(token_file),
            "GATEWAY_LOCKOUT_ATTEMPTS": "3",
        },
    )
    scraper = Gateway(f"http://{metrics}", metrics, gateway.process, gateway.log)
    try:
        right = {"Authorization": f"Bearer {token}"}
        assert ask(scraper, "GET", "/metrics", headers=right)[0] == 200
        for attempt in range(3):
            assert (
                ask(scraper, "GET", "/metrics", headers={"Authorization": f"Bearer guess-{attempt}"})[0]
                == 401
            )
        assert ask(scraper, "GET", "/metrics", headers=right)[0] == 429
        assert ask(scraper, "GET", "/metrics", headers={"Authorization": "Bearer guess-9"})[0] == 429
        assert ask(scraper, "GET", "/metrics", headers=right, source="127.0.0.2")[0] == 200  # another address
        assert ask(scraper, "GET", "/healthz")[0] == 200  # probes carry no token, and guess nothing
    finally:
        stop(gateway.process)
    assert token not in gateway.log.read_text()


def test_guesses_sent_at_once_get_lockout_attempts_checks_in_all(
    tmp_path: Path, registry: Registry, users_file: Path
) -> None:
    """A guess was counted only once its check ended: 40 guesses sent at once all got a bcrypt
    check, the right one among them a 200."""
    users = tmp_path / "htpasswd"
    htpasswd_add(users, *DAVE, "-B")
    metrics = f"127.0.0.1:{free_port()}"
    gateway = start_gateway(
        tmp_path, registry.url, users, "--metrics-listen", metrics, env={"GATEWAY_LOCKOUT_ATTEMPTS": "5"}
    )
    try:
        checks = password_checks(metrics)
        guesses = [f"guess-{n}" for n in range(39)] + [DAVE[1]]
        with ThreadPoolExecutor(max_workers=40) as pool:
            statuses = list(pool.map(lambda pw: ask(gateway, "GET", "/v2/", (DAVE[0], pw))[0], guesses))
        assert password_checks(metrics) - checks <= 5
        assert statuses.count(429) >= 35 and set(statuses) <= {401, 429, 200}
        assert ask(gateway, "GET", "/v2/", DAVE)[0] == 429  # locked now, the right password too
    finally:
        stop(gateway.process)


def test_a_users_cached_logins_do_not_reset_a_guessers_count(
    tmp_path: Path, registry: Registry, users_file: Path
) -> None:
    """Behind one address (NAT, docker's userland proxy) the real user's requests went on while
    a guesser guessed; on the full path each cached login reset the guesser's count."""
    users = tmp_path / "htpasswd"
    htpasswd_add(users, *DAVE, "-B")
    gateway = start_gateway(tmp_path, registry.url, users, env={"GATEWAY_LOCKOUT_ATTEMPTS": "5"})
    try:
        assert ask(gateway, "GET", "/v2/", DAVE)[0] == 200  # dave's login, cached
        for round_ in range(2):
            for attempt in range(2):
                status = ask(gateway, "GET", "/v2/", (DAVE[0], f"guess-{round_}-{attempt}"))[0]
                assert status == 401
            for _ in range(3):  # dave carries on: uploads take the full path
                assert ask(gateway, "POST", "/v2/dave/app/blobs/uploads/", DAVE)[0] in (202, 403)
        assert ask(gateway, "GET", "/v2/", (DAVE[0], "guess-last"))[0] == 401  # the fifth
        assert ask(gateway, "GET", "/v2/", DAVE)[0] == 429
    finally:
        stop(gateway.process)


def test_made_up_names_in_refresh_tokens_are_one_pair(bearer_stack: Stack) -> None:
    """A refresh token's subject is read before it is verified: a made-up name for each guess
    took a slot of the lockout's table each, cheaply; they are counted as one pair."""
    gateway = bearer_stack.gateway
    _, headers = _form({})
    for name in ("nobody-1", "nobody-2", "nobody-3"):
        body, _ = _form({"grant_type": "refresh_token", "refresh_token": _forged_refresh_token(name)})
        assert ask(gateway, "POST", "/token", source="127.0.0.4", body=body, headers=headers)[0] == 401
    body, _ = _form({"grant_type": "refresh_token", "refresh_token": _forged_refresh_token("nobody-4")})
    assert ask(gateway, "POST", "/token", source="127.0.0.4", body=body, headers=headers)[0] == 429
    assert ask(gateway, "GET", "/v2/", DAVE, source="127.0.0.4")[0] == 200  # dave's pair is his own


def test_an_unreadable_forwarded_client_is_refused(
    tmp_path: Path, registry: Registry, users_file: Path
) -> None:
    """A client that a trusted proxy names by something that is no address would match no ip:
    rule, deny rules included: refused, on the fast path as on the full one."""
    gateway = start_gateway(tmp_path, registry.url, users_file, env={"GATEWAY_TRUSTED_PROXIES": "127.0.0.1"})
    try:
        for forwarded in ("unknown", "010.1.2.3", "10.1.2.3.4", "_hidden"):
            for method in ("GET", "HEAD"):
                status, _, body = ask(
                    gateway, method, "/v2/", ("alice", USERS["alice"]), headers={"X-Forwarded-For": forwarded}
                )
                assert status == 400, (forwarded, method, body)
        headers = {"X-Forwarded-For": "192.0.2.9"}
        assert ask(gateway, "GET", "/v2/", ("alice", USERS["alice"]), headers=headers)[0] == 200
    finally:
        stop(gateway.process)


@pytest.mark.parametrize(
    ("written", "password", "shown"),
    [
        (b"[: user: unexpected operator\n", "hunter2pw", "[: user: unexpected operator"),
        (b"checking hunter2pw\n", "hunter2pw", "checking ***"),
        (b"+ '[' 'it'\\''s-secret' = x ']'\n", "it's-secret", "(not shown"),  # set -x
        (b'{"password": "p\\u00e4ss-w0rd"}', "p\u00e4ss-w0rd", "(not shown"),  # JSON-escaped
        (b"line one\nline two\n", "", "line one; line two"),
    ],
)
def test_a_programs_output_never_shows_its_password(written: bytes, password: str, shown: str) -> None:
    from gateway.identity.external import shown_output

    assert shown_output(written, password).startswith(shown)


def test_spellings_of_a_name_are_one_users_guesses() -> None:
    from gateway.lockout import Lockout

    lockout = Lockout(attempts=3, window=300)
    for name in ("ALICE", "Alice ", " alice"):
        lockout.failed("10.0.0.1", name, 100.0, name.encode())
    assert lockout.locked("10.0.0.1", "alice", 101.0) is not None
