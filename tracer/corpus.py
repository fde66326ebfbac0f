"""A corpus of page images of real document sizes, for `flopdiff sweep` tests and demos:

    python -m tracer.corpus DIR [--pages 200]

A4 / Letter / Legal portrait and landscape at 150, 200 and 300 dpi, receipts (80 mm thermal rolls at 203 dpi, three
lengths), slides (4:3 and 16:9 at common resolutions) and phone photos (12 Mpx, 4:3 both ways, and a screenshot), 27
shapes; the pages cycle through them. White 1-bit PNGs: only the size matters to FLOPs, and a 1-bit page is written
in milliseconds whatever its size.
"""

from __future__ import annotations

import argparse
from pathlib import Path

MM_PER_INCH = 25.4


def _paper(w_mm: float, h_mm: float, dpi: int) -> tuple[int, int]:
    return round(w_mm / MM_PER_INCH * dpi), round(h_mm / MM_PER_INCH * dpi)


PAPERS = {"a4": (210, 297), "letter": (215.9, 279.4), "legal": (215.9, 355.6)}
SHAPES: dict[str, tuple[int, int]] = {}
for _name, (_w, _h) in PAPERS.items():
    for _dpi in (150, 200, 300):
        SHAPES[f"{_name}-{_dpi}dpi-portrait"] = _paper(_w, _h, _dpi)
        SHAPES[f"{_name}-{_dpi}dpi-landscape"] = _paper(_h, _w, _dpi)
SHAPES.update({
    "receipt-short": _paper(80, 150, 203), "receipt": _paper(80, 300, 203), "receipt-long": _paper(80, 600, 203),
    "slide-4x3": (1024, 768), "slide-720p": (1280, 720), "slide-1080p": (1920, 1080),
    "phone-photo-portrait": (3024, 4032), "phone-photo-landscape": (4032, 3024), "phone-screenshot": (1080, 2400),
})


def write(folder: str | Path, pages: int = 200) -> list[Path]:
    """`pages` images in `folder` (created), cycling through SHAPES; their paths."""
    from PIL import Image

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    names = list(SHAPES)
    paths = []
    for i in range(pages):
        name = names[i % len(names)]
        path = out / f"page-{i:04d}-{name}.png"
        Image.new("1", SHAPES[name], 1).save(path, optimize=False)
        paths.append(path)
    return paths


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m tracer.corpus", description=__doc__.splitlines()[0])
    p.add_argument("folder", help="where to write the pages (created)")
    p.add_argument("--pages", type=int, default=200, help="how many pages (default: 200)")
    args = p.parse_args()
    paths = write(args.folder, args.pages)
    print(f"wrote {len(paths)} pages of {min(len(paths), len(SHAPES))} shapes to {args.folder}")


if __name__ == "__main__":
    main()
