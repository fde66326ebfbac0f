"""Mapping tables and the diff: every FLOP-bearing node of the real v2 model maps to one analytic layer,
the vendor-exact analytic model leaves no gap, the seed's naive model's gap is attributed to named layers."""

import copy
import json

import pytest

from mapping.engine import REST, costs, flop_bearing
from mapping.table import compile_pattern, load_table
from tracer.compare.analytic import analytic_of_report, map_report
from tracer.compare.diff import with_diff
from tracer.compare.groups import gap_groups, group_members
from tracer.core.modulepaths import split_path
from tracer.diff import main


@pytest.mark.parametrize("pattern, path, groups", [
    ("model.layers.{i}.attn", "model.layers.12.attn", {"i": "12"}),
    ("model.layers.{i}.attn", "model.layers.12.attn.qkv", None),
    ("model.{p:q_proj|k_proj}", "model.k_proj", {"p": "k_proj"}),
    ("model.{p:q_proj|k_proj}", "model.v_proj", None),
    ("model.*.attn", "model.x.attn", {}),
    ("model.**.attn", "model.a.b.attn", {}),
    ("model.**.attn", "model.attn", None),
])
def test_module_pattern_is_a_dotted_glob(pattern, path, groups):
    m = compile_pattern(pattern, "test").fullmatch(path)
    assert (m.groupdict() if m else None) == groups


def test_a_rule_can_tell_one_functions_ops_apart_by_their_source_line(tmp_path):
    """transformers 4.46's LlamaAttention applies RoPE (a cat in rotate_half) and grows the cache (a cat in
    cache_utils) in one forward: only the op's innermost source line tells them apart; `<root>` is the model's forward."""
    path = tmp_path / "t.yaml"
    path.write_text('model: m\nrules:\n'
                    '  - {module: "model.layers.{i}.self_attn", ops: ["aten::cat"], source: "*/modeling_llama.py:*", layer: "a.{i}"}\n'
                    '  - {module: "model.layers.{i}.self_attn", ops: ["aten::cat"], source: ["*/cache_utils.py:*"], layer: "kv.{i}"}\n'
                    '  - {module: "<root>", ops: ["aten::_to_copy"], layer: logits}\n')
    rope, cache, root = load_table(str(path)).rules
    where = "model.layers.3.self_attn"
    assert rope.match(where, "aten::cat", "forward", "transformers/models/llama/modeling_llama.py:199") == {"i": "3"}
    assert cache.match(where, "aten::cat", "forward", "transformers/models/llama/modeling_llama.py:199") is None
    assert cache.match(where, "aten::cat", "forward", "transformers/cache_utils.py:447") == {"i": "3"}
    assert rope.match(where, "aten::cat", "forward", "") is None  # a rule naming a source needs one
    assert root.match("<root>", "aten::_to_copy") == {} and "source=['*/cache_utils.py:*']" in cache.name()


def test_call_indices_are_split_from_the_path():
    assert split_path("model.vision_tower#1.sam_encoder.layers.3") == (
        ["model", "vision_tower", "sam_encoder", "layers", "3"], [0, 1, 0, 0, 0])


def test_v2_every_flop_node_mapped_and_aligned_gap_is_zero(v2_page):
    doc = v2_page
    assert doc["analytic"] == {"preset": "aligned", "policy": "full", "metric": "tc_flops", "causal_halving": False,
                               "attention": {"decoder": "sdpa", "vision": "sdpa", "experts": "grouped_mm"}}
    assert doc["unknown_ops"] == []
    cov = doc["coverage"]
    assert cov["unmapped"] == 0 and cov["unmapped_flops"] == 0
    assert cov["mapped"] == cov["nodes_with_flops"] == sum(1 for n in doc["nodes"] if n["flops_full"] > 0)
    for s in doc["stages"]:
        assert s["gap"] == 0 and s["flops_analytic"] == s["flops_full"], s["name"]
    assert all(row["gap"] == 0 and row["reason"] is None for row in doc["layers"])
    # per layer, the mapped nodes' FLOPs are the layer's; every node that costs anything (FLOPs, CUDA-core FLOPs,
    # bytes) appears in exactly one layer, a rule's or its scope's rest, the FLOP-bearing ones all by a rule
    by_id = {n["id"]: n for n in doc["nodes"]}
    listed = [i for row in doc["layers"] for i in row["nodes"]]
    assert len(listed) == len(set(listed)) == sum(1 for n in doc["nodes"] if costs(n))
    assert sum(1 for i in listed if flop_bearing(by_id[i])) == cov["mapped"]
    assert not any(flop_bearing(by_id[i]) for row in doc["layers"] if row["id"].endswith(REST) for i in row["nodes"])
    for row in doc["layers"]:
        assert row["flops_full"] == sum(by_id[i]["flops_full"] for i in row["nodes"])
        assert all(by_id[i]["layer"] == row["id"] and by_id[i]["stage"] == row["stage"] for i in row["nodes"])
    # 10 decode steps: each decoder layer's attention gathers one node per step
    attn = next(r for r in doc["layers"] if r["stage"] == "decode" and r["id"] == "decoder.layers.3.attn")
    assert len(attn["nodes"]) == 10


