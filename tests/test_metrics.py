"""The request counts and upstream latency, kept as plain counts (gateway.metrics): exposed as
prometheus_client's own Counter and Histogram would expose the same observations."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from gateway.authn import CredentialCache
from gateway.metrics import LATENCY_BUCKETS, Metrics
from gateway.state import AccessStore

REQUESTS = [("pull", 200, "allow"), ("pull", 200, "allow"), ("push", 403, "deny"), ("invalid", 0, "error")]
LATENCIES = [("pull", 0.0004), ("pull", 0.001), ("pull", 0.0011), ("push", 2.5), ("push", 61.0), ("pull", 0)]


def families(exposition: bytes, *names: str) -> list[str]:
    """The exposition's lines of the named families (help, type and samples), less `_created`."""
    return sorted(
        line
        for line in exposition.decode().splitlines()
        if any(name in line for name in names) and "_created" not in line
    )


def test_counts_and_latency_are_exposed_as_prometheus_client_would(tmp_path: Path) -> None:
    (tmp_path / "htpasswd").write_text("")
    metrics = Metrics(CredentialCache(10, 60), AccessStore(tmp_path / "htpasswd"))
    reference = CollectorRegistry()
    labels = ["operation", "status", "decision"]
    requests = Counter("registry_gateway_requests", "Requests under /v2/", labels, registry=reference)
    latency = Histogram(
        "registry_gateway_upstream_latency_seconds",
        "Time until the registry's response headers",
        ["operation"],
        registry=reference,
        buckets=LATENCY_BUCKETS,
    )
    for operation, status, decision in REQUESTS:
        metrics.count_request(operation, status, decision)
        requests.labels(operation, str(status), decision).inc()
    for operation, seconds in LATENCIES:
        metrics.observe_upstream(operation, seconds)
        latency.labels(operation).observe(seconds)

    names = ("registry_gateway_requests", "registry_gateway_upstream_latency_seconds")
    ours = families(metrics.exposition(), *names)
    assert ours == families(generate_latest(reference), *names)
    assert 'registry_gateway_requests_total{decision="allow",operation="pull",status="200"} 2.0' in ours
    assert 'registry_gateway_upstream_latency_seconds_bucket{le="0.001",operation="pull"} 3.0' in ours
    assert 'registry_gateway_upstream_latency_seconds_bucket{le="+Inf",operation="push"} 2.0' in ours
