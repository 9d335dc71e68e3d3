"""The explained plan: per op, its precision and the policy rule behind it, its kernel with its
config and why, and the numerics gate's result (`plan --explain`, report.md's "Explained plan")."""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from nemocompile.codegen.tuning.space import parse_config, short
from nemocompile.graph.ir import Graph, Op
from nemocompile.graph.kernels import REFERENCE, find, kernel_of
from nemocompile.graph.opdef import opdef, operand
from nemocompile.passes.precision_policy import COMPONENT_CATEGORIES, PrecisionPolicy
from nemocompile.runtime.engine_format import KernelConfig


@dataclass(frozen=True)
class OpExplained:
    graph: str
    op: str
    scope: str
    value: str
    precision: str
    rule: str
    kernel: str
    config: str
    why: str
    check: str

    def as_json(self) -> dict[str, str]:
        return dict(self.__dict__)


def _component(category: str) -> str | None:
    return next((c for c, categories in COMPONENT_CATEGORIES.items() if category in categories), None)


def precision_rule(op: Op, graph: Graph, policy: PrecisionPolicy) -> tuple[str, str]:
    """(the op's precision, the policy rule that gave it)."""
    types = graph.value_types()
    weights = graph.weight_map()
    weight = operand(op, "weight") if "weight" in opdef(op.opname).operand_names else None
    x = op.operands[0] if op.operands else None
    x_format = types[x].dtype.name if x is not None and x in types else "-"
    act = op.attrs.get("act_format")
    if weight is None or weight not in weights:
        out = op.results[0].type.dtype.name if op.results else "-"
        return f"x={x_format} out={out}", f"activations in the base format ({policy.base}) unless an op quantizes them"
    w = weights[weight]
    precision = f"w={w.type.dtype.name} x={x_format}" + (f" act={act}" if isinstance(act, str) else "")
    if policy.excluded(w.name):
        pattern = next(p for p in policy.exclude if fnmatch.fnmatchcase(w.name, p))
        return precision, f"weight {w.name} excluded by pattern '{pattern}': kept in {policy.base}"
    component = _component(w.category)
    if component is None:
        return precision, f"weight category {w.category}: no policy component, kept in {w.type.dtype.name}"
    chosen = policy.components.get(component, policy.base)
    return precision, f"policy component {component} = {chosen} (weight category {w.category})"


def explain(graphs: Mapping[str, Graph], policy: PrecisionPolicy, configs: Sequence[KernelConfig] = (),
            arch: str = "") -> list[OpExplained]:
    """Every op of `graphs` (split views left out) explained; `configs` are the build's decisions."""
    by_value = {(c.graph, c.value): c for c in configs}
    rows = []
    for graph_name, graph in graphs.items():
        for op in graph.ops:
            if op.opname == "split":
                continue
            precision, rule = precision_rule(op, graph, policy)
            name = kernel_of(op)
            spec = find(op.opname, name)
            chosen = by_value.get((graph_name, op.results[0].name)) if op.results else None
            if chosen is not None:
                config = short(parse_config(chosen.config))
                why, check = f"{chosen.source}: {chosen.why}", chosen.check
            elif name == REFERENCE:
                config, why = "-", f"fallback: no compiled candidate of {op.opname} takes these formats on {arch}" \
                    if arch else "fallback: the reference implementation"
                check = "the reference implementation is the op's meaning"
            else:
                backend = spec.backend if spec is not None else "unknown"
                config, why = "-", f"{backend} kernel without a tunable config (its builder's own, or the runtime's)"
                check = "not run: no kernel config to check"
            rows.append(OpExplained(graph_name, op.opname, op.scope, op.results[0].name if op.results else "",
                                    precision, rule, name, config, why, check))
    return rows


def explained_lines(rows: Sequence[OpExplained], title: str = "## Explained plan") -> list[str]:
    lines = [title, "", "| graph | op | scope | precision | policy rule | kernel | config | why | check |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.graph} | {r.op} | {r.scope} | {r.precision} | {r.rule} | {r.kernel} | {r.config} | "
                     f"{r.why} | {r.check} |")
    return lines
