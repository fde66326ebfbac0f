"""`flopdiff sweep` over a generated corpus (tracer.corpus: 200 pages of 27 real document shapes), DeepSeek-OCR-2 at
reduced size: every page's counts equal a single flopdiff run on that page, each workload key is traced once, the
page draws its plots and links each key to its report, bad input is one line."""

import csv
import json

import pytest

from tracer import corpus
from tracer.diff import main

pytestmark = pytest.mark.v2


@pytest.fixture(scope="module")
def swept(tmp_path_factory, tiny_v2_config):
    tmp = tmp_path_factory.mktemp("sweep")
    pages = corpus.write(tmp / "corpus", 200)
    (tmp / "corpus" / "notes").mkdir()
    (tmp / "corpus" / "notes" / "broken.png").write_text("not an image")
    out = tmp / "out"
    code = main(["sweep", str(tmp / "corpus"), "640x640", "--config", tiny_v2_config, "--out", str(out), "--quiet",
                 "--jobs", "2"])
    assert code == 0
    return tmp, pages, out, json.loads((out / "sweep.json").read_text())


def test_every_page_is_measured_and_the_unreadable_one_listed(swept):
    tmp, pages, out, doc = swept
    assert doc["pages"] == len(pages) + 1 == 201 and len({(p.stat().st_size, p.name) for p in pages}) == 200
    assert len({(r["width"], r["height"]) for r in doc["rows"]}) >= 20  # distinct shapes
    assert [u["path"] for u in doc["unreadable"]] == [str(tmp / "corpus" / "notes" / "broken.png")]
    rows = list(csv.DictReader((out / "sweep.csv").open()))
    assert len(rows) == 201 and rows[0]["path"].endswith("page-0000-a4-150dpi-portrait.png")
    assert all(float(r["prefill_gap_pct"]) == 0.0 for r in rows)  # the aligned model holds on every page


def test_each_key_is_traced_once_and_its_pages_share_it(swept):
    _, _, out, doc = swept
    keys = [k["key"] for k in doc["per_key"]]
    assert len(keys) == len(set(keys)) == len({r["key"] for r in doc["rows"]}) == doc["keys"]
    assert sorted(p.name for p in (out / "keys").iterdir()) == sorted(keys)
    assert sum(k["pages"] for k in doc["per_key"]) == doc["pages"]
    for k in doc["per_key"]:  # one trace per key: every page of the key has its numbers and its crop grid
        rows = [r for r in doc["rows"] if r["key"] == k["key"]]
        assert {(r["crop_grid"], r["image_tokens"]) for r in rows} and len({r["prefill_full"] for r in rows}) == 1
        assert rows[0]["prefill_full"] == next(s["flops_full"] for s in k["stages"] if s["name"] == "prefill")
        report = json.loads((out / "keys" / k["key"] / "report.json").read_text())
        assert [s["flops_full"] for s in report["stages"]] == [s["flops_full"] for s in k["stages"]]


def test_pages_equal_a_single_run_on_them(swept, tmp_path, tiny_v2_config):
    """A sample, one page per crop grid: `flopdiff --image PAGE` gives the row's counts, per stage."""
    _, _, _, doc = swept
    sample = {}
    for r in doc["rows"]:
        if not r["path"].endswith(".png"):
            continue
        sample.setdefault(r["crop_grid"], r)
    assert len(sample) >= 4
    for grid, r in list(sample.items())[:4]:
        out = tmp_path / grid
        assert main(["--image", r["path"], "--config", tiny_v2_config, "--quiet", "--out", str(out)]) == 0
        single = {s["name"]: s for s in json.loads((out / "report.json").read_text())["stages"]}
        for stage in ("vision", "prefill", "decode"):
            assert (single[stage]["flops_full"], single[stage]["flops_torch"], single[stage]["flops_analytic"]) == \
                (r[f"{stage}_full"], r[f"{stage}_torch"], r[f"{stage}_analytic"]), (r["path"], stage)


def test_the_page_draws_its_plots_and_links_each_key(swept, browser):
    _, _, out, doc = swept
    pg = browser.new_page(viewport={"width": 1280, "height": 800})
    errors = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.goto((out / "sweep.html").as_uri())
    pg.wait_for_selector("#scatter circle")
    assert pg.locator("#scatter circle").count() == doc["pages"]
    assert pg.locator("svg.hist").count() == 3 and pg.locator("svg.hist rect").count() >= 3
    assert pg.locator("#keys tbody tr").count() == doc["keys"]
    assert pg.evaluate("document.documentElement.scrollWidth <= document.documentElement.clientWidth")
    key = doc["per_key"][0]["key"]
    pg.locator("#keys a", has_text=key).click()
    pg.wait_for_selector("#chart g.block")
    assert pg.url.endswith(f"keys/{key}/report.html") and "flopdiff: deepseek-ocr-2" in pg.title()
    assert errors == []
    pg.close()


@pytest.mark.parametrize("argv, says", [
    (["/no/such/folder"], "sweep /no/such/folder: no such file or folder"),
    (["640x640", "--jobs", "0"], "--jobs 0: must be 1 or more"),
    (["640x640", "--analytic", "nope"], "--analytic 'nope': unknown preset"),
])
def test_bad_input_is_one_line(argv, says, tmp_path, capsys, tiny_v2_config):
    code = main(["sweep", *argv, "--config", tiny_v2_config, "--out", str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and says in err[0] and not (tmp_path / "o").exists()


def test_max_gap_over_the_set_names_the_worst_pages(tmp_path, capsys, tiny_v2_config):
    code = main(["sweep", "640x640", "1000x1400", "--config", tiny_v2_config, "--analytic", "seed-naive",
                 "--max-gap", "1", "--out", str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 1 and "2 pages exceed --max-gap 1: 1000x1400 (" in err
