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
