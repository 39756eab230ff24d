"""CPU per request and transfer rates of two or more builds of the gateway, side by side in one run.

    python -m bench.builds TREE TREE [...]      # each a checkout, e.g. `git worktree add /tmp/old HEAD~3`

Each tree's gateway runs in front of the same Debian docker-registry; rounds interleave the
builds, in turned order (A B, B A, A B, ...), so that drift of a shared machine, and which build
goes first, hit them alike. Each
round is `hey` for a few seconds on 2 kept-alive connections, HEAD and then GET of a manifest with
Basic credentials (login cache warm), and the gateway's CPU time (user + system, its process
and children) over the requests answered; then a pull and a push of a blob (`--blob-mib`, curl).
Medians of the rounds, and each build's ratio to the first. A change to the request path is
judged on this and on bench.instructions (deterministic), not on one build's run against
another day's.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from bench.bench import (
    Bench,
    cpu_seconds,
    curl_pull,
    curl_push,
    free_port,
    hey,
    random_file,
    seed_manifest,
    write_htpasswd,
)

URL_PATH = "/v2/bench/app/manifests/1"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("trees", nargs="+", type=Path, help="checkouts whose gateway to measure")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=3.0, help="length of one hey run")
    parser.add_argument("--blob-mib", type=int, default=256, help="the blob pulled and pushed")
    args = parser.parse_args(argv)
    for tree in args.trees:
        if not (tree / "gateway" / "__main__.py").is_file():
            raise SystemExit(f"builds: {tree} holds no gateway package")
    work = Path(tempfile.mkdtemp(prefix="gateway-builds-"))
    bench = Bench(work, quick=False, workers=1)
    cpu: dict[tuple[str, int], list[float]] = {}
    rates: dict[tuple[str, int], list[float]] = {}
    try:
        registry = bench.registry()
        seed_manifest(registry, work)
        htpasswd = work / "htpasswd"
        write_htpasswd(htpasswd, 10)
        gateways = []
        for index, tree in enumerate(args.trees):
            port = free_port()
            argv = [sys.executable, "-m", "gateway", "serve", "--listen", f"127.0.0.1:{port}"]
            argv += ["--upstream", registry.url, "--htpasswd", str(htpasswd), "--workers", "1"]
            source = tree.resolve()
            gateways.append(
                bench.start(
                    f"build{index}",
                    argv,
                    f"http://127.0.0.1:{port}",
                    True,
                    source,
                    {"PYTHONPATH": str(source)},
                )
            )
        for gateway in gateways:  # warm: the login cache, the known heads
            hey(gateway.url + URL_PATH, True, 2, 1.0)
        blob = work / "blob.bin"
        digest = random_file(blob, args.blob_mib)
        curl_push(registry.url, "bench/blob", blob, digest, auth=False)
        for round_ in range(args.rounds):
            # The order turns every round: on a 2-core machine the build measured first in a round
            # was seen to run up to 9% cheaper or dearer than the same build second.
            order = list(enumerate(gateways))
            if round_ % 2:
                order.reverse()
            for method in ("HEAD", "GET"):
                for index, gateway in order:
                    before = cpu_seconds(gateway.process.pid)
                    result = hey(gateway.url + URL_PATH, True, 2, args.seconds, method=method)
                    spent = cpu_seconds(gateway.process.pid) - before
                    cpu.setdefault((method, index), []).append(spent / (result.rps * args.seconds) * 1e6)
            for index, gateway in order:
                pulled = curl_pull(f"{gateway.url}/v2/bench/blob/blobs/{digest}", True)
                rates.setdefault(("pull", index), []).append(pulled / 1e6)
                pushed = curl_push(gateway.url, f"bench/push{index}", blob, digest, True)
                rates.setdefault(("push", index), []).append(pushed / 1e6)
    finally:
        bench.stop_all()
        shutil.rmtree(work, ignore_errors=True)
    for method in ("HEAD", "GET"):
        first = statistics.median(cpu[(method, 0)])
        for index, tree in enumerate(args.trees):
            median = statistics.median(cpu[(method, index)])
            print(f"{method:5} {median:8.1f} µs CPU per request  {median / first:6.3f}x  {tree}")
    for transfer in ("pull", "push"):
        first = statistics.median(rates[(transfer, 0)])
        for index, tree in enumerate(args.trees):
            median = statistics.median(rates[(transfer, index)])
            print(f"{transfer:5} {median:8.1f} MB/s                 {median / first:6.3f}x  {tree}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
