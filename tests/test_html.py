"""report.html in a real headless Chromium (Debian's `chromium`, driven by Playwright): it loads without
console errors, a layer opens onto its nodes, the search box filters, and vendor strings stay text."""

import copy

import pytest

from tracer.render.html import render_html

PLANTED = '<script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2">'


@pytest.fixture(scope="module")
def page_file(v2_page, tmp_path_factory):
    doc = copy.deepcopy(v2_page)
    # vendor strings with markup: a module name of a mapped node, one of an unmapped node, a note
    mapped = next(n for n in doc["nodes"] if n["layer"] == "lm_head" and n["stage"] == "prefill")
    mapped["module"] = "lm_head" + PLANTED
    gate = next(n for n in doc["nodes"] if n["layer"] and n["stage"] == "decode" and n["flops_full"])
    gate["layer"], gate["unmapped"] = None, "planted " + PLANTED
    gate["vendor_source"] = "modeling.py:1</script>" + PLANTED
    for row in doc["layers"]:
        if gate["id"] in row["nodes"]:
            row["nodes"].remove(gate["id"])
    doc["notes"].append("note " + PLANTED)
    path = tmp_path_factory.mktemp("html") / "report.html"
    path.write_text(render_html(doc))
    return path, doc


@pytest.fixture
def page(browser, page_file):
    pg = browser.new_page()
    errors = []
    pg.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.goto(page_file[0].as_uri())
    pg.wait_for_selector("table.layers tr.layer")
    yield pg
    assert errors == []
    assert pg.evaluate("window.__pwned") is None
    pg.close()


SHOWN = ("prefill", "decode")  # vision is shown inside prefill, its layers counted once


def _rows_stand_for(page) -> int:
    """Layers the tables stand for: a single layer row each, a fold its data-layers."""
    folds = page.locator("table.layers tr.fold")
    return page.locator("table.layers tr.layer").count() + sum(int(folds.nth(i).get_attribute("data-layers"))
                                                                for i in range(folds.count()))


def test_page_loads_with_every_layer_and_stage(page, page_file):
    doc = page_file[1]
    total = sum(1 for r in doc["layers"] if r["stage"] in SHOWN)
    # layers of one pattern, why and cause folded: every layer is in one row, in far fewer rows
    assert _rows_stand_for(page) == total
    assert page.locator("table.layers tbody tr").count() < total / 5
    assert page.locator("#stages tbody tr").count() == 3
    assert page.locator("#stages tbody tr").first.inner_text().startswith("vision (part of prefill)")
    assert page.locator("tr.node").count() == 0  # node rows are built on demand
    assert page.locator("#chart g.block").count() > 10
    assert "no gap on any layer" in page.locator("#groups").inner_text()  # the aligned run


def test_expanding_a_layer_shows_its_nodes_and_planted_markup_stays_text(page, page_file):
    doc = page_file[1]
    head = next(r for r in doc["layers"] if r["id"] == "lm_head" and r["stage"] == "prefill")
    row = page.locator("table.layers[data-stage=prefill] tr.layer", has_text="lm_head")
    row.click()
    nodes = page.locator("table.layers[data-stage=prefill] tr.node")
    assert nodes.count() == len(head["nodes"]) == 1
    assert PLANTED in nodes.first.inner_text()  # shown as typed, not parsed
    detail = page.locator("table.layers[data-stage=prefill] tr.detail")
    assert head["formula"] in detail.inner_text() and "mapped by rule" in detail.inner_text()
    row.click()
    assert page.locator("tr.node").count() == 0


def test_search_filters_layer_rows(page, page_file):
    doc = page_file[1]
    page.fill("#search", "shared_experts.down_proj")
    page.wait_for_function("document.getElementById('count').textContent.includes('match')")
    expected = sum(1 for r in doc["layers"] if "shared_experts.down_proj" in r["id"] and r["stage"] in SHOWN)
    assert page.locator("table.layers tr.layer").count() == expected == 2 * 11  # prefill + decode, 11 MoE layers
    total = sum(1 for r in doc["layers"] if r["stage"] in SHOWN)
    assert f"of {total} layers" in page.locator("#count").inner_text()  # vision's layers once
    assert page.locator("table.layers tr.member").count() == expected  # the folds opened onto the matches
    page.fill("#search", "")
    page.wait_for_function("!document.getElementById('count').textContent.includes('match')")
    assert _rows_stand_for(page) == total and page.locator("table.layers tr.member").count() == 0  # folded again


