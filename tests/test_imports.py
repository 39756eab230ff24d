"""The package's modules import each other without cycles, read from the source (ast, nothing run).

Every import counts, wherever it is written: at module level, inside a function (run later, but
still a dependency of the module) and under `if TYPE_CHECKING:` (the types name the module).
Importing `gateway.a.b` also runs `gateway/a/__init__.py`, so the package is a dependency too.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import gateway

PACKAGE_DIR = Path(gateway.__file__).parent


@dataclass(frozen=True)
class Edge:
    """`importer` imports `imported` at `line` of its file."""

    importer: str
    imported: str
    line: int


def module_files(package_dir: Path) -> dict[str, Path]:
    """Every module of the package under `package_dir`, by dotted name."""
    root = package_dir.name
    modules = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = path.relative_to(package_dir).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join((root, *parts))] = path
    return modules


def _known(name: str, modules: Mapping[str, Path]) -> str | None:
    """The module `name` is, or the nearest package holding it (`pkg.mod.Name` is in pkg.mod)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _with_packages(name: str) -> Iterator[str]:
    """`name` and the packages above it: importing a.b.c runs a/__init__ and a/b/__init__ first."""
    while name:
        yield name
        name = name.rpartition(".")[0]


def imports_of(name: str, path: Path, modules: Mapping[str, Path]) -> list[Edge]:
    """The package's modules that module `name` (at `path`) imports, anywhere in its source."""
    is_package = path.name == "__init__.py"
    own_package = name if is_package else name.rpartition(".")[0]
    edges: list[Edge] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = own_package
                for _ in range(node.level - 1):
                    anchor = anchor.rpartition(".")[0]
                base = f"{anchor}.{base}" if base else anchor
            # `from pkg import mod` imports the module pkg.mod; `from mod import Name` imports mod.
            targets = [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            known = _known(target, modules)
            if known is None:
                continue  # outside the package
            edges.extend(
                Edge(name, imported, node.lineno)
                for imported in _with_packages(known)
                if imported != name and imported in modules
            )
    return edges


def import_cycles(package_dir: Path) -> list[list[Edge]]:
    """Each group of modules that import one another in a circle (a strongly connected component
    of more than one module), as the imports among its members, sorted."""
    modules = module_files(package_dir)
    edges = sorted(
        {edge for name, path in modules.items() for edge in imports_of(name, path, modules)},
        key=lambda e: (e.importer, e.line, e.imported),
    )
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for edge in edges:
        graph[edge.importer].add(edge.imported)
    # Tarjan's algorithm, iterative (no recursion limit to worry about).
    index: dict[str, int] = {}
    lowlink: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work: list[tuple[str, Iterator[str]]] = [(start, iter(sorted(graph[start])))]
        index[start] = lowlink[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, successors = work[-1]
            for successor in successors:
                if successor not in index:
                    index[successor] = lowlink[successor] = len(index)
                    stack.append(successor)
                    on_stack.add(successor)
                    work.append((successor, iter(sorted(graph[successor]))))
                    break
                if successor in on_stack:
                    lowlink[node] = min(lowlink[node], index[successor])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    lowlink[parent] = min(lowlink[parent], lowlink[node])
                if lowlink[node] == index[node]:
                    component = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.add(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        components.append(component)
    return sorted(
        ([e for e in edges if e.importer in c and e.imported in c] for c in components),
        key=lambda cycle: (cycle[0].importer, cycle[0].imported),
    )


def describe(cycles: list[list[Edge]], package_dir: Path) -> str:
    lines = []
    for cycle in cycles:
        members = sorted({edge.importer for edge in cycle})
        lines.append("cycle among " + ", ".join(members) + ":")
        files = module_files(package_dir)
        for edge in cycle:
            where = f"{files[edge.importer].relative_to(package_dir.parent)}:{edge.line}"
            lines.append(f"  {edge.importer} -> {edge.imported}  ({where})")
    return "\n".join(lines)


def test_the_package_has_no_import_cycle() -> None:
    cycles = import_cycles(PACKAGE_DIR)
    assert not cycles, "\n" + describe(cycles, PACKAGE_DIR)


def test_the_walk_counts_every_import(tmp_path: Path) -> None:
    """The finder itself, on a package written for it: imports inside functions, under
    TYPE_CHECKING, relative ones and through a package's __init__ all make cycles."""
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "",
        "a.py": "def later() -> None:\n    from pkg import b\n",
        "b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.a import later\n",
        "c.py": "from . import a\nimport os\n",  # imports a, a does not import c: no cycle
        "sub/__init__.py": "from pkg.d import thing\n",
        "sub/e.py": "",
        "d.py": "import pkg.sub.e\nthing = 1\n",  # runs sub/__init__, which imports d
        "f.py": "from .sub import e\n",
        "g.py": "from .f import *\nfrom pkg.sub.e import nothing\n",
    }
    for name, text in files.items():
        (package / name).write_text(text)
    cycles = import_cycles(package)
    assert [sorted({edge.importer for edge in cycle}) for cycle in cycles] == [
        ["pkg.a", "pkg.b"],
        ["pkg.d", "pkg.sub"],
    ], describe(cycles, package)
    assert [(e.importer, e.imported, e.line) for e in cycles[1]] == [
        ("pkg.d", "pkg.sub", 1),
        ("pkg.sub", "pkg.d", 1),
    ]


def test_the_command_line_leaves_the_server_unimported() -> None:
    """Why gateway.cli imports the runtime inside `_serve`: healthcheck (the image's HEALTHCHECK,
    every few seconds), check-config, token and user start without aiohttp or the application."""
    probe = (
        "import sys, gateway.cli\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] == 'aiohttp'"
        " or m in ('gateway.app', 'gateway.runtime', 'gateway.supervisor', 'gateway.demo'))\n"
        "print(loaded)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "[]", result.stdout
