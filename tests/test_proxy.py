"""Header and streaming behaviour of the proxy, against a small in-process upstream that records requests.

The real registry tests (test_registry_e2e.py) prove the product works; these pin down the exact
bytes on the wire that a real registry would not let us observe or provoke (a 307 to object
storage, a gzip body, a slow or dead upstream).
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from yarl import URL

from gateway import config
from gateway.app import create_app
from tests.conftest import free_port, htpasswd_add

ADMIN = "Basic " + base64.b64encode(b"admin:admin-pw").decode()
READER = "Basic " + base64.b64encode(b"reader:reader-pw").decode()
DIGEST = "sha256:" + "c" * 64
BLOB = bytes(range(256)) * 4096  # 1 MiB


@dataclass
class Seen:
    requests: list[tuple[str, str, dict[str, list[str]], int]] = field(default_factory=list)
    aborted: list[str] = field(default_factory=list)


def _upstream_app(seen: Seen) -> web.Application:
    async def record(request: web.Request) -> int:
        total = 0
        try:
            async for chunk in request.content.iter_any():
                total += len(chunk)
        except (Exception, asyncio.CancelledError) as exc:  # a cut connection cancels the handler
            seen.aborted.append(f"{request.path} after {total} bytes: {type(exc).__name__}")
            raise
        headers: dict[str, list[str]] = {}
        for name, value in request.headers.items():
            headers.setdefault(name.lower(), []).append(value)
        seen.requests.append((request.method, request.raw_path, headers, total))
        return total

    async def handler(request: web.Request) -> web.StreamResponse:
        received = await record(request)
        path = request.path
        if path == "/v2/":
            return web.json_response({}, headers={"Docker-Distribution-Api-Version": "registry/2.0"})
        if path.endswith("/manifests/redirect"):
            return web.Response(status=307, headers={"Location": "http://storage.invalid/blob?sig=1"})
        if path.endswith("/manifests/gzip"):
            return web.Response(body=gzip.compress(b"hello" * 100), headers={"Content-Encoding": "gzip"})
        if path.endswith("/manifests/noversion"):
            return web.Response(text="no header")
        if path.endswith("/manifests/stall"):
            # Headers and a first piece, then nothing for longer than read_timeout.
            response = web.StreamResponse(headers={"Docker-Distribution-Api-Version": "registry/2.0"})
            response.content_length = 100
            await response.prepare(request)
            await response.write(b"x" * 10)
            await asyncio.sleep(0.6)
            await response.write(b"x" * 10)  # a pause shorter than read_timeout is fine
            await asyncio.sleep(5)
            return response
        if path.endswith("/manifests/slow"):
            await asyncio.sleep(5)
            return web.Response(text="late")
        if "/blobs/uploads/" in path:
            return web.Response(
                status=202,
                headers={
                    "Location": f"http://{request.headers['Host']}/v2/a/blobs/uploads/u?_state=x%3D%3D",
                    "Range": f"0-{received - 1}",
                    "Docker-Distribution-Api-Version": "registry/2.0",
                    "X-Received": str(received),
                    "X-Chunked": str(request.headers.get("Transfer-Encoding") == "chunked"),
                },
            )
        if "/blobs/" in path:
            response = web.StreamResponse(headers={"Docker-Distribution-Api-Version": "registry/2.0"})
            body = BLOB
            if "Range" in request.headers:
                start, end = (int(x) for x in request.headers["Range"].removeprefix("bytes=").split("-"))
                body = BLOB[start : end + 1]
                response.set_status(206)
                response.headers["Content-Range"] = f"bytes {start}-{end}/{len(BLOB)}"
            response.content_length = len(body)
            await response.prepare(request)
            if request.method != "HEAD":
                await response.write(body)
            return response
        return web.json_response({"path": path}, headers={"Docker-Distribution-Api-Version": "registry/2.0"})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    return app


@dataclass
class Rig:
    gateway: str
    seen: Seen
    session: aiohttp.ClientSession


async def _serve(app: web.Application) -> TestServer:
    server = TestServer(app, host="127.0.0.1", port=free_port())
    await server.start_server()
    return server


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    users = tmp_path / "htpasswd"
    htpasswd_add(users, "admin", "admin-pw", "-B")
    htpasswd_add(users, "reader", "reader-pw", "-B")
    seen = Seen()
    upstream = await _serve(_upstream_app(seen))
    settings = config.load(
        None,
        {},
        {
            "htpasswd": str(users),
            "upstream": f"http://127.0.0.1:{upstream.port}",
            "listen": "127.0.0.1:1",
        },
    )
    settings = config.Settings(**{**settings.__dict__, "read_timeout": 1.0})
    gateway = await _serve(create_app(settings))
    skip = ("Accept-Encoding", "User-Agent", "Accept")
    async with aiohttp.ClientSession(auto_decompress=False, skip_auto_headers=skip) as session:
        yield Rig(f"http://127.0.0.1:{gateway.port}", seen, session)
    await gateway.close()
    await upstream.close()


def url(rig: Rig, path: str) -> URL:
    return URL(rig.gateway + path, encoded=True)


async def test_api_version_header_exactly_once(rig: Rig) -> None:
    for path, auth in (
        ("/v2/", ADMIN),
        ("/v2/a/manifests/noversion", ADMIN),
        ("/v2/", None),
        ("/v2/a/manifests/x", "Basic !!"),
        ("/v2/a%2Fb/manifests/x", ADMIN),
    ):
        headers = {"Authorization": auth} if auth else {}
        async with rig.session.get(url(rig, path), headers=headers) as response:
            assert response.headers.getall("Docker-Distribution-Api-Version") == ["registry/2.0"], path
            assert response.headers.getall("Server") == ["registry-gateway"]  # no versions
            assert "Strict-Transport-Security" not in response.headers  # plain HTTP


async def test_authorization_never_reaches_upstream_and_forwarding_is_set(rig: Rig) -> None:
    async with rig.session.get(
        url(rig, "/v2/a/manifests/x"),
        headers={
            "Authorization": ADMIN,
            "X-Forwarded-For": "6.6.6.6",
            "Forwarded": "host=evil",
            "X-Forwarded-Host": "evil",
            "Host": "reg.example:8443",
        },
    ) as response:
        assert response.status == 200
    _, raw_path, headers, _ = rig.seen.requests[-1]
    assert raw_path == "/v2/a/manifests/x"
    assert "authorization" not in headers
    assert "forwarded" not in headers
    assert headers["host"] == ["reg.example:8443"]
    assert headers["x-forwarded-host"] == ["reg.example:8443"]
    assert headers["x-forwarded-for"] == ["127.0.0.1"]
    assert headers["x-forwarded-proto"] == ["http"]
    assert headers["x-real-ip"] == ["127.0.0.1"]


async def test_redirect_passed_through_not_followed(rig: Rig) -> None:
    async with rig.session.get(
        url(rig, "/v2/a/manifests/redirect"), headers={"Authorization": READER}, allow_redirects=False
    ) as response:
        assert response.status == 307
        assert response.headers["Location"] == "http://storage.invalid/blob?sig=1"
    assert len(rig.seen.requests) == 1


async def test_compressed_body_passed_through_untouched(rig: Rig) -> None:
    async with rig.session.get(url(rig, "/v2/a/manifests/gzip"), headers={"Authorization": READER}) as r:
        assert r.headers["Content-Encoding"] == "gzip"
        assert gzip.decompress(await r.read()) == b"hello" * 100
    # The gateway adds none of its client library's own headers.
    for name in ("accept-encoding", "user-agent", "accept", "content-type"):
        assert name not in rig.seen.requests[-1][2]


async def test_range_and_head(rig: Rig) -> None:
    path = f"/v2/a/blobs/{DIGEST}"
    async with rig.session.get(
        url(rig, path), headers={"Authorization": READER, "Range": "bytes=10-19"}
    ) as r:
        assert r.status == 206
        assert r.headers["Content-Range"] == f"bytes 10-19/{len(BLOB)}"
        assert await r.read() == BLOB[10:20]
    async with rig.session.head(url(rig, path), headers={"Authorization": READER}) as r:
        assert r.status == 200
        assert r.headers["Content-Length"] == str(len(BLOB))
        assert await r.read() == b""
    async with rig.session.get(url(rig, path), headers={"Authorization": READER}) as r:
        assert await r.read() == BLOB


async def test_upload_body_streamed_with_length_or_chunked(rig: Rig) -> None:
    path = "/v2/a/blobs/uploads/u?_state=abc%3D%3D"
    async with rig.session.patch(url(rig, path), data=BLOB, headers={"Authorization": ADMIN}) as r:
        assert r.status == 202
        assert r.headers["X-Received"] == str(len(BLOB))
        assert r.headers["X-Chunked"] == "False"
        assert r.headers["Location"].endswith("_state=x%3D%3D")
    # The query string reaches the registry byte for byte (its _state is HMAC-signed).
    assert rig.seen.requests[-1][1] == path
    assert rig.seen.requests[-1][2]["content-length"] == [str(len(BLOB))]

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(BLOB), 100_000):
            yield BLOB[i : i + 100_000]

    async with rig.session.patch(url(rig, path), data=chunks(), headers={"Authorization": ADMIN}) as r:
        assert r.headers["X-Received"] == str(len(BLOB))
        assert r.headers["X-Chunked"] == "True"


async def test_denied_requests_never_reach_upstream(rig: Rig) -> None:
    async with rig.session.put(
        url(rig, "/v2/a/manifests/x"), data=b"{}", headers={"Authorization": READER}
    ) as r:
        assert r.status == 403
        body = await r.json()
        assert body["errors"][0]["code"] == "DENIED"
        assert {"Type": "repository", "Name": "a", "Action": "push"} in body["errors"][0]["detail"]
    async with rig.session.get(url(rig, "/v2/a/manifests/x")) as r:
        assert r.status == 401
        assert r.headers["WWW-Authenticate"] == 'Basic realm="Registry realm"'
    async with rig.session.get(
        url(rig, "/v2/a/manifests/x"),
        headers={"Authorization": "Basic " + base64.b64encode(b"admin:no").decode()},
    ) as r:
        assert r.status == 401
    assert rig.seen.requests == []


async def test_upstream_timeout_is_504(rig: Rig) -> None:
    async with rig.session.get(url(rig, "/v2/a/manifests/slow"), headers={"Authorization": READER}) as r:
        assert r.status == 504
        assert (await r.json())["errors"][0]["code"] == "UNAVAILABLE"
        assert r.headers["Docker-Distribution-Api-Version"] == "registry/2.0"


async def test_a_registry_that_stalls_mid_body_is_cut_after_read_timeout(rig: Rig) -> None:
    # Quick exchanges first, on the same pooled connection: the quiet timer outlives each of them.
    for _ in range(3):
        async with rig.session.get(url(rig, "/v2/a/manifests/x"), headers={"Authorization": READER}) as r:
            assert r.status == 200
    started = time.monotonic()
    async with rig.session.get(url(rig, "/v2/a/manifests/stall"), headers={"Authorization": READER}) as r:
        assert r.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await r.read()  # never a short body that looks complete
    elapsed = time.monotonic() - started
    assert 1.4 < elapsed < 4, elapsed  # 0.6 s of body, then read_timeout (1 s) of silence
    async with rig.session.get(url(rig, "/v2/a/manifests/x"), headers={"Authorization": READER}) as r:
        assert r.status == 200


async def test_upstream_down_is_502(tmp_path: Path) -> None:
    users = tmp_path / "htpasswd"
    htpasswd_add(users, "reader", "reader-pw", "-B")
    settings = config.load(
        None,
        {},
        {
            "htpasswd": str(users),
            "upstream": f"http://127.0.0.1:{free_port()}",
            "listen": "127.0.0.1:1",
        },
    )
    gateway = await _serve(create_app(settings))
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(
                f"http://127.0.0.1:{gateway.port}/v2/a/manifests/x", headers={"Authorization": READER}
            ) as r,
        ):
            assert r.status == 502
            assert (await r.json())["errors"][0]["message"] == "the registry is unreachable"
            assert r.headers["Docker-Distribution-Api-Version"] == "registry/2.0"
    finally:
        await gateway.close()


async def test_client_abort_mid_upload_closes_upstream_request(rig: Rig) -> None:
    host, port = rig.gateway.removeprefix("http://").split(":")
    _reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        b"PATCH /v2/a/blobs/uploads/u HTTP/1.1\r\nHost: h\r\n"
        + f"Authorization: {ADMIN}\r\n".encode()
        + b"Transfer-Encoding: chunked\r\n\r\n"
    )
    for _ in range(10):
        writer.write(b"10000\r\n" + b"x" * 0x10000 + b"\r\n")
        await writer.drain()
    await asyncio.sleep(0.3)
    writer.transport.abort()  # the client goes away without finishing the chunked body
    for _ in range(50):
        if rig.seen.aborted:
            break
        await asyncio.sleep(0.1)
    assert rig.seen.aborted and rig.seen.aborted[0].startswith("/v2/a/blobs/uploads/u after")
    assert rig.seen.requests == []  # the upstream never saw a complete upload
    # And the gateway carries on.
    async with rig.session.get(url(rig, "/v2/"), headers={"Authorization": READER}) as r:
        assert r.status == 200


async def test_old_docker_clients_blocked_only_when_configured(rig: Rig, tmp_path: Path) -> None:
    old = {"Authorization": ADMIN, "User-Agent": "docker/1.5.0 go/go1.4"}
    async with rig.session.get(url(rig, "/v2/"), headers=old) as r:
        assert r.status == 200  # off by default
    users = tmp_path / "htpasswd"
    settings = config.load(
        None,
        {},
        {
            "htpasswd": str(users),
            "upstream": "http://127.0.0.1:1",
            "listen": "127.0.0.1:1",
        },
    )
    settings = config.Settings(**{**settings.__dict__, "block_old_clients": True})
    gateway = await _serve(create_app(settings))
    try:
        base = f"http://127.0.0.1:{gateway.port}/v2/"
        async with rig.session.get(base, headers=old) as r:
            assert r.status == 404
            assert (await r.json())["errors"][0]["code"] == "UNSUPPORTED"
        async with rig.session.get(base, headers={"User-Agent": "docker/24.0.7 go/go1.20"}) as r:
            assert r.status == 401  # a current client goes on to authentication
    finally:
        await gateway.close()


async def test_head_errors_have_length_and_no_body(rig: Rig) -> None:
    for headers, status in (({}, 401), ({"Authorization": READER}, 403)):
        async with rig.session.request(
            "DELETE" if status == 403 else "HEAD", url(rig, "/v2/a/manifests/x"), headers=headers
        ) as r:
            assert r.status == status
    async with rig.session.head(url(rig, f"/v2/a/blobs/{DIGEST}")) as r:
        assert r.status == 401
        assert int(r.headers["Content-Length"]) > 0
        assert r.headers["Docker-Distribution-Api-Version"] == "registry/2.0"
        assert await r.read() == b""
    async with rig.session.head(url(rig, "/v2/a%2Fb/manifests/x"), headers={"Authorization": READER}) as r:
        assert r.status == 400
        assert await r.read() == b""
