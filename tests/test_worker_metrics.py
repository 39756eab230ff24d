"""`workers` above 1 with `metrics_listen`: one address reports the whole gateway (every worker's
counts added up, by the metrics process of gateway.metrics_hub), `/healthz` and `/readyz` keep
working, the metrics token still guards `/metrics`, and a worker killed is replaced and counted
again. With the real registry and real processes; the merge itself is tested as a table."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from gateway.metrics_merge import merge
from tests.conftest import USERS, Registry, free_port, start_gateway, stop
from tests.test_guards import ask

COUNTER = """# HELP registry_gateway_requests_total Requests
# TYPE registry_gateway_requests_total counter
registry_gateway_requests_total{operation="base",status="200",decision="allow"} {value}
"""
UP = """# HELP registry_gateway_redis_up Redis answers
# TYPE registry_gateway_redis_up gauge
registry_gateway_redis_up {value}
"""
IN_FLIGHT = """# HELP registry_gateway_in_flight_requests In flight
# TYPE registry_gateway_in_flight_requests gauge
registry_gateway_in_flight_requests {value}
"""
LOADED = """# HELP registry_gateway_config_loaded_timestamp_seconds Loaded
# TYPE registry_gateway_config_loaded_timestamp_seconds gauge
registry_gateway_config_loaded_timestamp_seconds {value}
"""
HISTOGRAM = """# HELP lat Latency
# TYPE lat histogram
lat_bucket{{le="0.1"}} {low}
lat_bucket{{le="+Inf"}} {all}
lat_sum {total}
lat_count {all}
"""


@pytest.mark.parametrize(
    ("texts", "expected"),
    [
        ([COUNTER.replace("{value}", "3.0"), COUNTER.replace("{value}", "4.0")],
         'registry_gateway_requests_total{decision="allow",operation="base",status="200"} 7.0'),
        ([UP.replace("{value}", "1.0"), UP.replace("{value}", "0.0")], "registry_gateway_redis_up 0.0"),
        ([UP.replace("{value}", "1.0"), UP.replace("{value}", "1.0")], "registry_gateway_redis_up 1.0"),
        ([IN_FLIGHT.replace("{value}", "2.0"), IN_FLIGHT.replace("{value}", "5.0")],
         "registry_gateway_in_flight_requests 7.0"),
        ([HISTOGRAM.format(low=1, all=2, total=0.5), HISTOGRAM.format(low=3, all=5, total=1.5)],
         'lat_bucket{le="0.1"} 4.0\nlat_bucket{le="+Inf"} 7.0\nlat_sum 2.0\nlat_count 7.0'),
        ([LOADED.replace("{value}", "1700000000.0"), LOADED.replace("{value}", "1600000000.0")],
         "registry_gateway_config_loaded_timestamp_seconds 1600000000.0"),
        ([COUNTER.replace("{value}", "3.0"), ""],
         'registry_gateway_requests_total{decision="allow",operation="base",status="200"} 3.0'),
    ],
)  # fmt: skip
def test_merge_adds_up_workers(texts: list[str], expected: str) -> None:
    merged = merge(texts)
    assert expected in merged, merged
    assert merge(merged for _ in range(1)) == merged  # its own output reads back the same


def test_merge_keeps_label_values_escaped() -> None:
    text = COUNTER.replace('decision="allow"', 'decision="a\\"b"').replace("{value}", "1.0")
    assert 'decision="a\\"b"' in merge([text, text])


def _get(address: str, path: str, token: str | None = None) -> tuple[int, str]:
    request = urllib.request.Request(f"http://{address}{path}")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _requests_counted(text: str) -> float:
    return sum(
        float(match.group(1))
        for match in re.finditer(
            r'^registry_gateway_requests_total\{[^}]*operation="login"[^}]*\} (\S+)$', text, re.M
        )
    )


def test_metrics_report_every_worker(tmp_path: Path, registry: Registry, users_file: Path) -> None:
    metrics = f"127.0.0.1:{free_port()}"
    token = "metrics-token-0123456789abcdef"
    (tmp_path / "metrics.token").write_text(token + "\n")
    gateway = start_gateway(
        tmp_path,
        registry.url,
        users_file,
        "--workers",
        "2",
        "--metrics-listen",
        metrics,
        env={"GATEWAY_METRICS_TOKEN_FILE": str(tmp_path / "metrics.token")},
    )
    try:
        deadline = time.monotonic() + 20
        while _get(metrics, "/healthz")[0] != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        before = _requests_counted(_get(metrics, "/metrics", token)[1])
        # Many connections: SO_REUSEPORT spreads them over both workers.
        for _ in range(40):
            assert ask(gateway, "GET", "/v2/", ("admin", USERS["admin"]))[0] == 200
        status, text = _get(metrics, "/metrics", token)
        assert status == 200
        assert _requests_counted(text) - before == 40  # all of them, whichever worker served
        assert "registry_gateway_workers_reporting 2.0" in text
        assert _get(metrics, "/metrics")[0] == 401  # the token still guards it
        status, body = _get(metrics, "/readyz")
        answer = json.loads(body)
        assert status == 200 and answer["status"] == "ok" and answer["workers"] == {"0": "ok", "1": "ok"}
        # A worker killed is replaced; the metrics process reports both again.
        workers = [
            int(pid)
            for pid in Path(f"/proc/{gateway.process.pid}/task/{gateway.process.pid}/children")
            .read_text()
            .split()
        ]
        assert len(workers) == 3  # two workers and the metrics process
        for pid in workers:
            if "registry-gateway-metrics" not in Path(f"/proc/{pid}/cmdline").read_bytes().decode(
                "utf-8", "replace"
            ):
                victim = pid
                break
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while "registry_gateway_workers_reporting 2.0" not in _get(metrics, "/metrics", token)[1]:
            assert time.monotonic() < deadline, "the replaced worker never reported"
            time.sleep(0.1)
        assert _get(metrics, "/healthz")[0] == 200
    finally:
        stop(gateway.process)


def test_a_hung_worker_does_not_keep_the_gateway_from_stopping(
    tmp_path: Path, registry: Registry, users_file: Path
) -> None:
    gateway = start_gateway(
        tmp_path,
        registry.url,
        users_file,
        "--workers",
        "2",
        "--metrics-listen",
        f"127.0.0.1:{free_port()}",
        env={"GATEWAY_SHUTDOWN_GRACE": "1"},
    )
    children = Path(f"/proc/{gateway.process.pid}/task/{gateway.process.pid}/children").read_text().split()
    hung = int(children[0])
    try:
        os.kill(hung, signal.SIGSTOP)  # a worker that will never answer SIGTERM
        gateway.process.send_signal(signal.SIGTERM)
        assert gateway.process.wait(timeout=30) == 0  # shutdown_grace and 5 s more, then killed
        assert "still runs" in gateway.log.read_text()
        with pytest.raises(ProcessLookupError):
            os.kill(hung, 0)
    finally:
        stop(gateway.process)
        with contextlib.suppress(ProcessLookupError):
            os.kill(hung, signal.SIGKILL)  # ours: started by the gateway this test started