def test_v2_seed_naive_gap_attributed_to_named_layers(v2_page):
    before = copy.deepcopy(v2_page)
    an = analytic_of_report(v2_page, "seed-naive")
    doc = with_diff(v2_page, an, map_report(v2_page, an))
    assert v2_page == before  # the diff composes a new document; the aligned one stays as the fixture made it
    vision = next(s for s in doc["stages"] if s["name"] == "vision")
    assert vision["gap_pct"] > 1
    named = sum(r["gap"] for r in doc["layers"] if r["stage"] == "vision")
    assert named == vision["gap"]  # 100% >= the 99% asked: every vision node is mapped
    groups = {(g["group"], g["reason"]): g for g in doc["gap_groups"] if g["stage"] == "vision"}
    assert groups == {(g["group"], g["reason"]): {"stage": "vision", **g} for g in gap_groups(doc, "vision")}
    # the seed's mistakes, in honest groups with their causes: no tile views, 4 of 24 encoder layers
    tiles = groups[("vision.tiles", "missing")]
    assert tiles["cause"] == "preset single_view: true (tile views not modelled)" and tiles["unit"] == "analytic layers"
    encoder = groups[("vision.global.encoder.layers.4-23", "missing")]
    assert encoder["layers"] == 20 * 8 and encoder["cause"].startswith("preset clip_layers: 4")
    assert sum(g["gap"] for g in groups.values()) == vision["gap"]
    (kv,) = [g for g in doc["gap_groups"] if g["stage"] == "decode"]
    assert kv["group"] == "decoder.layers.*.attn" and kv["layers"] == 12 and "decode_kv_growth: false" in kv["cause"]
    assert "s_k = 1,131 in the analytic formula at decode step 0; 1,132" in kv["cause"]  # the disagreeing symbol
    enc = [r for r in doc["layers"] if r["stage"] == "vision" and r["id"].startswith("vision.global.encoder.layers.")]
    assert {r["reason"] for r in enc if int(r["id"].split(".")[4]) < 4} == {None}
    # the FLOP-bearing ones (the others, RoPE's products, a residual, count no FLOPs on either side: no reason)
    assert {r["reason"] for r in enc if int(r["id"].split(".")[4]) >= 4 and r["flops_full"]} == {"missing"}


def test_a_diff_in_place_is_the_composed_diff(v2_page):
    """The pipeline diffs a document of its own in place (a copy of every node doubled the memory of a long decode
    traced step by step): the same document, key for key and in the same order, as the composed diff; also on a
    document diffed before, whose nodes carry a `layer` and some an `unmapped` the new mapping takes away."""
    an = analytic_of_report(v2_page, "seed-naive")
    mapping = map_report(v2_page, an)
    composed = json.dumps(with_diff(v2_page, an, mapping))
    first = next(i for i, layer in mapping.layer_of.items() if i.startswith("decode/"))
    unmapped = copy.copy(mapping)  # that node left without a layer, as a table without its rule would
    unmapped.layer_of = {i: layer for i, layer in mapping.layer_of.items() if i != first}
    unmapped.unmapped = {**mapping.unmapped, first: "no rule matches"}
    mine = copy.deepcopy(v2_page)
    once = with_diff(mine, an, unmapped, in_place=True)
    assert next(n for n in once["nodes"] if n["id"] == first)["unmapped"] == "no rule matches"
    assert json.dumps(with_diff(mine, an, mapping, in_place=True)) == composed
    assert json.dumps(with_diff(copy.deepcopy(v2_page), an, mapping, in_place=True)) == composed


