"""A layer many times the gateway's own size streams through without growing its memory."""

from __future__ import annotations

import base64
import hashlib
import http.client
import os
import threading
import time
from collections.abc import Iterator

from tests.conftest import USERS, Gateway, Registry
from tests.test_registry_e2e import request

BLOCK = os.urandom(1024 * 1024)
LAYER_MIB = 512
ALLOWED_GROWTH_KIB = 32 * 1024


class PeakSampler:
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.gateway.rss_kib())
            time.sleep(0.02)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _layer() -> Iterator[bytes]:
    for i in range(LAYER_MIB):
        yield i.to_bytes(8, "big") + BLOCK[8:]


def test_big_layer_push_and_pull_keep_memory_flat(gateway: Gateway, registry: Registry) -> None:
    auth = {"Authorization": "Basic " + base64.b64encode(b"admin:" + USERS["admin"].encode()).decode()}
    for _ in range(20):  # warm up: imports, first connections, the credential cache
        assert request(gateway, "GET", "/v2/", "admin")[0] == 200
    baseline = gateway.rss_kib()
    assert 8 * baseline <= LAYER_MIB * 1024, f"layer must be 8x the gateway's RSS ({baseline} KiB)"

    digest = hashlib.sha256()
    for block in _layer():
        digest.update(block)
    layer_digest = "sha256:" + digest.hexdigest()

    conn = http.client.HTTPConnection(gateway.host, timeout=300)
    with PeakSampler(gateway) as push:
        conn.request("POST", "/v2/big/layer/blobs/uploads/", body=b"", headers=auth)
        started = conn.getresponse()
        started.read()
        assert started.status == 202, started.status
        location = started.getheader("Location")
        assert location is not None and location.startswith(f"http://{gateway.host}/")
        upload_path = location.removeprefix(f"http://{gateway.host}")
        conn.request(
            "PATCH",
            upload_path,
            body=_layer(),
            headers={**auth, "Content-Type": "application/octet-stream"},
            encode_chunked=True,
        )
        patched = conn.getresponse()
        patched.read()
        assert patched.status == 202, patched.status
        next_path = (patched.getheader("Location") or "").removeprefix(f"http://{gateway.host}")
        separator = "&" if "?" in next_path else "?"
        conn.request("PUT", f"{next_path}{separator}digest={layer_digest}", body=b"", headers=auth)
        done = conn.getresponse()
        done.read()
        assert done.status == 201, done.status

    with PeakSampler(gateway) as pull:
        conn.request("GET", f"/v2/big/layer/blobs/{layer_digest}", headers=auth)
        response = conn.getresponse()
        assert response.status == 200
        pulled = hashlib.sha256()
        while chunk := response.read(1024 * 1024):
            pulled.update(chunk)
        assert "sha256:" + pulled.hexdigest() == layer_digest
    conn.close()

    print(f"gateway RSS KiB: baseline {baseline}, push peak {push.peak}, pull peak {pull.peak}")
    assert push.peak - baseline < ALLOWED_GROWTH_KIB, (baseline, push.peak)
    assert pull.peak - baseline < ALLOWED_GROWTH_KIB, (baseline, pull.peak)