def test_natural_sort_and_unmapped_section(page, page_file):
    page.locator("table.layers[data-stage=decode] th", has_text="layer").click()
    fold = page.locator("table.layers[data-stage=decode] tr.fold", has_text="decoder.layers.*.attn")
    assert fold.get_attribute("aria-expanded") == "false" and "(12 layers)" in fold.inner_text()
    fold.click()
    ids = page.locator("table.layers[data-stage=decode] tr.member td:first-child").all_inner_texts()
    assert ids.index("decoder.layers.2.attn") < ids.index("decoder.layers.10.attn")
    assert len([i for i in ids if i.endswith(".attn")]) == 12
    fold.click()
    assert page.locator("table.layers[data-stage=decode] tr.member").count() == 0
    unmapped = page.locator("#unmapped-nodes tbody tr")
    assert unmapped.count() == 1 and "planted " + PLANTED in unmapped.first.inner_text()
    assert page.locator("#notes").inner_text().endswith("note " + PLANTED)


# ---- the seed-naive page: a gap to explain, at both widths -------------------------------------------------------

@pytest.fixture(scope="module")
def naive_file(v2_page, tmp_path_factory):
    from tracer.compare.analytic import analytic_of_report, map_report
    from tracer.compare.diff import with_diff

    an = analytic_of_report(v2_page, "seed-naive")
    doc = with_diff(v2_page, an, map_report(v2_page, an))
    path = tmp_path_factory.mktemp("naive") / "report.html"
    path.write_text(render_html(doc))
    return path, doc


@pytest.mark.parametrize("width, height", [(1280, 800), (1920, 1080)])
def test_seed_naive_page_explains_at_both_widths(browser, naive_file, width, height):
    path, doc = naive_file
    pg = browser.new_page(viewport={"width": width, "height": height})
    errors = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.goto(path.as_uri())
    pg.wait_for_selector("#chart g.block")
    overflow = "document.documentElement.scrollWidth <= document.documentElement.clientWidth"
    # the gap groups first, with their causes, largest first
    groups = pg.locator("#group-table tbody tr")
    # every group once: vision's (inside prefill) are not repeated under prefill
    assert groups.count() == len(doc["gap_groups"]) == len({(g["group"], g["reason"]) for g in doc["gap_groups"]})
    assert groups.first.inner_text().startswith("vision (in prefill)")
    assert "vision.tiles" in groups.first.inner_text() and "single_view: true" in groups.first.inner_text()
    assert "unseen-table" in pg.content()
    # the largest gap first in the tables; a fold and a detail opened by keyboard keep the page within the window
    first = pg.locator("table.layers[data-stage=prefill] tbody tr").first
    assert first.inner_text().startswith("vision.tiles.") and "fold" in first.get_attribute("class")
    first.focus()
    pg.keyboard.press("Enter")
    member = pg.locator("table.layers[data-stage=prefill] tr.member").first
    member.focus()
    pg.keyboard.press("Enter")
    assert pg.locator("table.layers[data-stage=prefill] tr.detail").count() == 1
    assert pg.evaluate(overflow)
    # the node table fits the window: its module and vendor source columns are on screen, names unbroken
    node = pg.locator("table.layers[data-stage=prefill] tr.node").first
    for col in (2, 3):
        box = node.locator("td").nth(col).bounding_box()
        assert box["x"] >= 0 and box["x"] + box["width"] <= width
    module = node.locator("td").nth(2).inner_text()
    assert module in {n["module"] for n in doc["nodes"]}
    pg.keyboard.press("Enter")
    # a click on a chart block zooms and filters the tables to it
    pg.locator("#chart g.block", has_text="tiles").first.click()
    visible = pg.locator("table.layers tr.layer td:first-child").all_inner_texts()
    assert visible and all(v.startswith("vision.tiles") for v in visible)
    assert "under prefill vision.tiles" in pg.locator("#count").inner_text()
    pg.locator("#count button", has_text="show all").click()
    # a search over the why column
    pg.fill("#search", "not in the analytic model")
    pg.wait_for_function("document.getElementById('count').textContent.includes('match')")
    missing = sum(1 for r in doc["layers"] if r["stage"] in SHOWN and r["reason"] == "missing")
    assert pg.locator("table.layers tr.layer").count() == missing > 0
    # a group row filters to its layers, and the page shows the notice saying so
    pg.fill("#search", "")
    groups.nth(1).click()
    rows = pg.locator("table.layers tr.layer td:first-child").all_inner_texts()
    assert rows and all(r.startswith("vision.global.encoder.layers.") for r in rows)
    notice = pg.locator("#count").bounding_box()
    assert 0 <= notice["y"] < height and "in group" in pg.locator("#count").inner_text()
    assert pg.evaluate(overflow) and errors == []
    pg.close()


