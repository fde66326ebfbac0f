"""The Model Explorer files (`--model-explorer`) against Model Explorer's own schema: ai-edge-model-explorer's
dataclasses (graph_builder.GraphCollection, node_data_builder.GraphNodeData), filled strictly with dacite, so an
unknown or missing key fails. Colours are absolute: the same gap gets the same colour in every graph."""

import importlib
import importlib.util
import json
import sys
import types

import pytest

from tracer.diff import main
from tracer.render.model_explorer import GAP_COLORS, OVERCOUNT, UNMAPPED, gap_color

pytestmark = pytest.mark.v2


@pytest.fixture(scope="module")
def schema():
    """graph_builder and node_data_builder from the installed package, without its __init__ (which starts importing
    its web server and a native adapter: tests/run_all.sh installs the package with --no-deps)."""
    dacite = pytest.importorskip("dacite", reason="dacite: tests/run_all.sh installs it")
    spec = importlib.util.find_spec("model_explorer")
    assert spec is not None, "ai-edge-model-explorer is not installed (tests/run_all.sh installs it)"
    saved = {k: v for k, v in sys.modules.items() if k == "model_explorer" or k.startswith("model_explorer.")}
    stub = types.ModuleType("model_explorer")
    stub.__path__ = list(spec.submodule_search_locations)
    sys.modules["model_explorer"] = stub
    try:
        graph = importlib.import_module("model_explorer.graph_builder")
        data = importlib.import_module("model_explorer.node_data_builder")
    finally:
        for k in [k for k in sys.modules if k == "model_explorer" or k.startswith("model_explorer.")]:
            del sys.modules[k]
        sys.modules.update(saved)
    return dacite, graph, data


def _names(module) -> dict:
    """A module's names its annotations use (dacite resolves the string annotations against them)."""
    out = {}
    for k, v in vars(module).items():
        try:
            hash(v)
        except TypeError:
            continue
        if not k.startswith("__"):
            out[k] = v
    return out


def _files(tmp_path, tiny_v2_config, *extra):
    assert main(["--config", tiny_v2_config, "--image-shape", "640x640", "--text-tokens", "3", "--decode-steps", "2",
                 "--quiet", "--model-explorer", "--out", str(tmp_path), *extra]) in (0, 1)
    return (json.loads((tmp_path / "model-explorer-graph.json").read_text()),
            json.loads((tmp_path / "model-explorer-node-data.json").read_text()),
            json.loads((tmp_path / "report.json").read_text()))


@pytest.mark.parametrize("preset", ["aligned", "seed-naive"])
def test_files_fill_model_explorers_dataclasses(schema, preset, tmp_path, tiny_v2_config):
    dacite, graph_builder, node_data_builder = schema
    graphs, node_data, report = _files(tmp_path, tiny_v2_config, "--analytic", preset)
    strict = dacite.Config(strict=True, forward_references=_names(graph_builder))
    collection = dacite.from_dict(graph_builder.GraphCollection, graphs, config=strict)
    assert {g.id for g in collection.graphs} == {"vision", "prefill", "decode.0", "decode.1"}
    for gid, gd in node_data.items():
        dacite.from_dict(node_data_builder.GraphNodeData, gd,
                         config=dacite.Config(strict=True, forward_references=_names(node_data_builder)))
    # output ids and shapes: an unbind's outputs are read by index, and every output says dtype and shape
    nodes = {n.id: n for g in collection.graphs if g.id == "prefill" for n in g.nodes}
    reads = {(e.sourceNodeId, e.sourceNodeOutputId) for n in nodes.values() for e in n.incomingEdges}
    multi = [n for n in nodes.values() if len(n.outputsMetadata) > 1]
    assert multi and any((n.id, "1") in reads for n in multi)
    assert all(m.attrs[0].key == "tensor_shape" and "[" in m.attrs[0].value for n in nodes.values()
               for m in n.outputsMetadata)


def test_colours_are_absolute(tmp_path, tiny_v2_config):
    _, aligned, _ = _files(tmp_path / "a", tiny_v2_config)
    colours = {r["bgColor"] for g in aligned.values() for r in g["results"].values()}
    assert colours == {GAP_COLORS[0][1]}  # gap 0 everywhere: neutral, in every graph
    _, naive, report = _files(tmp_path / "n", tiny_v2_config, "--analytic", "seed-naive")
    pct = {(r["stage"], r["id"]): r["gap_pct"] for r in report["layers"]}
    by_node = {n["id"]: n for n in report["nodes"]}
    for gid, g in naive.items():
        stage, _, step = gid.partition(".")
        for name, r in g["results"].items():
            n = by_node[f"{stage}/{step}/{name}" if step else f"{stage}/{name}"]
            assert r["bgColor"] == gap_color(pct[(stage, n["layer"])])
    assert {gap_color(0.0), gap_color(0.09), gap_color(5), gap_color(100), gap_color(-3)} == \
        {c for _, c in GAP_COLORS} | {OVERCOUNT}
    assert UNMAPPED not in colours
