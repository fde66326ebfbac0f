"""Decode steps in closed form: steps 1..n-1 of a long decode from a few traced probes, proven, never assumed.

Decode steps of a transformer differ by the KV length alone: the same ops on the same shapes except along the cached
positions, and (fake mode: no values, so no routing) every count affine in the step. So a decode of n steps traces
step 0 (it reads the prefill's cache and is its own program), steps 1 and 2 from the real cache chain, and steps
n // 2 and n - 1 from synthesized states (tracer.vendors.base.synthesized_state, once the real cache step 3 reads is
found equal to the synthesized one), and proves on their counted rows (`prove`):
  * one program: the same ops in the same order, each with the same op, module, source, dtypes and statuses;
  * affine: every integer of every row (FLOPs both ways, CUDA-core FLOPs, bytes read and written, weights, KV, each
    storage read or written, every shape dimension, attention parameters) on one line through the four probes,
    with a whole slope (one position per step): four points for a two-point fit;
  * fused I/O stays a sum: where several nodes read (or write) one storage, their bytes keep their order from the
    first probe to the last (two lines that cross would change which one a layer's fused I/O takes);
  * the graph's memory: its weights constant, its activation peak affine.
Then steps 1..n-1 become one rows-only stage graph (`span` = (1, n-1)): the last probe's rows, ids
`decode/1-<n-1>/<name>`, each count the sum over the steps (`count * (first + last) / 2`, exact on a line), shapes
the last step's, and per row `series`: the affine form `a + b * step` of each count. Where the proof fails,
`prove` says why in one line and the caller traces every step (tracer.capture.trace).
"""

from __future__ import annotations

from typing import Any

from tracer.capture.recorder import StageGraph

#: the row counts a span sums over its steps (the rest of a row describes one step: the last one's)
SUMMED = ("flops_torch", "flops_full", "bytes_read", "bytes_written", "weight_bytes", "cuda_flops", "kv_bytes")
#: a step's totals that are sums of its rows (its weights and activation peak come from its graph's memory)
STEP_SUMS = ("flops_torch", "flops_full", "bytes_read", "bytes_written", "cuda_flops")
SAME = ("op", "module", "module_class", "source", "vendor_source", "vendor_function", "input_dtypes", "output_dtypes",
        "status", "cuda_status", "stage")


def probe_steps(steps: int) -> tuple[int, int, int, int]:
    """The traced steps a span of 1..steps-1 is proven from (step 0 is traced apart)."""
    return 1, 2, steps // 2, steps - 1


class NotAffine(Exception):
    """The one-line reason the closed form does not hold."""


def prove(probes: dict[int, StageGraph]) -> StageGraph:
    """Steps probes' min..max as one rows-only stage graph (the module's docstring says how), or NotAffine."""
    xs = sorted(probes)
    rows = {k: probes[k].rows for k in xs}
    first, last = xs[0], xs[-1]
    sizes = {k: len(r) for k, r in rows.items()}
    if len(set(sizes.values())) != 1:
        raise NotAffine(f"the steps are not one program: step {first} runs {sizes[first]} ops, step "
                        f"{next(k for k in xs if sizes[k] != sizes[first])} "
                        f"{sizes[next(k for k in xs if sizes[k] != sizes[first])]}")
    count = last - first + 1
    out = []
    for i, row in enumerate(rows[last]):
        column = [rows[k][i] for k in xs]
        name = _name(row)
        for key in SAME:
            values = {repr(r.get(key)) for r in column}
            if len(values) != 1:
                raise NotAffine(f"the steps are not one program: op {i} ({name}) differs in {key} between steps")
        if len({_name(r) for r in column}) != 1:
            raise NotAffine(f"the steps are not one program: op {i} is {name} at step {last}, "
                            f"{_name(column[0])} at step {first}")
        forms: dict[str, list[int]] = {}
        summed = {}
        for key in SUMMED:
            a, b = _line([r.get(key, 0) for r in column], xs, f"{name}: {key}")
            forms[key] = [a, b]
            summed[key] = count * a + b * (first + last) * count // 2
        for key in ("input_shapes", "output_shapes", "attention", "inner"):
            if key in row:
                _check_lines([r[key] for r in column], xs, f"{name}: {key}")
        agg = {**row, "id": f"decode/{first}-{last}/{name}", "step": first, **summed,
               "series": {"steps": [first, last], **forms}}
        for key in ("reads", "writes"):
            if key in row:
                agg[key] = _storages([r[key] for r in column], xs, count, f"{name}: {key}")
        out.append(agg)
    for key in ("reads", "writes"):
        _orders_kept([rows[first], rows[last]], key)
    memories = [probes[k].memory for k in xs]
    if len({m["weight_bytes"] for m in memories}) != 1:
        raise NotAffine("the steps read different weights")
    top = max(memories, key=lambda m: m["act_peak_bytes"])
    if len({repr(m["outputs"]) for m in memories}) != 1:
        raise NotAffine("the steps return different storages")
    memory = {"weight_bytes": count * memories[0]["weight_bytes"], "act_peak_bytes": top["act_peak_bytes"],
              "act_peak_node": top["act_peak_node"], "outputs": memories[-1]["outputs"]}
    kv = [probes[k].kv_layers for k in xs]
    if any(v is None for v in kv) != all(v is None for v in kv):
        raise NotAffine("the steps return a KV cache at some steps only")
    # the per-step totals' forms (tracer.count.records: a decode's `steps`, a sweep's shorter decodes)
    totals = {key: _line([sum(r[key] for r in rows[k]) for k in xs], xs, key) for key in STEP_SUMS}
    totals["weight_bytes"] = [memories[0]["weight_bytes"], 0]
    totals["act_peak_bytes"] = _line([m["act_peak_bytes"] for m in memories], xs, "the activation peak")
    if kv[0] is not None:
        totals["kv_bytes"] = _line([sum(v) for v in kv], xs, "the KV cache")
    totals["kv_len"] = _line([probes[k].kv_len for k in xs], xs, "the KV length")
    sg = StageGraph("decode", None, step=first, kv_len=probes[last].kv_len, rows=out, kv_layers=kv[-1],
                    memory=memory, span=(first, last))
    sg.series = totals
    return sg