def _h200_report() -> dict:
    """The report of flopdiff's own H200 recording (tests/data/cuda): diffed, mapped, its kernels attributed."""
    import gzip
    import json
    from pathlib import Path

    from tracer.compare.analytic import analytic_of_report, map_report
    from tracer.compare.diff import with_diff
    from tracer.cuda.kernels import attribute

    doc = json.loads(gzip.open(Path(__file__).parent / "data" / "cuda" / "v2-640x640-h200.json.gz").read())
    report = {"model": doc["model"], "workload": doc["workload"], "notes": [], "unknown_ops": [],
              "nodes": [{**n, "module_class": "", "source": "", "vendor_source": "", "input_shapes": [],
                         "input_dtypes": [], "output_shapes": [], "output_dtypes": []} for n in doc["nodes"]],
              "stages": [{**s, "unknown_ops": 0} for s in doc["stages"]]}
    an = analytic_of_report(report, "aligned")
    mapping = map_report(report, an)
    report = with_diff(report, an, mapping)
    report.update(attribute(report, doc["kernel_records"], mapping.matcher, doc["device"]))
    return report


def test_kernels_section_of_a_cuda_report(browser, tmp_path):
    """A report of a CUDA run (flopdiff's own H200 recording in tests/data/cuda) shows its kernels, the grouped
    GEMM first (the FLOPs FlopCounterMode misses), with the full kernel name kept in the tooltip."""
    report = _h200_report()
    path = tmp_path / "report.html"
    path.write_text(render_html(report))
    pg = browser.new_page()
    errors = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.goto(path.as_uri())
    pg.wait_for_selector("#kernel-table tbody tr")
    rows = pg.locator("#kernel-table tbody tr")
    assert rows.count() == len(report["kernels"])
    first = rows.first.locator("td")
    assert first.nth(4).inner_text() == "no" and first.nth(0).get_attribute("title") == report["kernels"][0]["kernel"]
    assert pg.locator("#kernel-layers tbody tr").count() == len(report["kernel_layers"])
    assert errors == []
    pg.close()


def x_of(pg, value: float) -> float:
    """The x of the roofline chart's tick for `value` (its label is centred on its line)."""
    ticks = pg.locator("#roofline text.tick.x")
    texts = ticks.all_text_contents()
    return float(ticks.nth([float(t.replace(",", "")) for t in texts].index(value)).get_attribute("x"))


def _h100_roofline(report: dict) -> dict:
    """`report` (a whole page) with the roofline of DeepSeek-OCR-2's default page on the lent H100 in place of its
    own (tests/data/cuda/roofline-v2-default-h100: real mode, 10 decode steps, the card's ceilings measured in the
    run), recomputed from the recorded layer columns and kernel records as the run computed it."""
    import gzip
    import json
    from pathlib import Path

    from tracer.cuda.roofline import roofline

    doc = json.loads(gzip.open(Path(__file__).parent / "data" / "cuda" / "roofline-v2-default-h100.json.gz").read())
    roof = roofline(doc, doc["kernel_records"])
    assert roof == doc["roofline"]
    return {**report, "device": doc["device"], "roofline": roof}


