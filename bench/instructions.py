"""Instructions per proxied request, to compare builds of the gateway: deterministic, where time is not.

    python -m bench.instructions TREE [TREE ...]     # each a checkout, e.g. `git worktree add`

For each tree, the gateway it holds runs under valgrind's callgrind in front of Debian's
docker-registry, and the instructions its process executes are counted for N and for 2N
authenticated `HEAD /v2/<repo>/manifests/<tag>` (after a warm-up of 300; 2 at a time, login cache
warm); the difference over N is printed. Three loads (`--load`), as a change can help one and not
the others:

- `repeat`: `hey` on 2 kept-alive connections, every head the same (a poller's load, and the
  issue's benchmark);
- `varying`: 2 kept-alive connections, each head with an `X-Request-Id` of its own, so no two
  heads have the same header section;
- `close`: every head on a connection of its own with `Connection: close`, as skopeo and podman
  send every request.

The same build counts the same within about
two percent whatever else the machine does, where CPU time per request (bench.py) varies by 10% and
more between runs on a shared 2-core machine, so a change of a few percent shows here and not
there. Instructions are not time: cache misses and the kernel's part (loopback TCP) are not in
them. Use this to tell whether a change to the request path makes it cheaper, and bench.py, side
by side with nginx, to tell what a request costs. Needs valgrind (`apt-get install valgrind`).
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

from bench.bench import MANIFEST_TYPE, Bench, basic, free_port, need, seed_manifest, write_htpasswd

URL_PATH = "/v2/bench/app/manifests/1"


def head_requests(url: str, count: int) -> None:
    argv = [need("hey"), "-n", str(count), "-c", "2", "-m", "HEAD", "-H", f"Authorization: {basic()}"]
    argv += ["-H", f"Accept: {MANIFEST_TYPE}", url + URL_PATH]
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    if f"[200]\t{count} responses" not in out:
        raise SystemExit(f"instructions: not every request answered 200:\n{out[-1500:]}")


def _own_heads(url: str, count: int, close: bool) -> None:
    """`count` heads, 2 at a time: on 2 kept-alive connections with a header changing every
    request, or (`close`) each on a connection of its own with `Connection: close`."""
    host, port = url.removeprefix("http://").split(":")
    failures: list[bytes] = []

    def head(client: int, index: int) -> bytes:
        extra = "Connection: close\r\n" if close else f"X-Request-Id: {client}-{index}\r\n"
        return (
            f"HEAD {URL_PATH} HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: {basic()}\r\n"
            f"Accept: {MANIFEST_TYPE}\r\n{extra}\r\n"
        ).encode()

    def client(number: int) -> None:
        sock: socket.socket | None = None
        for index in range(count // 2):
            if sock is None:
                sock = socket.create_connection((host, int(port)), timeout=30)
            sock.sendall(head(number, index))
            with sock.makefile("rb") as reader:  # a HEAD's answer: its head alone
                status = reader.readline()
                while reader.readline() not in (b"\r\n", b""):
                    pass
            if b" 200 " not in status:
                failures.append(status)
            if close:
                sock.close()
                sock = None
        if sock is not None:
            sock.close()

    threads = [threading.Thread(target=client, args=(number,)) for number in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise SystemExit(f"instructions: not every request answered 200: {failures[:3]}")


def varying_heads(url: str, count: int) -> None:
    _own_heads(url, count, close=False)


def closing_heads(url: str, count: int) -> None:
    _own_heads(url, count, close=True)


LOADS: dict[str, Callable[[str, int], None]] = {
    "repeat": head_requests,
    "varying": varying_heads,
    "close": closing_heads,
}


def instructions(
    bench: Bench, tree: Path, registry_url: str, htpasswd: Path, count: int, tag: str, load: str
) -> int:
    """Instructions the gateway from `tree` executed, start to stop, serving `count` requests of
    `load` after a warm-up of 300."""
    port = free_port()
    out = bench.work / f"callgrind-{tag}"
    argv = [need("valgrind"), "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable]
    argv += ["-m", "gateway", "serve", "--listen", f"127.0.0.1:{port}", "--upstream", registry_url]
    argv += ["--htpasswd", str(htpasswd), "--workers", "1"]
    url = f"http://127.0.0.1:{port}"
    # The tree's own gateway package: run from the tree, with it first on the path.
    env = {"PYTHONPATH": str(tree)}
    gateway = bench.start(tag, argv, url, auth=True, cwd=tree, env=env, start_timeout=300)
    LOADS[load](url, 300)
    LOADS[load](url, count)
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
    parser.add_argument(
        "--load", choices=sorted(LOADS), action="append", help="the load (repeatable; default: all three)"
    )
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
        for load in args.load or list(LOADS):
            for index, tree in enumerate(args.trees):
                tag = f"tree{index}-{load}"
                source = tree.resolve()
                once = instructions(bench, source, registry.url, htpasswd, args.n, f"{tag}-n", load)
                twice = instructions(bench, source, registry.url, htpasswd, 2 * args.n, f"{tag}-2n", load)
                results.append((load, tree, (twice - once) / args.n))
    finally:
        bench.stop_all()
        shutil.rmtree(work, ignore_errors=True)
    first: dict[str, float] = {}
    for load, tree, per_request in results:
        first.setdefault(load, per_request)
        ratio = per_request / first[load]
        print(f"{load:8} {per_request:12,.0f} instructions per HEAD  {ratio:6.3f}x  {tree}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
