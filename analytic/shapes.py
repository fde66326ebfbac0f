"""Workload from shape: tiles, views and image tokens from (width, height, base, tile, crop mode), exactly
as each vendor's preprocessing decides them (property-tested against the vendors' own functions).
Pure Python, no torch: the analytic model evaluates thousands of workloads per second."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache


@dataclass(frozen=True)
class Views:
    crop_grid_wh: tuple[int, int]  # (columns, rows) of tiles; (1, 1) when there are none
    tiles: int                     # number of tile views
    global_px: int                 # side of the (padded, square) global view
    tile_px: int
    image_tokens: int


@lru_cache(maxsize=None)
def _grids(min_tiles: int, max_tiles: int, v1_order: bool) -> tuple[tuple[int, int], ...]:
    if v1_order:  # v1 dynamic_preprocess: a set sorted by tile count (Python's sort is stable)
        grids = {(i, j) for n in range(min_tiles, max_tiles + 1) for i in range(1, n + 1) for j in range(1, n + 1)
                 if min_tiles <= i * j <= max_tiles}
        return tuple(sorted(grids, key=lambda g: g[0] * g[1]))
    # transformers get_all_supported_aspect_ratios: width-major, then sorted by tile count
    grids = [(w, h) for w in range(1, max_tiles + 1) for h in range(1, max_tiles + 1) if min_tiles <= w * h <= max_tiles]
    return tuple(sorted(grids, key=lambda g: g[0] * g[1]))


def closest_grid(width: int, height: int, tile: int, min_tiles: int, max_tiles: int, v1_order: bool) -> tuple[int, int]:
    """Closest aspect ratio; on a tie the later (larger) grid wins while the image covers more than half
    of the grid's pixel area: both vendors' rule."""
    aspect, area = width / height, width * height
    best, best_diff = (1, 1), float("inf")
    for g in _grids(min_tiles, max_tiles, v1_order):
        diff = abs(aspect - g[0] / g[1])
        if diff < best_diff:
            best, best_diff = g, diff
        elif diff == best_diff and area > 0.5 * tile * tile * g[0] * g[1]:
            best = g
    return best


def v1_views(width: int, height: int, base_size: int = 1024, image_size: int = 640, crop_mode: bool = True,
             patch: int = 16, downsample: int = 4) -> Views:
    """DeepSeek-OCR `infer()`: crop mode tiles pages larger than 640 on a side (2..9 tiles of
    `image_size`) and pads the global view to `base_size`; otherwise one view of `image_size`.
    Tokens: q rows of (q + 1) (a newline token per row), +1 separator, + tiles as (q_t*cols + 1) * q_t*rows."""
    if not crop_mode:
        q = math.ceil((image_size // patch) / downsample)
        return Views((1, 1), 0, image_size, image_size, q * (q + 1) + 1)
    grid = (1, 1) if width <= 640 and height <= 640 else closest_grid(width, height, image_size, 2, 9, True)
    q_base = math.ceil((base_size // patch) / downsample)
    q = math.ceil((image_size // patch) / downsample)
    tokens = q_base * (q_base + 1) + 1
    tiles = 0
    if grid[0] > 1 or grid[1] > 1:
        tiles = grid[0] * grid[1]
        tokens += (q * grid[0] + 1) * (q * grid[1])
    return Views(grid, tiles, base_size, image_size, tokens)


def v2_views(width: int, height: int, base_size: int = 1024, tile_size: int = 768, crop_mode: bool = True,
             patch: int = 16, downsample: int = 4, min_tiles: int = 2, max_tiles: int = 6) -> Views:
    """transformers DeepseekOcr2ImageProcessor: tiles of `tile_size` when the long side exceeds it
    (2..6 tiles); the global view is `base_size` in crop mode, else `tile_size`.
    Tokens: q_global^2 + q_tile^2 * tiles + 1 separator."""
    tiles, grid = 0, (1, 1)
    if crop_mode and max(width, height) > tile_size:
        grid = closest_grid(width, height, tile_size, min_tiles, max_tiles, False)
        tiles = grid[0] * grid[1]
    global_px = base_size if crop_mode else tile_size
    qg = math.ceil(global_px / patch / downsample)
    qt = math.ceil(tile_size / patch / downsample)
    return Views(grid, tiles, global_px, tile_size, qg * qg + qt * qt * tiles + 1)