@pytest.mark.parametrize("ids, gaps, groups", [
    # a whole subtree with one reason is one group, whatever its depth
    (["v.tiles.a.0.x", "v.tiles.a.1.x", "v.tiles.b", "v.global.a"], [1, 1, 1, 0], ["v.tiles"]),
    # blocks 0-1 modelled, 2-4 not: a range, not the parent
    ([f"enc.layers.{i}.{p}" for i in range(5) for p in ("q", "mlp")], [0, 0, 0, 0, 1, 1, 1, 1, 1, 1],
     ["enc.layers.2-4"]),
    # only .attn differs in every layer: the shared suffix, * for every index
    ([f"dec.layers.{i}.{p}" for i in range(3) for p in ("attn", "mlp")], [1, 0, 1, 0, 1, 0], ["dec.layers.*.attn"]),
    # two separate runs of indices
    ([f"dec.layers.{i}.attn" for i in range(6)], [1, 1, 0, 1, 0, 0], ["dec.layers.0-1,3"]),
    # a layer with nothing to count on either side (None: analytic 0, measured 0; SDPA under policy torch on CPU)
    # does not split its subtree into one group per sibling
    (["v.tiles.a.0.x", "v.tiles.a.0.attn", "v.tiles.a.1.x", "v.tiles.a.1.attn", "v.tiles.b", "v.global.a"],
     [1, None, 1, None, 1, 0], ["v.tiles"]),
])
def test_gap_groups_are_honest(ids, gaps, groups):
    report = {"layers": [{"id": i, "stage": "s", "gap": g or 0, "flops_analytic": 0 if g is None else 5,
                          "reason": "missing" if g else None, "cause": None} for i, g in zip(ids, gaps)]}
    got = gap_groups(report, "s")
    assert [g["group"] for g in got] == groups
    for g in got:  # what --explain takes covers the layers counted, and those with nothing to count
        members = [r for r in report["layers"] if r["id"] in group_members(g["group"], ids)]
        assert len([r for r in members if r["gap"]]) == g["layers"]
        assert all(r["gap"] or not r["flops_analytic"] for r in members)


def test_prefills_groups_leave_out_vision_which_has_its_own(v2_page):
    an = analytic_of_report(v2_page, "seed-naive")
    doc = with_diff(v2_page, an, map_report(v2_page, an))
    prefill = [g for g in doc["gap_groups"] if g["stage"] == "prefill"]
    vision = [g for g in doc["gap_groups"] if g["stage"] == "vision"]
    assert vision and not any(g["group"].startswith("vision") for g in prefill)
    vision_gap = next(s["gap"] for s in doc["stages"] if s["name"] == "vision")
    prefill_gap = next(s["gap"] for s in doc["stages"] if s["name"] == "prefill")
    assert sum(g["gap"] for g in vision) + sum(g["gap"] for g in prefill) == prefill_gap and vision_gap


def test_every_group_of_the_seed_naive_run_explains(tmp_path, capsys, tiny_v2_config):
    """Each group the terminal prints is an id --explain takes (exit 0, its line first); a wrong id fails before
    tracing with the nearest ids."""
    base = ["--config", tiny_v2_config, "--image-shape", "1000x800", "--text-tokens", "3", "--decode-steps", "2",
            "--analytic", "seed-naive", "--quiet"]
    code, _, _ = _run([*base, "--out", str(tmp_path / "o")], capsys)
    doc = json.loads((tmp_path / "o" / "report.json").read_text())
    assert code == 0 and doc["gap_groups"]
    for g in {g["group"] for g in doc["gap_groups"]}:
        code, out, err = _run([*base, "--explain", g], capsys)
        assert code == 0 and f"{g} [" in out, err
    assert not list(tmp_path.glob("flopdiff-report"))  # --explain without --out writes nothing
    code, _, err = _run([*base, "--explain", "decoder.layers.0.atn"], capsys)
    assert code == 2 and "nearest: decoder.layers.0.attn" in err


