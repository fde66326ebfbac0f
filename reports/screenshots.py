"""Screenshots of the curated seed-naive pages at 1280x800 and 1920x1080 (headless Chromium via Playwright), for
reports/README.md: the first screen a performance engineer sees, and the same page with its largest gap's layer
opened; and of a sweep's page (its plots). Run by reports/regenerate.sh; needs chromium (or FLOPDIFF_CHROMIUM) and
playwright.

    python reports/screenshots.py reports/v2-seed-naive reports/v1-seed-naive
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from playwright.sync_api import sync_playwright

SIZES = ((1280, 800), (1920, 1080))


def main(folders: list[str]) -> None:
    chromium = os.environ.get("FLOPDIFF_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        for folder in map(Path, folders):
            out = folder.parent / "screenshots"
            if (folder / "sweep.html").exists():  # a flopdiff sweep: its plots
                page = browser.new_page(viewport={"width": 1280, "height": 800})
                page.goto((folder / "sweep.html").resolve().as_uri())
                page.wait_for_selector("#scatter circle")
                page.screenshot(path=out / f"{folder.name}-1280x800.png", full_page=True)
                page.close()
                continue
            out.mkdir(exist_ok=True)
            for width, height in SIZES:
                page = browser.new_page(viewport={"width": width, "height": height})
                page.goto((folder / "report.html").resolve().as_uri())
                page.wait_for_selector("#chart g.block")
                page.screenshot(path=out / f"{folder.name}-{width}x{height}.png")
                first = page.locator("table.layers tbody tr").first  # the largest gap: a fold of layers, or one layer
                first.click()
                if "fold" in (first.get_attribute("class") or ""):
                    page.locator("table.layers tr.member").first.click()
                page.locator("table.layers tr.detail").first.scroll_into_view_if_needed()
                page.screenshot(path=out / f"{folder.name}-{width}x{height}-layer.png")
                page.close()
        browser.close()


if __name__ == "__main__":
    main(sys.argv[1:])
