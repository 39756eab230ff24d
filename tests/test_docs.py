"""The documents operators read say what the code does: the configuration doc and the example file
are written from the settings table and must not drift from it; the README stays short, starts
with what the gateway is, and its links lead somewhere; no code comment points into the README."""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).parent.parent


def _readme() -> str:
    return (ROOT / "README.md").read_text(encoding="utf-8")


def test_readme_is_short_and_starts_with_what_it_is() -> None:
    readme = _readme()
    assert len(readme.splitlines()) <= 160
    first_paragraph = readme.split("\n\n")[1]
    assert first_paragraph.startswith("registry-gateway is"), first_paragraph


def test_readme_first_commands_are_the_demo_and_the_checks() -> None:
    block = re.search(r"```sh\n(.*?)```", _readme(), re.S)
    assert block is not None
    commands = [line.split("#")[0].strip() for line in block.group(1).splitlines() if line.strip()]
    assert commands[:2] == ["bash scripts/demo", "bash .ci/run"]


def test_links_between_documents_lead_somewhere() -> None:
    for document in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", document.read_text(encoding="utf-8")):
            if "://" in target:
                continue
            assert (document.parent / target).exists(), f"{document.name}: {target}"
    for name in ("configuration", "authentication", "operations", "security", "performance", "architecture"):
        assert f"docs/{name}.md" in _readme(), name


def test_code_comments_cite_docs_not_the_readme() -> None:
    citing = [
        f"{path.relative_to(ROOT)}:{number}"
        for folder in ("gateway", "bench")
        for path in sorted((ROOT / folder).rglob("*.py"))
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if "README" in line
    ]
    assert citing == [], "cite docs/<file>.md and its section instead"


def test_benchmark_results_record_their_commit_and_machine() -> None:
    kept = sorted(path.name for path in (ROOT / "bench" / "results").glob("*.json"))
    assert kept == ["caddy.json", "latest.json", "reference.json", "replicas.json"]
    for name in kept:
        results = json.loads((ROOT / "bench" / "results" / name).read_text())
        assert re.fullmatch(r"[0-9a-f]{40}", results["commit"]["hash"]), name
        assert {"cpus", "platform", "python"} <= set(results["machine"]), name
