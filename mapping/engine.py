"""The matching engine: graph nodes -> modules -> analytic layers, as a networkx graph.

Each FLOP-bearing node (FLOPs under policy full, or an op with no formula) resolves to exactly one analytic
layer: the one rule of the table that matches its module path (call indices stripped) and op. Two matching
rules are an error naming both; no matching rule leaves the node unmapped, with the reason, never dropped.

Every other node that costs something (CUDA-core FLOPs, bytes moved, weights read) resolves the same way, and where
no rule names it (a residual add, RoPE's products, a mask), to the rest of its enclosing scope (`Matcher.
resolve_scope`): the pseudo-layer `<scope>.(rest)`, so that every column's per-layer counts add up to the stage's and
work the analytic model leaves out shows where it happens instead of vanishing. Results are cached per (stage, module
path, op, function, source): a stage has tens of thousands of nodes but a few thousand distinct keys.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import networkx as nx

from mapping.table import CallName, Rule, Table
from tracer.core.errors import FlopdiffError
from tracer.core.modulepaths import split_path


def flop_bearing(node: dict[str, Any]) -> bool:
    return node["flops_full"] > 0 or node["status"] == "unknown"


#: the node columns besides tensor-core FLOPs that make a node cost something (tracer.count.memory)
COST_COLUMNS = ("cuda_flops", "bytes_read", "bytes_written", "weight_bytes")
#: the pseudo-layer of a scope's work that no rule names (`decoder.layers.3.(rest)`; `(rest)` outside every scope)
REST = "(rest)"


def node_source(node: dict[str, Any]) -> str:
    """The node's innermost source line for `source` rules (ONNX nodes carry their stack trace's first line as a
    list of at most one)."""
    source = node.get("source") or ""
    return source if isinstance(source, str) else (source[0] if source else "")


def costs(node: dict[str, Any]) -> bool:
    """Anything to attribute: FLOPs, an op with no formula, or any other column."""
    return (flop_bearing(node) or node.get("cuda_status") == "uncounted"
            or any(node.get(k) for k in COST_COLUMNS))


def rest_of(scope: str | None) -> str:
    return f"{scope}.{REST}" if scope else REST


@dataclass
class Resolution:
    layer: str | None
    rule: int | None = None
    reason: str = ""


@dataclass
class Mapping:
    """The join. `graph` nodes: ('node', id), ('module', stage, module_call), ('layer', stage, layer id)."""

    matcher: "Matcher | None" = None
    graph: nx.DiGraph = field(default_factory=nx.DiGraph)
    layer_of: dict[str, str] = field(default_factory=dict)      # node id -> layer id
    unmapped: dict[str, str] = field(default_factory=dict)      # node id -> reason
    rest: dict[str, str] = field(default_factory=dict)          # node id -> `<scope>.(rest)`: no rule names it

    def rule_of(self, node: dict[str, Any]) -> str | None:
        """The rule that joined this node's module to its layer (an edge of the graph), as the table states it."""
        edge = (("module", node["stage"], node["module"]), ("layer", node["stage"], node.get("layer")))
        if self.matcher is None or not self.graph.has_edge(*edge):
            return None
        return self.matcher.table.rules[self.graph.edges[edge]["rule"]].name()


