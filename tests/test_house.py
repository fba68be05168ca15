"""The house as a newcomer finds it: documentation whose links all lead somewhere, a README
that is a landing page, modules and functions short enough to read, one reader of
MLFLOW_RUN_ID, and tests that stand on their own toolbox (not on the benchmarks), which
starts servers without racing other processes for ports."""

from __future__ import annotations

import ast
import re
import socket
import sys
from pathlib import Path
from urllib.parse import urlsplit

import helpers
import requests
from helpers import ROOT

PACKAGE = ROOT / "cifar_experiments"
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
             ROOT / "benchmarks" / "README.md"]  # fmt: skip
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 450, 60


def heading_anchors(document: Path) -> set[str]:
    """The anchors GitHub gives a document's headings: lower case, punctuation dropped,
    spaces as hyphens."""
    headings = re.findall(r"^#+ (.+)$", document.read_text(), flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


def relative_links(document: Path) -> list[str]:
    """The targets of the document's markdown links and images that are not web addresses."""
    targets = re.findall(r"\]\(([^)\s]+)\)", document.read_text())
    return [target for target in targets if not re.match(r"[a-z]+:", target)]


def test_every_relative_link_in_the_documentation_resolves():
    checked, broken = 0, []
    for document in DOCUMENTS:
        for target in relative_links(document):
            path, _, anchor = target.partition("#")
            file = (document.parent / path).resolve() if path else document
            checked += 1
            if not file.exists():
                broken.append(f"{document.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and anchor not in heading_anchors(file):
                broken.append(f"{document.relative_to(ROOT)}: {target} (no such heading)")
    assert broken == []
    assert checked >= 20, "the documents link their pages and pictures"


def test_a_link_to_a_missing_page_or_heading_is_found(tmp_path):
    """The link check itself: it sees a missing file and a missing heading."""
    (tmp_path / "page.md").write_text("# A page\n\n## Its part\n")
    document = tmp_path / "index.md"
    document.write_text(
        "[ok](page.md#its-part) [gone](gone.md) [wrong](page.md#nowhere) [web](https://x.org)"
    )
    assert relative_links(document) == ["page.md#its-part", "gone.md", "page.md#nowhere"]
    assert heading_anchors(tmp_path / "page.md") == {"a-page", "its-part"}


def test_the_readme_is_a_landing_page_and_the_depth_is_in_docs():
    readme = (ROOT / "README.md").read_text()
    assert len(readme) <= 12_000
    pages = sorted((ROOT / "docs").glob("*.md"))
    assert len(pages) >= 4
    linked = {Path(target.partition("#")[0]).name for target in relative_links(ROOT / "README.md")}
    assert {page.name for page in pages} <= linked, "the README links every page of docs/"


def test_no_module_or_function_is_too_long_to_read():
    too_long = []
    for module in sorted(PACKAGE.rglob("*.py")):
        source = module.read_text()
        name = module.relative_to(ROOT)
        if len(source.splitlines()) > MAX_MODULE_LINES:
            too_long.append(f"{name}: {len(source.splitlines())} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{name}:{node.lineno} {node.name}: {length} lines")
    assert too_long == []


def test_only_one_module_reads_which_run_mlflow_run_made():
    readers = [
        str(module.relative_to(PACKAGE))
        for module in sorted(PACKAGE.rglob("*.py"))
        if re.search(r"\bMLFLOW_RUN_ID\b", module.read_text())
    ]
    assert readers == ["tracking/project_run.py"]


def test_no_test_imports_a_benchmark_script_or_another_test_module():
    """Tests share tests/helpers.py (and the tutorial's code and the UI's pages), never one
    another's modules, nor a benchmark's."""
    forbidden = {path.stem for path in (ROOT / "benchmarks").glob("*.py")} | {"benchmarks"}
    forbidden |= {path.stem for path in (ROOT / "tests").rglob("test_*.py")}
    imported = {}
    for test_file in sorted((ROOT / "tests").rglob("*.py")):
        for node in ast.walk(ast.parse(test_file.read_text())):
            names = (
                [alias.name for alias in node.names] if isinstance(node, ast.Import)
                else [node.module or ""] if isinstance(node, ast.ImportFrom)
                else []
            )  # fmt: skip
            for name in names:
                if name.split(".")[0] in forbidden:
                    imported[str(test_file.relative_to(ROOT))] = name
    assert imported == {}


def test_a_server_whose_port_is_taken_before_it_binds_starts_on_another(tmp_path, monkeypatch):
    """free_port's number is free only while it looks; a server that then finds it taken is
    started again on another port, not left to fail the test."""
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        offered = iter([taken])
        probe = helpers.free_port
        monkeypatch.setattr(helpers, "free_port", lambda: next(offered, None) or probe())
        command = lambda port: [sys.executable, "-m", "http.server", "-b", "127.0.0.1", str(port)]  # noqa: E731
        log = tmp_path / "server.log"
        with helpers.running(command, helpers.local_env(), "/", log) as url:
            assert urlsplit(url).port != taken
            assert requests.get(url, timeout=10).ok
    assert "Address already in use" in log.read_text(), "the first start did find it taken"
