"""`flopdiff sweep` over a generated corpus (tracer.corpus: 200 pages of 27 real document shapes), DeepSeek-OCR-2 at
reduced size: every page's counts equal a single flopdiff run on that page, each workload key is traced once, the
page draws its plots and links each key to its report, bad input is one line."""

import csv
import json

import pytest

from test_lifecycle import _until  # the suite's one wait-for-a-condition helper
from tracer import corpus
from tracer.diff import main
from tracer.render.tables import _fmt

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
            # the other columns too, traced and analytic
            for c in ("bytes_read", "bytes_written", "weight_bytes", "cuda_flops", "act_peak_bytes", "kv_bytes"):
                assert single[stage].get(c) == r[f"{stage}_{c}"], (r["path"], stage, c)
            for c in ("io_bytes", "weight_bytes", "kv_bytes"):
                assert single[stage][f"analytic_{c}"] == r[f"{stage}_analytic_{c}"], (r["path"], stage, c)


def test_the_page_draws_its_plots_and_links_each_key(swept, browser):
    _, _, out, doc = swept
    pg = browser.new_page(viewport={"width": 1280, "height": 800})
    errors = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.goto((out / "sweep.html").as_uri())
    pg.wait_for_selector("#scatter circle")
    assert pg.locator("#scatter circle").count() == doc["pages"]
    assert pg.locator("svg.hist").count() == 3 and pg.locator("svg.hist rect").count() >= 3
    # I/O, intensity, activation peak and KV cache against image tokens, a point per page
    assert pg.locator("svg.mem").count() == 4 and pg.locator("svg.mem[data-plot=decode_kv_bytes] circle").count() == \
        doc["pages"]
    assert pg.locator("#keys tbody tr").count() == doc["keys"]
    assert pg.evaluate("document.documentElement.scrollWidth <= document.documentElement.clientWidth")
    # axes with ticks and units: powers of two on the aspect axis (log), SI counts on the FLOP axes
    texts = lambda sel: pg.eval_on_selector_all(sel, "ts => ts.map(t => t.textContent)")  # noqa: E731 (SVG text)
    xticks = texts("#scatter text.xtick")
    assert "1" in xticks and len(xticks) >= 3 and all(t == "1" or "/" in t or t.isdigit() for t in xticks)
    assert all(t[-1] in "kMGTP" for t in texts("#scatter text.ytick"))
    assert pg.locator("svg.hist[data-stage=prefill] text.xtick").count() >= 3
    # the points spread over the aspect axis (a linear one crowded most into its left 15%)
    cx = [float(c) for c in pg.eval_on_selector_all("#scatter circle", "cs => cs.map(c => c.getAttribute('cx'))")]
    assert (max(cx) - min(cx)) > 0.5 * 800 * 0.9
    # a grid's colour is the grid's own, whichever grids a run has: GRIDS in the page, rebuilt here
    grids = [f"{c}x{n // c}" for n in range(1, 13) for c in range(1, n + 1) if n % c == 0]
    legend = pg.eval_on_selector_all("#scatter-legend span[style]", "ss => ss.map(s => [s.textContent, s.style.background])")
    palette = pg.evaluate("PALETTE")
    assert legend and all(colour == _rgb(palette[grids.index(g) % len(palette)]) for g, colour in legend)
    # the aligned model: no list of 0.00 rows, a line saying no page has a gap
    assert pg.locator("#worst").count() == 0 and "no page has a gap" in pg.content()
    key = doc["per_key"][0]["key"]
    pg.locator("#keys a", has_text=key).click()
    pg.wait_for_selector("#chart g.block")
    assert pg.url.endswith(f"keys/{key}/report.html") and "flopdiff: deepseek-ocr-2" in pg.title()
    assert errors == []
    pg.close()


def _rgb(hex_colour: str) -> str:
    r, g, b = (int(hex_colour[i:i + 2], 16) for i in (1, 3, 5))
    return f"rgb({r}, {g}, {b})"


