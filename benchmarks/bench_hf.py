"""Benchmark: any transformers model from its config alone (tracer.vendors.hf, analytic.families), cold
(`--no-cache`), the published shapes of each family's configuration class: LlamaConfig() (Llama-2 7B), MistralConfig()
(Mistral 7B), MixtralConfig() (Mixtral 8x7B), DeepseekV3Config() (DeepSeek-V3, 671B), LlavaConfig() (LLaVA-1.5 7B
with CLIP-L/336), each saved to a config.json and run as a user runs it (`flopdiff --config FILE --text-tokens 128
--decode-steps 8 --max-gap 0`, the gate on every stage) in a fresh process; the table has each run's wall time, peak
memory and per-stage FLOPs.

    taskset -c 0,1 python benchmarks/bench_hf.py [--repeat N] [--only llama,mixtral]
"""

from __future__ import annotations

import argparse
import os
import tempfile

from harness import flopdiff, table

CONFIGS = {"llama": "LlamaConfig", "mistral": "MistralConfig", "mixtral": "MixtralConfig",
           "deepseek_v3": "DeepseekV3Config", "llava": "LlavaConfig"}
ARGS = ["--text-tokens", "128", "--decode-steps", "8", "--analytic", "aligned", "--max-gap", "0", "--no-cache"]


def main() -> None:
    import transformers

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs per model (the table shows the median)")
    parser.add_argument("--only", help="comma-separated model types (default: all five)")
    args = parser.parse_args()
    kinds = args.only.split(",") if args.only else list(CONFIGS)
    folder = tempfile.mkdtemp(prefix="flopdiff-bench-hf-")
    os.environ["FLOPDIFF_CACHE_DIR"] = tempfile.mkdtemp(prefix="flopdiff-bench-cache-")
    rows = []
    for kind in kinds:
        path = os.path.join(folder, f"{kind}.json")
        getattr(transformers, CONFIGS[kind])().to_json_file(path)
        rows.append((f"{CONFIGS[kind]}() cold", *flopdiff(["--config", path, *ARGS], repeat=args.repeat)))
    table(f"any transformers model, cold, {' '.join(ARGS[:-1])}", rows)


if __name__ == "__main__":
    main()