def test_explain_of_any_subtree_sums_its_layers_gaps_and_prints_only_the_answer(tmp_path, capsys, tiny_v2_config):
    """`--explain vision` said "no gap in this run" on a seed-naive run whose vision gap is 82%: any prefix of the layer
    tree explains (its gap per stage, the groups inside it); a typo of a subtree is offered the subtree."""
    base = ["--config", tiny_v2_config, "--image-shape", "1000x800", "--text-tokens", "3", "--decode-steps", "2",
            "--analytic", "seed-naive", "--quiet"]
    code, _, _ = _run([*base, "--out", str(tmp_path / "o")], capsys)
    doc = json.loads((tmp_path / "o" / "report.json").read_text())
    vision_gap = sum(r["gap"] for r in doc["layers"] if r["stage"] == "vision" and r["id"].startswith("vision."))
    stage = next(s for s in doc["stages"] if s["name"] == "vision")
    assert vision_gap == stage["gap"] > 0
    code, out, err = _run([*base, "--explain", "vision"], capsys)
    first = out.splitlines()[0]
    assert code == 0 and first.startswith("vision [vision]: ") and f"gap {vision_gap:,} FLOPs" in first, out
    prefill = next(s for s in doc["stages"] if s["name"] == "prefill")
    assert (f"({100 * vision_gap / stage['flops_full']:.2f}% of the stage's count, "
            f"{100 * vision_gap / prefill['flops_full']:.2f}% of prefill's (vision is part of prefill))") in first
    assert "group vision.tiles:" in out and "FLOPs per stage" not in out  # the groups inside; no summary reprinted
    assert "[prefill]" not in out  # vision's layers, once: not again as prefill's
    code, _, err = _run([*base, "--explain", "vision.tile"], capsys)
    assert code == 2 and "nearest: vision.tiles" in err, err


def _run(argv, capsys):
    code = main(argv)
    return code, *capsys.readouterr()


def test_max_gap_exit_1_for_naive_model_0_for_aligned(tmp_path, capsys, tiny_v2_config):
    argv = ["--config", tiny_v2_config, "--image-shape", "1000x1400", "--decode-steps", "1", "--quiet"]
    code, _, err = _run(argv + ["--analytic", "seed-naive", "--max-gap", "1", "--out", str(tmp_path / "a")], capsys)
    assert code == 1 and "stage vision: gap" in err and "exceeds --max-gap 1" in err
    assert (tmp_path / "a" / "report.html").is_file()
    code, _, err = _run(argv + ["--max-gap", "0", "--out", str(tmp_path / "b")], capsys)
    assert code == 0 and err == ""


def _table(tmp_path, extra_rules: str, drop: str | None = None):
    text = open(load_table("deepseek-ocr-2").source).read()
    if drop:
        text = "\n".join(line for line in text.splitlines() if drop not in line)
    path = tmp_path / "table.yaml"
    head, sep, scopes = text.partition("\n# Enclosing analytic blocks")  # extra rules go at the end of `rules`
    path.write_text(head.rstrip("\n") + "\n" + extra_rules + sep + scopes)
    return str(path)


