"""The benchmark's seconds-long smoke version runs end to end. No timing is asserted here."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


def test_quick_benchmark_produces_complete_results(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    run = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench.py"), "--quick", "--seconds", "0.3", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = json.loads(out.read_text())
    # Which build ran where, inside the file (bench/results/ keeps the reference and the latest).
    assert re.fullmatch(r"[0-9a-f]{40}", results["commit"]["hash"]) and results["commit"]["dirty"] in (
        True,
        False,
    )
    assert results["machine"]["cpus"] == os.cpu_count() and results["run"]["quick"] is True
    for case in ("cost10_c2", "cost10_c32", "cost5_c2", "cost5_c32"):
        for target in ("registry", "nginx", "nginx_plain", "gateway"):
            assert results["head"][case][target]["rps"] > 0
            assert results["head"][case][target]["errors"] == 0, (case, target)
            # Every target's CPU per request is reported (a sub-tick run may measure 0).
            assert results["head"][case][target]["cpu_us_per_request"] >= 0, (case, target)
        assert "gateway_cpu_vs_nginx_plain" in results["head"][case]["ratios"]
    assert results["token"]["nginx_plain"]["rps"] > 0
    assert results["token"]["nginx_plain_new_connections"]["rps"] > 0
    assert (
        results["token"]["nginx_plain_get"]["rps"] > 0 and results["token"]["nginx_plain_get"]["errors"] == 0
    )
    for mode in ("basic", "bearer", "basic_new_connections", "basic_get"):
        assert results["token"][mode]["rps"] > 0 and results["token"][mode]["errors"] == 0, mode
        assert results["token"][mode]["cpu_us_per_request"] > 0
    transfer = results["transfer"]
    for key in ("pull_cpu_s_per_GB", "push_cpu_s_per_GB"):  # reported; an 8 MiB run may measure 0
        assert set(transfer[key]) == {"registry", "nginx", "gateway"}
        assert all(value >= 0 for value in transfer[key].values())
    # curl's CPU is counted to the microsecond: the whole cost of a pull is never zero.
    for key in ("pull_MBps", "push_MBps", "skopeo_push_MBps", "skopeo_pull_MBps", "pull_all_cpu_s_per_GB"):
        assert set(transfer[key]) == {"registry", "nginx", "gateway"}
        assert all(value > 0 for value in transfer[key].values())
    assert transfer["pull_ceiling_MBps"]["gateway"] == pytest.approx(
        (os.cpu_count() or 1) / transfer["pull_all_cpu_s_per_GB"]["gateway"] * 1e3
    )
    memory = results["memory"]
    assert memory["big"]["push_peak_rss_mib"] > 0 and memory["big"]["cpu_seconds_per_GB"] > 0
    assert set(results["scaling"]["users"]) == {"1", "1000"}
    assert set(results["scaling"]["rules"]) == {"1", "50"}
    assert "authenticated HEAD manifest" in run.stdout


def test_quick_replicas_run_reports_every_target_with_its_ratios(tmp_path: Path) -> None:
    """`--replicas`: HAProxy alone and HAProxy in front of N gateways sharing one Redis, against one
    registry, each with its rate, CPU per request (all processes, the gateways' share) and ratios."""
    out = tmp_path / "replicas.json"
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "bench.py"),
            "--quick",
            "--replicas",
            "1,2",
            "--seconds",
            "0.3",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = json.loads(out.read_text())
    assert re.fullmatch(r"[0-9a-f]{40}", results["commit"]["hash"])
    assert results["run"]["mode"] == "replicas" and len(results["run"]["load_average_at_start"]) == 3
    replicas = results["replicas"]
    assert replicas["replica_counts"] == [1, 2]
    targets = {"direct", "haproxy_registry", "haproxy_gateways_1", "haproxy_gateways_2"}
    for conns in ("c2", "c32"):
        summary = replicas[conns]
        assert set(summary) == targets
        for name, target in summary.items():
            assert target["rps"] > 0 and target["errors"] == 0, (conns, name)
            cpu = target["cpu_us_per_request"]
            parts = {part: value for part, value in cpu.items() if part not in ("all", "client")}
            # A sub-tick run may measure 0 for a part; the sum is the sum of the parts.
            assert cpu["all"] == pytest.approx(sum(parts.values())) and min(parts.values()) >= 0
            ratios = target["ratios"]
            assert ratios["rps_vs_direct"] == pytest.approx(target["rps"] / summary["direct"]["rps"])
            assert ratios["rps_vs_haproxy_registry"] == pytest.approx(
                target["rps"] / summary["haproxy_registry"]["rps"]
            )
            assert "cpu_all_vs_direct" in ratios and "cpu_all_vs_haproxy_registry" in ratios
        # Every process a request passes through is counted, and only those.
        assert set(summary["direct"]["cpu_us_per_request"]) == {"registry", "all", "client"}
        hop_parts = set(summary["haproxy_registry"]["cpu_us_per_request"])
        assert hop_parts == {"haproxy", "registry", "all", "client"}
        for count in (1, 2):
            assert set(summary[f"haproxy_gateways_{count}"]["cpu_us_per_request"]) == {
                "haproxy",
                "gateways",
                "registry",
                "redis",
                "all",
                "client",
            }
    for line in ("registry direct", "HAProxy -> registry", "HAProxy -> 1 gateway", "HAProxy -> 2 gateways"):
        assert sum(row.startswith(line + " ") for row in run.stdout.splitlines()) == 2, line
    assert "rps/hop" in run.stdout and "cpu/direct" in run.stdout
    assert "measure the hop and the sharing, not scaling" in run.stdout
    assert replicas["other_work_cores"] >= 0 and "other work on the machine" in run.stdout
    assert results["table"] in run.stdout