def test_the_terminal_says_how_the_counts_spread_and_which_pages_have_a_gap(tmp_path, capsys, tiny_v2_config):
    corpus.write(tmp_path / "corpus", 12)
    base = ["sweep", str(tmp_path / "corpus"), "600x500", "--config", tiny_v2_config, "--quiet"]
    assert main([*base, "--out", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    rows = json.loads((tmp_path / "a" / "sweep.json").read_text())["rows"]
    prefill = sorted(r["prefill_full"] for r in rows)
    line = next(x for x in out.splitlines() if x.startswith("│ prefill "))
    cells = [c.strip() for c in line.split("│")[2:5]]  # min, median, max, compact
    assert cells == [_fmt(prefill[0], True), _fmt(prefill[len(prefill) // 2], True), _fmt(prefill[-1], True)]
    assert len(set(prefill)) > 1
    assert "no page has a gap" in out and "pages with the largest gap" not in out
    assert main([*base, "--analytic", "seed-naive", "--out", str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    assert "pages with the largest gap" in out and "page-0000-" in out
    line = next(x for x in out.splitlines() if x.startswith("│ vision "))
    assert line.split("│")[5].strip() == "13"  # every page has a vision gap under the seed's model


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


# ---- processes: whatever ends a sweep, no process stays, nothing is left in TMPDIR ----------------------------

def _left_in(tmpdir) -> list[str]:
    """What a run left in its TMPDIR, less torch's own persistent compile cache (`torchinductor_<user>`, which
    importing torch._dynamo creates on purpose, as ~/.cache would be)."""
    import getpass

    return sorted(p.name for p in tmpdir.iterdir() if p.name != f"torchinductor_{getpass.getuser()}")


def _descendants(pid: int) -> list[int]:
    from pathlib import Path

    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids = [int(x) for x in (task / "children").read_text().split()]
        except OSError:
            continue
        for kid in kids:
            found += [kid, *_descendants(kid)]
    return found


def _cmdline(pid: int) -> str:
    from pathlib import Path

    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _gone(pid: int) -> bool:
    from pathlib import Path

    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] == "Z"
    except OSError:
        return True


SHAPES = ["640x640", "1000x1400", "2000x700", "700x2000", "1400x1000", "3000x1000", "1000x3000", "2400x1600"]


def _started_sweep(tmp_path, *extra: str):
    """A sweep of 8 workload keys of the published config (seconds each) in its own TMPDIR, once its workers run."""
    import os
    import subprocess
    import sys

    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    (out / "sweep.csv").write_text("the previous set")
    proc = subprocess.Popen([sys.executable, "-m", "tracer.diff", "sweep", *SHAPES, "--quiet", "--jobs", "2",
                             "--out", str(out), *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TMPDIR": str(tmpdir), "FLOPDIFF_CACHE": "off"})
    workers = lambda: [p for p in _descendants(proc.pid) if "spawn_main" in _cmdline(p)
                       and "resource_tracker" not in _cmdline(p)]
    assert _until(lambda: len(workers()) == 2, 120), "no workers started"
    return proc, workers(), tmpdir, out


@pytest.mark.parametrize("sig", ["SIGKILL", "SIGTERM", "SIGINT"])
def test_a_killed_sweep_leaves_no_process_and_nothing_in_tmpdir(sig, tmp_path):
    """kill -9 left the forkserver, the resource tracker and both workers (1.3 GB) running for good; SIGINT and
    SIGTERM waited 9-15 s while every pending key was traced; `pymp-*` folders stayed in TMPDIR."""
    import signal
    import time

    proc, workers, tmpdir, out = _started_sweep(tmp_path)
    everyone = [proc.pid, *_descendants(proc.pid)]
    sent = time.monotonic()
    proc.send_signal(getattr(signal, sig))
    _, err = proc.communicate(timeout=60)
    took = time.monotonic() - sent
    assert _until(lambda: all(_gone(p) for p in everyone), 30), [(p, _cmdline(p)) for p in everyone if not _gone(p)]
    assert _left_in(tmpdir) == []
    assert (out / "sweep.csv").read_text() == "the previous set"
    if sig != "SIGKILL":
        assert proc.returncode == 128 + getattr(signal, sig) and err.strip().splitlines() == [
            f"flopdiff: interrupted ({sig}); the output folder was left as it was"], err
        assert took < 10, f"{took:.1f} s: the pending keys were waited for (8 keys of seconds each)"
    else:  # nothing runs after a SIGKILL: its staging folder, named after the dead process, goes at the next run
        from tracer.core.lifecycle import OutputSet

        OutputSet(out).discard()
    assert [p.name for p in tmp_path.iterdir() if "staging" in p.name] == []


def test_a_worker_killed_is_one_line_exit_3_and_the_old_set(tmp_path):
    import signal

    proc, workers, tmpdir, out = _started_sweep(tmp_path)
    os_kill = __import__("os").kill
    os_kill(workers[0], signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    lines = err.strip().splitlines()
    assert proc.returncode == 3 and len(lines) == 1 and "a worker process died" in lines[0], err
    assert "Traceback" not in err and (out / "sweep.csv").read_text() == "the previous set"
    assert _left_in(tmpdir) == []


def test_a_finished_sweep_leaves_nothing_in_tmpdir(tmp_path, tiny_v2_config):
    import os
    import subprocess
    import sys

    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir()
    proc = subprocess.run([sys.executable, "-m", "tracer.diff", "sweep", "640x640", "2000x700", "--quiet",
                           "--config", tiny_v2_config, "--out", str(tmp_path / "out")], capture_output=True,
                          text=True, env={**os.environ, "TMPDIR": str(tmpdir), "FLOPDIFF_CACHE": "off"})
    assert proc.returncode == 0, proc.stderr
    assert _left_in(tmpdir) == []  # no pymp-*


# ---- what file names can hold: the CSV, the terminal and folders that cannot be listed --------------------------

def test_file_names_reach_the_csv_as_cells_and_the_terminal_escaped(tmp_path, capsys, monkeypatch, tiny_v2_config):
    """A carriage return split a row in two when read back; `=...` went raw into a spreadsheet cell; an escape
    sequence in a name went raw to the terminal. Swept from inside the folder, the paths are the bare names."""
    from PIL import Image

    names = ["a\rb.png", "c\nd.png", "=HYPERLINK(1).png", "+1.png", "-1.png", "@x.png", 'plain, "quoted".png']
    for name in names:
        Image.new("1", (640, 640), 1).save(tmp_path / name, format="PNG")
    (tmp_path / "\x1b[2Jbad.png").write_text("not an image")  # a name that clears the screen
    monkeypatch.chdir(tmp_path)
    assert main(["sweep", ".", "--config", tiny_v2_config, "--out", str(tmp_path / "out"), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "\x1b" not in err and "unreadable: \\x1b[2Jbad.png: cannot read it as an image" in err
    rows = list(csv.DictReader((tmp_path / "out" / "sweep.csv").open(newline="")))
    assert sorted(r["path"] for r in rows) == sorted(("'" + n) if n[0] in "=+-@" else n for n in names)
    assert all(r["width"] == "640" for r in rows)


def test_a_sub_folder_that_cannot_be_listed_is_listed_as_unreadable(tmp_path, capsys, monkeypatch, tiny_v2_config):
    """Root lists every folder: the refusal a user gets is planted on os.scandir for one sub-folder."""
    import os

    from PIL import Image

    (tmp_path / "c" / "locked").mkdir(parents=True)
    Image.new("1", (640, 640), 1).save(tmp_path / "c" / "page.png")
    real = os.scandir

    def scandir(path="."):
        if str(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)
    monkeypatch.setattr(os, "scandir", scandir)
    out = tmp_path / "out"
    assert main(["sweep", str(tmp_path / "c"), "--config", tiny_v2_config, "--out", str(out), "--quiet"]) == 0
    doc = json.loads((out / "sweep.json").read_text())
    assert doc["pages"] == 1 and doc["unreadable"] == [
        {"path": str(tmp_path / "c" / "locked"), "why": "cannot list it (Permission denied)"}]
    assert f"unreadable: {tmp_path / 'c' / 'locked'}: cannot list it" in capsys.readouterr().err