def _name(row: dict[str, Any]) -> str:
    return row["id"].rsplit("/", 1)[-1]


def _line(values: list[int], xs: list[int], what: str) -> list[int]:
    """[a, b] with values[i] = a + b * xs[i] for every probe, b whole; else NotAffine."""
    b, rest = divmod(values[-1] - values[0], xs[-1] - xs[0])
    a = values[0] - b * xs[0]
    if rest or any(v != a + b * x for v, x in zip(values, xs)):
        raise NotAffine(f"{what} is not affine in the step ({', '.join(f'{v:,}' for v in values)} at steps "
                        f"{', '.join(map(str, xs))})")
    return [a, b]


def _check_lines(values: list[Any], xs: list[int], what: str) -> None:
    """Every integer of the nested values on a line (shapes, attention parameters); the rest equal."""
    head = values[0]
    if isinstance(head, bool) or not isinstance(head, (int, list, tuple, dict)):
        if any(v != head for v in values):
            raise NotAffine(f"{what} differs between steps")
        return
    if isinstance(head, int):
        _line(values, xs, what)
        return
    if isinstance(head, dict):
        if any(not isinstance(v, dict) or v.keys() != head.keys() for v in values):
            raise NotAffine(f"{what} differs between steps")
        for k in head:
            _check_lines([v[k] for v in values], xs, f"{what}.{k}")
        return
    if any(not isinstance(v, (list, tuple)) or len(v) != len(head) for v in values):
        raise NotAffine(f"{what} differs between steps")
    for j in range(len(head)):
        _check_lines([v[j] for v in values], xs, what)


def _storages(values: list[list[list[int]]], xs: list[int], count: int, what: str) -> list[list[int]]:
    """A row's storage records ([storage, bytes]) over the steps: the same storages, each one's bytes summed."""
    if any(len(v) != len(values[0]) or [s for s, _ in v] != [s for s, _ in values[0]] for v in values):
        raise NotAffine(f"{what}: the steps touch different storages")
    out = []
    for j, (sid, _) in enumerate(values[-1]):
        a, b = _line([v[j][1] for v in values], xs, what)
        out.append([sid, count * a + b * (xs[0] + xs[-1]) * count // 2])
    return out


def _orders_kept(ends: list[list[dict[str, Any]]], key: str) -> None:
    """Where nodes share a storage, the order of their bytes at the first probe is the order at the last."""
    at: list[dict[int, list[tuple[int, int]]]] = []
    for rows in ends:
        per: dict[int, list[tuple[int, int]]] = {}
        for i, r in enumerate(rows):
            for sid, b in r.get(key, ()):
                per.setdefault(sid, []).append((i, b))
        at.append(per)
    for sid, first in at[0].items():
        last = dict(at[1][sid])
        for i, bi in first:
            for j, bj in first:
                if i < j and (bi > bj) != (last[i] > last[j]) and (bi < bj) != (last[i] < last[j]):
                    raise NotAffine(f"two ops' {key} of one storage cross between the steps (ops {i} and {j})")
