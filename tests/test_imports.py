"""Import structure: the analytic model is pure arithmetic (no torch), so that `import analytic` is fast and usable
where torch is not (a notebook sizing pages, the analytic CLI)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_analytic_and_mapping_import_no_torch():
    code = ("import sys, analytic.api, analytic.__main__, analytic.models, mapping.engine, mapping.table, "
            "tracer.core.conventions; bad = sorted(m for m in ('torch', 'transformers') if m in sys.modules); "
            "print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def _project_imports() -> dict[str, set[str]]:
    """Module -> the project modules it imports, at the top or inside a function (a cycle hidden in a function
    is still a cycle)."""
    import ast

    files = {}
    for package in ("tracer", "analytic", "mapping"):
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            files[name] = path
    edges: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            edges[name] |= {t for t in targets if t in files and t != name}
    return edges


def test_no_import_cycle_among_the_project_modules():
    import networkx as nx

    graph = nx.DiGraph([(a, b) for a, targets in _project_imports().items() for b in targets])
    assert list(nx.simple_cycles(graph)) == []


def test_the_command_line_is_a_thin_shell():
    """Parse, run the pipeline, print, write, exit code: the pipeline's knowledge lives in tracer.pipeline."""
    assert len((ROOT / "tracer" / "cli.py").read_text().splitlines()) < 150
