"""Benchmark: how long headless Chromium takes to open a report.html until its layer table is on screen.

    python benchmarks/bench_html.py REPORT.html [REPORT.html ...]

Target (issue 5): a report of the v1 page (1000x1400, 10 decode steps) opens in under 2 s. Needs Debian's
`chromium` (or FLOPDIFF_CHROMIUM) and Playwright.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table


def main() -> None:
    files = [Path(p).resolve() for p in sys.argv[1:]]
    if not files:
        sys.exit(__doc__)
    from playwright.sync_api import sync_playwright

    exe = os.environ.get("FLOPDIFF_CHROMIUM") or shutil.which("chromium")
    table = Table(title="report.html in headless Chromium (cold page, warm browser)")
    for col in ("report", "size MB", "layers", "open s (to layer table)", "expand biggest layer s", "search s"):
        table.add_column(col)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=["--no-sandbox"])
        for f in files:
            page = browser.new_page()
            t0 = time.perf_counter()
            page.goto(f.as_uri())
            page.wait_for_selector("table.layers tr.layer")
            opened = time.perf_counter() - t0
            layers = page.locator("table.layers tr.layer").count()
            page.locator("table.layers th", has_text="nodes").first.click()
            t1 = time.perf_counter()
            page.locator("table.layers tr.layer").first.click()
            page.wait_for_selector("tr.node")
            expanded = time.perf_counter() - t1
            t2 = time.perf_counter()
            page.fill("#search", "experts")
            page.wait_for_function("document.getElementById('count').textContent.includes('match')")
            searched = time.perf_counter() - t2
            table.add_row(f.parent.name + "/" + f.name, f"{f.stat().st_size / 1e6:.1f}", str(layers),
                          f"{opened:.2f}", f"{expanded:.2f}", f"{searched:.2f}")
            page.close()
        browser.close()
    Console(width=140).print(table)


if __name__ == "__main__":
    main()
