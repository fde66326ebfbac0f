"""Benchmark: the ONNX path on full-size DeepSeek-OCR-2, the 1000x1400 page, end to end (fx trace + weightless
ONNX export of the prefill and of decode step 0 + per-node ONNX counting + mapping + consistency check).

    python benchmarks/bench_onnx.py

Prints wall time, peak memory and the ONNX vs fx totals per stage.
"""

from __future__ import annotations

from harness import flopdiff, table

ONNX = ["--image-shape", "1000x1400", "--text-tokens", "9", "--decode-steps", "1", "--graph", "onnx"]


def onnx_totals(doc: dict) -> dict:
    return {s["name"]: [s["flops_onnx"], s["flops_fx"]] for s in doc["consistency"]["stages"]}


def main() -> None:
    table("DeepSeek-OCR-2 1000x1400: fx trace + ONNX export of the prefill and decode step 0 (ONNX, fx FLOPs per stage)",
          [("flopdiff --graph onnx", *flopdiff(ONNX, "report-onnx.json", onnx_totals))])


if __name__ == "__main__":
    main()
