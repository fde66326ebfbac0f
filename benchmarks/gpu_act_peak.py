"""The activation peak on a GPU: the trace's liveness peak (tracer.count.memory) beside what PyTorch's caching allocator
measured over the same real run, `torch.cuda.max_memory_allocated()` less the model's weights (its parameters and
buffers as allocated). Prints a table and writes the numbers as JSON (tests/data/cuda/ keeps a recording).

    python benchmarks/gpu_act_peak.py [--config FILE] [--image-shape WxH] [--out FILE.json]

Needs a CUDA device and DeepSeek-OCR-2 in transformers. The allocator's measure sits above the liveness peak by what
the trace cannot see: its blocks (every allocation rounded up to 512 bytes, small ones packed in 2 MiB segments but
counted by their rounded size), the cuBLAS and attention kernels' own workspaces, and tensors the vendor code keeps
longer than their last use (a reference held in a Python variable); it cannot sit below it unless liveness
overcounts.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="a DeepSeek-OCR-2 config.json (default: the published one)")
    parser.add_argument("--image-shape", default="1000x1400")
    parser.add_argument("--out", help="write the numbers as JSON here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_act_peak: no CUDA device (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    import transformers

    from tracer.core.workload import Workload
    from tracer.pipeline import Options, run
    from tracer.vendors import BuildOptions, get_vendor

    w, h = map(int, args.image_shape.split("x"))
    workload = Workload(image_wh=(w, h), text_tokens=4, decode_steps=1)
    build = BuildOptions(mode="real", device="cuda")
    config = get_vendor("deepseek-ocr-2").load_config(args.config, build)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("meta"):  # the model's weights as the run allocates them (same classes, dtypes, shapes)
        shapes = transformers.DeepseekOcr2ForConditionalGeneration(config)
    torch.set_default_dtype(previous)
    weights = sum(t.numel() * t.element_size() for t in [*shapes.parameters(), *shapes.buffers()])
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    result = run(workload, Options(build=build, mode="real", config=args.config, cache=False, sequential=True))
    allocated = torch.cuda.max_memory_allocated() - before
    stages = {s.name: s for s in result.stages}
    traced = max(stages["prefill"].act_peak_bytes, stages["decode"].act_peak_bytes)
    measured = allocated - weights
    doc = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "transformers": transformers.__version__,
           "workload": result.report["workload"], "max_memory_allocated": allocated, "weights_allocated": weights,
           "measured_act_peak": measured, "traced_act_peak": traced,
           "traced_act_peak_node": stages["prefill"].act_peak_node,
           "traced_per_stage": {n: s.act_peak_bytes for n, s in stages.items()}}
    print(f"{doc['device']}, torch {doc['torch']}, transformers {doc['transformers']}, {args.image_shape} page")
    print(f"  max_memory_allocated over the run  {allocated:>16,}")
    print(f"  less the weights as allocated      {weights:>16,}")
    print(f"  = the activations' measured peak   {measured:>16,}")
    print(f"  the trace's liveness peak          {traced:>16,}  (at {doc['traced_act_peak_node']})")
    print(f"  measured / traced                  {measured / traced:>16.4f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(doc, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
