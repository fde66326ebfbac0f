"""Benchmark: analytic evaluations per second on one core (build the layer tree + evaluate both policies).

    python benchmarks/bench_analytic.py
"""

import random
import time

from rich.console import Console
from rich.table import Table

from analytic.api import build, counting_policy, shape_for
from analytic.request import Shape


def main() -> None:
    rng = random.Random(0)
    table = Table(title="analytic evaluation speed (one core)")
    for col in ("model", "workloads", "seconds", "workloads/s"):
        table.add_column(col)
    for model in ("deepseek-ocr", "deepseek-ocr-2"):
        base = shape_for(model, (1000, 1400), decode_steps=1)
        shapes = [Shape(rng.randint(200, 4000), rng.randint(200, 4000), base.base_size, base.tile_size, True, 9, 1)
                  for _ in range(300)]
        full, torch_ = counting_policy("full"), counting_policy("torch")
        t0 = time.perf_counter()
        for s in shapes:
            tree = build(model, s)
            for blocks in tree.stages.values():
                for b in blocks:
                    b.cost(full), b.cost(torch_)
        dt = time.perf_counter() - t0
        table.add_row(model, str(len(shapes)), f"{dt:.2f}", f"{len(shapes) / dt:.0f}")
    Console(width=120).print(table)


if __name__ == "__main__":
    main()