def test_quick_caddy_run_reports_every_target_with_its_ratios(tmp_path: Path) -> None:
    """`--caddy`: Caddy's reverse_proxy and basicauth and the gateway, each over HTTP and TLS, against
    one registry, each with its rate, p50, CPU per request (all processes, the proxy's share), the
    gateway/Caddy ratios for the same job and what TLS adds to each. No speed is asserted."""
    out = tmp_path / "caddy.json"
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "bench.py"),
            "--quick",
            "--caddy",
            "--seconds",
            "0.3",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = json.loads(out.read_text())
    assert re.fullmatch(r"[0-9a-f]{40}", results["commit"]["hash"])
    assert results["run"]["mode"] == "caddy" and len(results["run"]["load_average_at_start"]) == 3
    caddy = results["caddy"]
    assert caddy["bcrypt_cost"] == 10 and re.match(r"v?2\.\d+", caddy["caddy_version"])
    proxies = {
        "caddy_plain_http": "caddy",
        "caddy_plain_tls": "caddy",
        "caddy_basic_http": "caddy",
        "caddy_basic_tls": "caddy",
        "gateway_http": "gateway",
        "gateway_tls": "gateway",
    }
    for case in ("c2", "c32", "c2_new_connections"):
        summary = caddy[case]
        assert summary["keepalive"] is (case != "c2_new_connections")
        targets = summary["targets"]
        assert set(targets) == {"direct", *proxies}
        for name, target in targets.items():
            # Every answer a 200: the TLS handshakes succeeded and the credentials were taken.
            assert target["rps"] > 0 and target["errors"] == 0, (case, name)
            assert target["rps_vs_direct"] == pytest.approx(target["rps"] / targets["direct"]["rps"])
            cpu = target["cpu_us_per_request"]
            parts = {part: value for part, value in cpu.items() if part not in ("all", "client")}
            # Every process a request passes through, and only those; a sub-tick run may measure 0.
            assert set(parts) == ({"registry", proxies[name]} if name in proxies else {"registry"}), name
            assert cpu["all"] == pytest.approx(sum(parts.values())) and min(parts.values()) >= 0
        for job in ("plain_http", "plain_tls", "basicauth_http", "basicauth_tls"):
            ratios = summary["gateway_vs_caddy"][job]
            gateway, caddy_label = (
                ("gateway_tls" if job.endswith("tls") else "gateway_http"),
                ("caddy_plain_" if job.startswith("plain") else "caddy_basic_") + job.rpartition("_")[2],
            )
            assert ratios["rps"] == pytest.approx(targets[gateway]["rps"] / targets[caddy_label]["rps"])
            assert "cpu_all" in ratios and "cpu_proxy" in ratios
        tls_cost = summary["tls_cost"]
        for name in ("gateway", "caddy_basicauth", "caddy_plain"):
            assert {"added_proxy_cpu_us", "added_all_cpu_us", "rps_tls_vs_http"} <= set(tls_cost[name])
        assert "gateway_vs_caddy_basicauth_added_proxy_cpu" in tls_cost
    lines = run.stdout.splitlines()
    for label in (
        "registry direct",
        "Caddy proxy, HTTP",
        "Caddy proxy, TLS",
        "Caddy basicauth, HTTP",
        "Caddy basicauth, TLS",
        "gateway Basic, HTTP",
        "gateway Basic, TLS",
    ):
        assert sum(row.startswith(label + " ") for row in lines) == 3, label
    for job in ("plain_http", "plain_tls", "basicauth_http", "basicauth_tls"):
        assert sum(row.strip().startswith(job + " ") for row in lines) == 3, job
    assert run.stdout.count("gateway/Caddy, same job") == 3
    assert run.stdout.count("TLS termination, proxy CPU us per request added by TLS") == 3
    assert "other work on the machine" in run.stdout and results["table"] in run.stdout