@pytest.mark.parametrize("width, height", [(1280, 800), (1920, 1080)])
def test_roofline_chart_of_a_cuda_report(browser, tmp_path, width, height):
    """The H100 recording's kernel times per layer on the roofline: a point per layer with kernel time, FLOPs and
    bytes; log axes with a labelled tick per decade; the tensor roof flat at the measured bf16 ceiling, meeting the
    memory roof at the ridge point (measured TFLOP/s / measured GB/s); the decode steps' table says launch-bound.
    The page around the chart is the H200 recording's (a whole report), the chart the H100 run's."""
    import math

    report = _h100_roofline(_h200_report())
    c = report["roofline"]["ceilings"]
    assert c["used"] == "measured" and c["bf16_tflops"] < 989.5
    points = [r for r in report["roofline"]["layers"] if r["intensity"] and r["achieved_tflops"]]
    assert len(points) > 50
    path = tmp_path / "report.html"
    path.write_text(render_html(report))
    pg = browser.new_page(viewport={"width": width, "height": height})
    errors = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.goto(path.as_uri())
    pg.wait_for_selector("#roofline circle.point")
    assert pg.locator("#roofline circle.point").count() == len(points)
    assert pg.locator("#roofline-layers tbody tr").count() == len(report["roofline"]["layers"])
    xs = pg.locator("#roofline text.tick.x").all_text_contents()  # SVG text has no innerText
    ys = pg.locator("#roofline text.tick.y").all_text_contents()
    decades = lambda ticks: [float(t.replace(",", "")) for t in ticks]  # noqa: E731
    assert all(math.log10(v).is_integer() for v in decades(xs) + decades(ys)) and len(xs) >= 4 and len(ys) >= 4
    # the tensor roof: flat from the ridge point on, at the y of 989.5 TFLOP/s between the ticks of 100 and 1,000
    roof = [tuple(map(float, p.split(","))) for p in pg.locator("#roofline polyline.tensor").get_attribute("points").split()]
    y_of = {float(t.replace(",", "")): float(pg.locator("#roofline text.tick.y").nth(i).get_attribute("y")) - 4
            for i, t in enumerate(ys)}  # a tick's label sits 4 px below its line
    per_decade = y_of[1000.0] - y_of[100.0]
    assert roof[1][1] == roof[2][1] == pytest.approx(y_of[100.0] + math.log10(c["bf16_tflops"] / 100) * per_decade,
                                                     abs=0.01)
    assert 10 ** (2 + (roof[1][0] - x_of(pg, 100.0)) / (x_of(pg, 1000.0) - x_of(pg, 100.0))) == pytest.approx(
        c["bf16_tflops"] * 1e3 / c["hbm_gbps"], rel=1e-3)  # the ridge point, in FLOP per byte
    steps = pg.locator("#roofline-steps tbody tr")
    assert steps.count() == 10 and steps.first.locator("td").last.inner_text() == "launch-bound"
    box = pg.locator("#roofline").bounding_box()
    assert box["width"] <= width and box["x"] >= 0  # inside the page at this width
    assert errors == []
    pg.close()


def test_decode_step_charts_of_a_closed_form_decode(browser, tmp_path):
    """A 40-step decode (steps 1-39 in closed form) of a reduced Llama (its MLP wide enough to hold the activation
    peak at every step: a narrower one moves the peak onto the growing cache, and the proof falls back): two charts (FLOPs, KV cache) with a point per
    step, their y ticks at the least and the largest step's value as report.json lists them, and the note stating
    the closed form's span and per-step form."""
    import transformers

    from tracer.core.workload import Workload
    from tracer.pipeline import Options, run

    config = tmp_path / "llama.json"
    transformers.LlamaConfig(hidden_size=64, intermediate_size=2048, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=256).to_json_file(config)
    report = run(Workload(model="hf:llama", text_tokens=6, decode_steps=40), Options(config=str(config))).report
    decode = next(s for s in report["stages"] if s["name"] == "decode")
    steps, (series,) = decode["steps"], decode["series"]
    assert len(steps) == 40 and series["steps"] == [1, 39]
    path = tmp_path / "report.html"
    path.write_text(render_html(report))
    pg = browser.new_page(viewport={"width": 1280, "height": 800})
    errors = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.goto(path.as_uri())
    pg.wait_for_selector("#decode-steps svg.steps-chart")
    charts = pg.locator("#decode-steps svg.steps-chart")
    assert [charts.nth(i).get_attribute("data-column") for i in range(charts.count())] == ["flops_full", "kv_bytes"]
    for i, key in enumerate(("flops_full", "kv_bytes")):
        points = charts.nth(i).locator("polyline").get_attribute("points").split()
        assert len(points) == 40
        ticks = [int(t.replace(",", "")) for t in charts.nth(i).locator("text.tick.y").all_text_contents()]
        values = [s[key] for s in steps]
        assert ticks[0] == min(values) and ticks[-1] == max(values) and min(values) < max(values)
        ys = [float(p.split(",")[1]) for p in points]
        assert ys == sorted(ys, reverse=True)  # both grow with the KV length: the line climbs (SVG y points down)
    note = pg.locator("#decode-steps p.note").inner_text()
    assert "40 steps" in note and "steps 1-39 in closed form" in note
    assert f"{series['flops_full'][1]:,} * step" in note
    assert errors == []
    pg.close()
