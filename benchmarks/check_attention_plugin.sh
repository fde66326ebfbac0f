#!/usr/bin/env bash
# Issue 13's proof on the GPU machine: DeepSeek-OCR-2 in real mode on CUDA with kernel attribution, the text model's
# attention (1) SDPA and (2) flash-attention-triton's FlashAttention-2 (a Triton kernel launched from Python)
# registered through --attn-plugin (benchmarks/attention_plugins.py: triton_fa2). Before the runs, the raw facts:
# FlopCounterMode over flash_attention_v2 alone, and where torch.profiler hangs its kernel.
# Writes OUTDIR/<run>/report.json and OUTDIR/recording-<shape>.json.gz (what tests/data/cuda keeps: the kernel
# records and the FLOP-bearing nodes they name, for tests/test_attention_cuda.py to replay on a CPU).
#   WHEELS_V2=DIR FAT_WHEEL=flash_attention_triton-0.1.1-py3-none-any.whl bash benchmarks/check_attention_plugin.sh OUTDIR
set -uo pipefail
out=${1:?OUTDIR}
mkdir -p "$out"
site=$(mktemp -d)
pip install -q --no-deps --no-build-isolation --target "$site" "$WHEELS_V2"/* "$FAT_WHEEL" >/dev/null 2>&1
export PYTHONPATH="$site:$PWD:$PWD/benchmarks"
python - <<'PY'
import torch
from torch.utils.flop_counter import FlopCounterMode
from flash_attention_triton import flash_attention_v2
from tracer.capture.instruments import _range
q = torch.randn(1, 10, 1024, 128, device="cuda", dtype=torch.float16)
flash_attention_v2(q, q, q); torch.cuda.synchronize()  # compile first
with FlopCounterMode(display=False) as fc:
    flash_attention_v2(q, q, q)
print("raw: FlopCounterMode over flash_attention_v2 (1,10,1024,128) fp16:", fc.get_total_flops(), "ops seen:",
      dict(fc.get_flop_counts().get("Global", {})))
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as p:
    r = _range("flopdiff.op.7")
    flash_attention_v2(q, q, q)
    r.__exit__(None, None, None)
    torch.cuda.synchronize()
for e in p.events():
    for k in e.kernels or ():
        chain, c = [], e
        while c is not None:
            chain.append(c.name); c = c.cpu_parent
        print("raw: kernel", k.name[:60], f"{k.duration:.1f} us", "launched under", " <- ".join(chain))
PY
for shape in 640x640 1000x1400; do
  for run in "sdpa --attn sdpa" \
             "triton_fa2 --attn-plugin attention_plugins:triton_fa2 --attn text_config=triton_fa2,vision_config=sdpa"; do
    set -- $run; name=$1; shift
    t0=$SECONDS
    python -m tracer.diff --device cuda --mode real --image-shape "$shape" --text-tokens 4 --decode-steps 2 \
        --json-nodes flops --quiet --timings --out "$out/$shape-$name" "$@" > "$out/$shape-$name.log" 2>&1
    echo "$shape $name: exit $? in $((SECONDS - t0)) s"; tail -2 "$out/$shape-$name.log" | cut -c1-300
  done
  python - "$out" "$shape" <<'PY'
import gzip, json, sys
out, shape = sys.argv[1:]
docs = {n: json.load(open(f"{out}/{shape}-{n}/report.json")) for n in ("sdpa", "triton_fa2")}
for n, d in docs.items():
    print(shape, n, "stages (torch, full, gap):", {s["name"]: (s["flops_torch"], s["flops_full"], s["gap"]) for s in d["stages"]})
    print(shape, n, "kernel_time:", d["kernel_time"])
d = docs["triton_fa2"]
for k in d["kernels"]:
    if "forward_kernel" in k["kernel"]:
        print(shape, "kernel", k["kernel"][:60], {x: k[x] for x in ("calls", "time_us", "flops_full", "flops_torch",
              "counted_by_flopcountermode", "ops", "layers")})
calls = [n for n in d["nodes"] if n["op"] == "attention::triton_fa2"]
print(shape, "boundary nodes:", len(calls), "FLOPs", sum(n["flops_full"] for n in calls), "torch", sum(n["flops_torch"] for n in calls))
keep = ("id", "stage", "step", "op", "module", "flops_full", "flops_torch", "status", "layer", "input_shapes", "attention")
rec = {"what": f"flopdiff --device cuda --mode real --image-shape {shape} --text-tokens 4 --decode-steps 2 --attn-plugin "
               "attention_plugins:triton_fa2 --attn text_config=triton_fa2,vision_config=sdpa on an NVIDIA H200 "
               "(flash-attention-triton 0.1.1), written by flopdiff itself: the kernel records and the nodes they name",
       "model": d["model"], "workload": d["workload"], "options": d["options"], "analytic": d["analytic"],
       "device": d["device"], "stages": d["stages"], "sdpa_stages": docs["sdpa"]["stages"],
       "nodes": [{k: n[k] for k in keep if k in n} for n in d["nodes"]], "kernel_records": d["kernel_records"]}
with gzip.open(f"{out}/recording-{shape}.json.gz", "wt") as f:
    json.dump(rec, f, separators=(",", ":"))
PY
done