def test_ambiguous_rules_fail_naming_both(tmp_path, capsys, tiny_v2_config):
    table = _table(tmp_path, '  - {module: "model.language_model.layers.{i}.mlp.gate", layer: "decoder.layers.{i}.mlp.experts"}\n')
    code, _, err = _run(["--config", tiny_v2_config, "--mapping", table, "--decode-steps", "0", "--quiet",
                         "--out", str(tmp_path / "o")], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "ambiguous" in lines[0]
    assert "-> decoder.layers.{i}.mlp.gate)" in lines[0] and "-> decoder.layers.{i}.mlp.experts)" in lines[0]
    assert not (tmp_path / "o").exists()


def test_unknown_layer_id_fails_at_load(tmp_path, capsys, tiny_v2_config):
    table = _table(tmp_path, '  - {module: "model.nowhere", layer: "decoder.layers.{view}.attention_core"}\n')
    code, _, err = _run(["--config", tiny_v2_config, "--mapping", table, "--decode-steps", "0", "--quiet",
                         "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "names analytic layer 'decoder.layers.{view}.attention_core'" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


def test_unmapped_nodes_are_listed_never_dropped(tmp_path, capsys, tiny_v2_config):
    table = _table(tmp_path, "", drop="{module: lm_head")
    code, out, _ = _run(["--config", tiny_v2_config, "--mapping", table, "--decode-steps", "1", "--quiet",
                         "--out", str(tmp_path / "o")], capsys)
    doc = json.loads((tmp_path / "o" / "report.json").read_text())
    lm = [n for n in doc["nodes"] if n["module"] == "lm_head" and n["flops_full"]]
    assert code == 0 and len(lm) == 2  # prefill + 1 decode step
    assert all(n["layer"] is None and "no rule matches module lm_head" in n["unmapped"] for n in lm)
    assert doc["coverage"]["unmapped"] == 2 and doc["coverage"]["unmapped_flops"] == sum(n["flops_full"] for n in lm)
    head = [r for r in doc["layers"] if r["id"] == "lm_head"]
    assert {r["reason"] for r in head} == {"no_nodes"} and all(r["gap"] == -r["flops_analytic"] for r in head)
    assert "FLOP-bearing nodes with no analytic layer (2)" in out


@pytest.mark.parametrize("argv, names", [
    (["--analytic", "optimistic"], "--analytic 'optimistic': unknown preset"),
    (["--mapping", "no-such-table.yaml"], "mapping table no-such-table.yaml: no such file"),
    (["--explain", "decoder.layers.99.attn"], "--explain decoder.layers.99.attn: no analytic layer or gap group"),
    (["--max-gap", "-1"], "--max-gap -1"),
])
def test_bad_diff_input_one_line_exit_2(argv, names, tmp_path, capsys, tiny_v2_config):
    code, _, err = _run(["--config", tiny_v2_config, "--decode-steps", "0", "--quiet", "--out", str(tmp_path / "o")]
                        + argv, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and names in lines[0], err
    assert not (tmp_path / "o").exists()


def test_explain_layer_prints_formula_and_nodes(tmp_path, capsys, tiny_v2_config):
    code, out, _ = _run(["--config", tiny_v2_config, "--decode-steps", "1", "--quiet", "--out", str(tmp_path / "o"),
                         "--explain", "decoder.layers.1.mlp.experts"], capsys)
    assert code == 0
    assert "decoder.layers.1.mlp.experts [prefill]" in out and "decoder.layers.1.mlp.experts [decode]" in out
    assert "Experts: 2 * routed_rows * d * 2 * inter" in out and "aten::_grouped_mm" in out
    assert "step 0:" in out


def test_broken_yaml_is_one_line(tmp_path, capsys, tiny_v2_config):
    table = tmp_path / "t.yaml"
    table.write_text("model: deepseek-ocr-2\nrules:\n  - {module: [\n")
    code, _, err = _run(["--config", tiny_v2_config, "--mapping", str(table), "--quiet", "--out", str(tmp_path / "o")],
                        capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "not valid YAML" in err


def test_explain_node_tells_its_whole_story(tmp_path, capsys, tiny_v2_config):
    argv = ["--config", tiny_v2_config, "--decode-steps", "0", "--quiet", "--out", str(tmp_path / "o")]
    assert _run(argv, capsys)[0] == 0
    doc = json.loads((tmp_path / "o" / "report.json").read_text())
    node = next(n for n in doc["nodes"] if n["module"] == "lm_head" and n["flops_full"])
    code, out, _ = _run(argv + ["--explain", node["id"]], capsys)
    assert code == 0 and f"{node['id']}: {node['op']} in lm_head (Linear)" in out
    assert f"full {node['flops_full']:,}" in out and "maps to lm_head [prefill]" in out
    assert "by rule" in out and "(lm_head -> lm_head)" in out


def test_model_explorer_graph_and_overlay_agree(tmp_path, capsys, tiny_v2_config):
    """model-explorer-graph.json (GraphCollection) holds every stage graph; every overlay key is a node of its
    graph; edges point at nodes of the same graph; namespaces are the module paths."""
    code, _, _ = _run(["--config", tiny_v2_config, "--decode-steps", "2", "--quiet", "--model-explorer", "--out",
                       str(tmp_path)], capsys)
    assert code == 0
    graphs = {g["id"]: g for g in json.loads((tmp_path / "model-explorer-graph.json").read_text())["graphs"]}
    overlay = json.loads((tmp_path / "model-explorer-node-data.json").read_text())
    assert set(graphs) == {"vision", "prefill", "decode.0", "decode.1"} and set(overlay) <= set(graphs)
    doc = json.loads((tmp_path / "report.json").read_text())
    for gid, g in graphs.items():
        ids = {n["id"] for n in g["nodes"]}
        assert set(overlay[gid]["results"]) <= ids
        assert all(e["sourceNodeId"] in ids for n in g["nodes"] for e in n["incomingEdges"])
        stage, _, step = gid.partition(".")
        nodes = [n for n in doc["nodes"] if n["stage"] == stage and str(n["step"] if step else "") == step]
        assert len(ids) == len(nodes)
    qkv = next(n for n in graphs["prefill"]["nodes"] if n["namespace"].endswith("layers/0/attn/qkv")
               and n["label"] == "addmm")
    assert qkv["namespace"] == "model/vision_tower/sam_encoder/layers/0/attn/qkv"
    assert {a["key"]: a["value"] for a in qkv["attrs"]}["layer"] == "vision.global.sam.blocks.0.qkv"
    assert qkv["incomingEdges"]  # reads the layer norm's output


def test_gap_groups_show_their_share_of_the_gap_and_of_the_stage(tiny_v2_config):
    """"% of stage" was a share of the stage's *gap* (100.0 for a decode gap that is 0.01% of the stage): both now,
    named for what they are."""
    from rich.console import Console

    from tracer.core.workload import Workload
    from tracer.pipeline import Options, run

    result = run(Workload(image_wh=(1000, 800), text_tokens=3, decode_steps=2),
                 Options(config=tiny_v2_config, analytic="seed-naive"))
    console = Console(record=True, width=400)
    console.print(result.tables()[2])  # the stages, the other columns, then where the gap comes from
    text = console.export_text()
    assert "% of gap" in text and "% of stage" in text
    stages = {s.name: s for s in result.stages}
    for g in result.gap_groups:
        row = next(line for line in text.splitlines() if f" {g.group} " in line and line.split()[1] == g.stage)
        of_gap = f"{100 * g.gap / stages[g.stage].gap:.1f}" if stages[g.stage].gap else "-"
        of_stage = f"{100 * g.gap / stages[g.stage].flops_full:.2f}"
        assert f" {of_gap} " in row and f" {of_stage} " in row, (row, of_gap, of_stage)


@pytest.mark.parametrize("width", [80, 100, 120, 140])
def test_no_number_is_cut_at_any_terminal_width(width, tiny_v2_config):
    """Below about 140 columns the tables cut numbers (`1,042,...`) or wrapped them over lines: under 140 the counts
    are compact (`4.69 T`), and every number and group id is whole at any width."""
    from rich.console import Console

    from tracer.core.workload import Workload
    from tracer.pipeline import Options, run
    from tracer.render.tables import COMPACT_BELOW, _fmt

    result = run(Workload(image_wh=(1000, 800), text_tokens=3, decode_steps=2),
                 Options(config=tiny_v2_config, analytic="seed-naive"))
    compact = width < COMPACT_BELOW
    console = Console(record=True, width=width)
    for table in result.tables(width):
        console.print(table)
    text = console.export_text()
    assert "…" not in text and max(map(len, text.splitlines())) <= width  # nothing cut at the right either
    lines = text.splitlines()
    for s in result.stages:
        row = next(line for line in lines if line.startswith(f"│ {s.name} "))
        for n in (s.flops_analytic, s.flops_torch, s.flops_full, s.gap):
            assert f" {_fmt(n, compact)} " in row, (row, _fmt(n, compact))
    rows = _table_rows(text.split("where the gap comes from")[1].split("unseen by FlopCounterMode")[0])
    for g in result.gap_groups:  # each group whole (folded over lines in a narrow terminal), beside its gap
        assert [g.stage, g.group, _fmt(g.gap, compact)] in [[r[0], r[1], r[r.index(_fmt(g.gap, compact))]]
                                                               for r in rows if _fmt(g.gap, compact) in r], g.group


def _table_rows(text: str) -> list[list[str]]:
    """A rich table's body rows, each cell's folded lines joined back together."""
    rows: list[list[str]] = []
    for line in text.splitlines():
        if not line.startswith("│"):
            continue
        cells = [c.strip() for c in line.strip("│").split("│")]
        if cells[0]:
            rows.append(cells)
        else:
            rows[-1] = [a + b for a, b in zip(rows[-1], cells)]
    return rows
