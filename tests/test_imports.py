"""Import structure: the layout is the pipeline, and its boundaries hold.

tracer/ is layered bottom to top (LAYERS): core (no torch, imports nothing of flopdiff outside itself), then the
analytic model and the mapping tables (library code imports only tracer.core), the vendor adapters, capture, count,
compare, render, the CUDA and ONNX extras, the pipeline and its result, the sweep, and the commands on top. A module
may import its own layer and the layers below, never one above; core, compare, render, the analytic model and the
mapping import no torch (a warm run served from the trace cache, `python -m analytic` and a notebook sizing pages
start without it)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


# bottom to top; a module's layer is that of the longest prefix listed
LAYERS = [
    ("tracer.core",),
    ("analytic", "mapping"),
    ("tracer.vendors",),
    ("tracer.capture",),
    ("tracer.count",),
    ("tracer.compare",),
    ("tracer.render",),
    ("tracer.cuda", "tracer.onnx"),
    ("tracer.pipeline", "tracer.result"),
    ("tracer.sweep",),
    ("tracer.cli", "tracer.diff", "tracer.corpus", "tracer", "analytic.__main__"),  # the commands
]
TORCH_FREE = ("tracer.core", "tracer.compare", "tracer.render", "analytic", "mapping", "tracer.vendors.options",
              "tracer.pipeline", "tracer.result")


def layer_of(module: str) -> int:
    best, rank = -1, None
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, rank = len(p), i
    assert rank is not None, f"{module}: in no layer of LAYERS (add it where it belongs)"
    return rank


def violations(edges: dict[str, set[str]]) -> list[str]:
    """Every import that breaks a rule of the module docstring, as `importer -> imported: why`."""
    found = []
    for a, targets in sorted(edges.items()):
        for b in sorted(targets):
            if layer_of(b) > layer_of(a):
                found.append(f"{a} -> {b}: imports a higher layer")
            if a.startswith("tracer.core") and not b.startswith("tracer.core"):
                found.append(f"{a} -> {b}: tracer.core imports nothing of flopdiff outside itself")
            library = a.split(".")[0] in ("analytic", "mapping")
            if library and b.startswith("tracer") and not b.startswith("tracer.core"):
                found.append(f"{a} -> {b}: analytic/ and mapping/ import only tracer.core")
    return found


def test_every_import_runs_down_the_layers():
    assert violations(_project_imports()) == []


@pytest.mark.parametrize("importer, imported", [
    ("tracer.core.errors", "tracer.capture.trace"),    # core reaching up into the capture
    ("tracer.core.workload", "analytic.api"),          # core importing outside core
    ("analytic.models", "tracer.vendors.options"),     # the analytic library past tracer.core
    ("tracer.compare.diff", "tracer.render.tables"),   # compare reaching up into render
    ("tracer.vendors.deepseek_ocr", "tracer.capture.meta"),  # the wrong-way import this layout removed
])
def test_a_forbidden_import_is_caught(importer, imported):
    edges = _project_imports()
    edges[importer] = edges[importer] | {imported}
    assert any(v.startswith(f"{importer} -> {imported}:") for v in violations(edges))


def test_the_torch_free_layers_import_no_torch():
    modules = sorted(m for m in _project_imports() if any(m == p or m.startswith(p + ".") for p in TORCH_FREE))
    assert "tracer.core.cache" in modules and "tracer.render.html" in modules and "analytic.__main__" in modules
    code = (f"import importlib, sys; [importlib.import_module(m) for m in {modules!r}]; "
            "print(','.join(sorted(m for m in ('torch', 'transformers') if m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"{out.stdout.strip()} imported by one of {modules}"


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
