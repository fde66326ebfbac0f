"""Benchmark: the ONNX path on full-size DeepSeek-OCR-2, the 1000x1400 page, end to end (fx trace + weightless
ONNX export of the prefill + per-node ONNX counting + mapping + consistency check).

    python benchmarks/bench_onnx.py

Prints wall time, peak RSS and the ONNX vs fx totals per stage.
"""

from __future__ import annotations

from harness import HEAD, measure, table

ONNX = """
import json, sys, tempfile
from tracer.diff import main
out = tempfile.mkdtemp()
assert main(["--image-shape", "1000x1400", "--text-tokens", "9", "--decode-steps", "1", "--graph", "onnx",
             "--out", out, "--quiet"]) == 0
""" + HEAD + """
doc = head(out + "/report-onnx.json")
print(json.dumps({s["name"]: [s["flops_onnx"], s["flops_fx"]] for s in doc["consistency"]["stages"]}), file=sys.stderr)
"""


def main() -> None:
    table("DeepSeek-OCR-2 1000x1400: fx trace + ONNX export of the prefill (ONNX FLOPs, fx FLOPs per stage)",
          [("flopdiff --graph onnx", *measure(ONNX))])


if __name__ == "__main__":
    main()