class Matcher:
    def __init__(self, table: Table, present: set[str], catalogue: dict[str, set[str]]):
        """`present`: call names this workload has (e.g. {'global', 'tiles'}); `catalogue`: per stage, the
        layer ids of the vendor-exact (aligned) analytic model."""
        self.table = table
        self.catalogue = catalogue
        self.orders = {c.placeholder: [n for n in c.order if n in present] for c in table.call_names}
        self._cache: dict[tuple[str, ...], Resolution] = {}

    def resolve(self, stage: str, module_call: str, op: str, function: str = "", source: str = "") -> Resolution:
        """`function`: the vendor function that issued the op (node `vendor_function`), `source` its innermost
        source line (node `source`), for rules naming them."""
        key = (stage, module_call, op, function, source)
        if key not in self._cache:
            self._cache[key] = self._resolve(stage, module_call, op, function, source)
        return self._cache[key]

    def resolve_scope(self, stage: str, module_call: str, whole: bool = False) -> str | None:
        """The analytic layer or block that work in `module_call` belongs to when no rule maps it by op: from the
        innermost module outwards, the first level where the rules (ops ignored) or the scopes name exactly one.
        `whole`: only the rules that claim a whole module (no ops, no function): a rule for an attention module's
        attention ops does not make its RoPE products the attention's (a node's rest, `map_nodes`)."""
        key = (stage, module_call, "*whole*" if whole else "*scope*")
        if key not in self._cache:
            names, calls = split_path(module_call)
            layer = None
            claims = [r for r in self.table.rules if not whole or not (r.ops or r.functions or r.sources)]
            for k in range(len(names), 0, -1):
                for rules in (claims, self.table.scopes):
                    found = {self._fill(r, g.groupdict(), names[:k], calls[:k]) for r in rules
                             if (g := r.regex.fullmatch(".".join(names[:k]))) is not None}
                    found.discard(None)
                    if len(found) == 1:
                        layer = found.pop()
                        break
                if layer is not None:
                    break
            self._cache[key] = Resolution(layer)
        return self._cache[key].layer

    def _fill(self, rule: Rule, groups: dict[str, str], names: list[str], calls: list[int]) -> str | None:
        """The rule's layer id for this module call; None when a call name it needs is out of range."""
        for spec in self.table.call_names:
            if "{" + spec.placeholder + "}" in rule.layer:
                name = self._call_name(spec, names, calls)
                if name is None:
                    return None
                groups[spec.placeholder] = name
        return rule.layer.format(**groups)

    def _call_name(self, spec: CallName, names: list[str], calls: list[int]) -> str | None:
        for k in range(len(names)):
            if ".".join(names[: k + 1]) in spec.modules:
                order = self.orders[spec.placeholder]
                return order[calls[k]] if calls[k] < len(order) else None
        return None

    def _resolve(self, stage: str, module_call: str, op: str, function: str, source: str) -> Resolution:
        names, calls = split_path(module_call)
        path = ".".join(names)
        hits = [(r, g) for r in self.table.rules if (g := r.match(path, op, function, source)) is not None]
        if not hits:
            return Resolution(None, reason=f"no rule matches module {path or '(top level)'} with op {op}")
        if len(hits) > 1:
            raise FlopdiffError(f"mapping table {self.table.source}: ambiguous: {hits[0][0].name()} and "
                                f"{hits[1][0].name()} both match module {path} with op {op}; narrow one of them")
        rule, groups = hits[0]
        layer = self._fill(rule, groups, names, calls)
        if layer is None:
            return Resolution(None, rule.index, f"{rule.name()}: call {module_call} has no name in "
                                                f"{self.orders}")
        if layer not in self.catalogue.get(stage, set()):
            return Resolution(None, rule.index, f"{rule.name()} gives {layer!r}, which the analytic model has not "
                                                f"in stage {stage}")
        return Resolution(layer, rule.index)


def map_nodes(table: Table, nodes: Iterable[dict[str, Any]], present: set[str],
              catalogue: dict[str, set[str]]) -> Mapping:
    """Resolve every node record (report.json's `nodes`) that costs something to one analytic layer: a FLOP-bearing
    one by a rule or not at all (unmapped, with the reason), any other by a rule or to its scope's rest."""
    matcher = Matcher(table, present, catalogue)
    result = Mapping(matcher)
    g = result.graph
    for node in nodes:
        if not costs(node):
            continue
        nid, stage = node["id"], node["stage"]
        res = matcher.resolve(stage, node["module"], node["op"], node.get("vendor_function", ""), node_source(node))
        if res.layer is None and not flop_bearing(node):
            result.rest[nid] = rest_of(matcher.resolve_scope(stage, node["module"], whole=True) if node["module"] else None)
            continue
        module = ("module", stage, node["module"])
        g.add_edge(("node", nid), module)
        if res.layer is None:
            result.unmapped[nid] = res.reason
            continue
        result.layer_of[nid] = res.layer
        layer = ("layer", stage, res.layer)
        if not g.has_edge(module, layer):
            g.add_edge(module, layer, rule=res.rule)
    return result


def coverage(nodes: Iterable[dict[str, Any]], mapping: Mapping) -> dict[str, int]:
    c = {"nodes_with_flops": 0, "mapped": 0, "unmapped": 0, "unmapped_flops": 0}
    for n in nodes:
        if not flop_bearing(n):
            continue
        c["nodes_with_flops"] += 1
        if n["id"] in mapping.layer_of:
            c["mapped"] += 1
        else:
            c["unmapped"] += 1
            c["unmapped_flops"] += n["flops_full"]
    return c
