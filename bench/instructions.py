"""Instructions per proxied request, to compare builds of the gateway: deterministic, where time is not.

    python -m bench.instructions TREE [TREE ...]     # each a checkout, e.g. `git worktree add`

For each tree, the gateway it holds runs under valgrind's callgrind in front of Debian's
docker-registry, and the instructions its process executes are counted for N and for 2N
authenticated `HEAD /v2/<repo>/manifests/<tag>` (after a warm-up; `hey`, 2 connections, login
cache warm); the difference over N is printed. The same build counts the same within about
two percent whatever else the machine does, where CPU time per request (bench.py) varies by 10% and
more between runs on a shared 2-core machine, so a change of a few percent shows here and not
there. Instructions are not time: cache misses and the kernel's part (loopback TCP) are not in
them. Use this to tell whether a change to the request path makes it cheaper, and bench.py, side
by side with nginx, to tell what a request costs. Needs valgrind (`apt-get install valgrind`).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.bench import MANIFEST_TYPE, Bench, basic, free_port, need, seed_manifest, write_htpasswd

URL_PATH = "/v2/bench/app/manifests/1"


def head_requests(url: str, count: int) -> None:
    argv = [need("hey"), "-n", str(count), "-c", "2", "-m", "HEAD", "-H", f"Authorization: {basic()}"]
    argv += ["-H", f"Accept: {MANIFEST_TYPE}", url + URL_PATH]
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    if f"[200]\t{count} responses" not in out:
        raise SystemExit(f"instructions: not every request answered 200:\n{out[-1500:]}")


def instructions(bench: Bench, tree: Path, registry_url: str, htpasswd: Path, count: int, tag: str) -> int:
    """Instructions the gateway from `tree` executed, start to stop, serving `count` requests
    after a warm-up of 300."""
    port = free_port()
    out = bench.work / f"callgrind-{tag}"
    argv = [need("valgrind"), "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable]
    argv += ["-m", "gateway", "serve", "--listen", f"127.0.0.1:{port}", "--upstream", registry_url]
    argv += ["--htpasswd", str(htpasswd), "--workers", "1"]
    url = f"http://127.0.0.1:{port}"
    # The tree's own gateway package: run from the tree, with it first on the path.
    env = {"PYTHONPATH": str(tree)}
    gateway = bench.start(tag, argv, url, auth=True, cwd=tree, env=env, start_timeout=300)
    head_requests(url, 300)
    head_requests(url, count)
    gateway.stop()
    bench.services.remove(gateway)
    for line in out.read_text(errors="replace").splitlines():
        if line.startswith("totals:"):
            return int(line.split()[1])
    raise SystemExit(f"instructions: no totals in {out}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("trees", nargs="+", type=Path, help="checkouts whose gateway to measure")
    parser.add_argument("-n", type=int, default=500, help="requests counted (N; default 500)")
    args = parser.parse_args(argv)
    for tree in args.trees:
        if not (tree / "gateway" / "__main__.py").is_file():
            raise SystemExit(f"instructions: {tree} holds no gateway package")
    work = Path(tempfile.mkdtemp(prefix="gateway-instructions-"))
    bench = Bench(work, quick=False, workers=1)
    try:
        registry = bench.registry()
        seed_manifest(registry, work)
        htpasswd = work / "htpasswd"
        write_htpasswd(htpasswd, 10)
        results = []
        for index, tree in enumerate(args.trees):
            once = instructions(bench, tree.resolve(), registry.url, htpasswd, args.n, f"tree{index}-n")
            twice = instructions(bench, tree.resolve(), registry.url, htpasswd, 2 * args.n, f"tree{index}-2n")
            results.append((tree, (twice - once) / args.n))
    finally:
        bench.stop_all()
        shutil.rmtree(work, ignore_errors=True)
    first = results[0][1]
    for tree, per_request in results:
        print(f"{per_request:12,.0f} instructions per HEAD  {per_request / first:6.3f}x  {tree}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
