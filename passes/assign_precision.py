"""assign_precision: give every GEMM weight the format its component's policy names (NVFP4, FP8,
or the float base), and quantize the activations of the GEMMs the policy runs W4A4 / W8A8 with
an explicit `quantize` op before the GEMM (so a later pass can fuse it into the op before).
A `quantize` takes an `input_scale` weight: the ModelOpt checkpoint's when it has one, otherwise
one without a source that calibration sets at build time. Weights already quantized in the
checkpoint keep their format (never re-quantized) and are deployed as exported, whatever the
policy: a GEMM whose checkpoint carries an `input_scale` quantizes its activations with it
(NVFP4 W4A4, FP8 W8A8) where the target computes in that format, and runs weight-only (W4A16)
where it cannot, with a note; one without an `input_scale` runs weight-only, as exported. The
policy's float base applies to the float parts only. Runs after decompose, on core ops.

The weights are retyped in the graph's header; the activation quantization is one rewrite rule
per format (`act_nvfp4`, `act_fp8`), and the ops after each are re-typed by the rule engine."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import ClassVar

from nemocompile.base.errors import UsageError
from nemocompile.base.formats import ACT_FORMATS, Precision, indivisible_input
from nemocompile.graph.builder import GraphBuilder
from nemocompile.graph.ir import Graph, Op, Weight
from nemocompile.graph.nemotron_h import INPUT_SCALE_CATEGORY
from nemocompile.graph.opdef import KERNEL_ATTR, opdef, operand
from nemocompile.graph.types import DTYPES, F32, TensorType

from .base import Pass, PassOutput
from .precision_policy import PrecisionPolicy
from .rewrite import Match, Rule, op, rewrite, value

GEMM_OPS = ("linear", "grouped_gemm")


@dataclass(frozen=True)
class Choice:
    weight: Weight
    act_format: str | None


# GEMMs the fusion passes make (graph/fused_ops.py); each names its GEMM weight `weight`.
FUSED_GEMM_OPS = ("quant_linear", "quant_grouped_gemm", "moe_expert_up", "moe_expert_down")


def gemm_weight(gemm: Op) -> str | None:
    """The weight operand of a core GEMM op; None for other ops."""
    return operand(gemm, "weight") if gemm.opname in GEMM_OPS else None


def any_gemm_weight(gemm: Op) -> str | None:
    """The weight operand of a GEMM op, core or fused; None for other ops."""
    return operand(gemm, "weight") if gemm.opname in GEMM_OPS + FUSED_GEMM_OPS else None


def act_quantization(op: Op) -> tuple[str, str] | None:
    """(input_scale, format) of an op that quantizes activations: `quantize`, or a fused op with
    an act_format; None for other ops."""
    if op.opname == "quantize":
        fmt = op.attrs.str("format")
    else:
        found = op.attrs.get("act_format")
        if not isinstance(found, str):
            return None
        fmt = found
    scale = operand(op, "input_scale")
    assert scale is not None, f"{op.opname} at {op.scope} quantizes to {fmt} without an input_scale"
    return scale, fmt


def _gemm_weights(graph: Graph) -> set[str]:
    """Weights read only as GEMM weights (a tied embedding table also feeds `embedding`: not quantized)."""
    gemm: set[str] = set()
    other: set[str] = set()
    for candidate in graph.ops:
        weight = gemm_weight(candidate)
        for name in candidate.operands:
            if name is not None:
                (gemm if name == weight else other).add(name)
    return gemm - other


def input_scale(builder: GraphBuilder, weight: str) -> str:
    """The activation scale of a GEMM weight: [] for a linear, [experts] for stacked experts; the
    checkpoint's when it has one, else a weight without source that calibration sets."""
    name = f"{weight}.input_scale"
    if builder.has(name):  # imported from the checkpoint (ModelOpt stores input_scale)
        return name
    return builder.weight(name, TensorType(F32, tuple(builder.type_of(weight).shape[:-2])), INPUT_SCALE_CATEGORY)


def quantize_activations_rule(act_format: str, act_formats: Mapping[str, str], dynamic: bool = False) -> Rule:
    """GEMM(x, w) with float x, where w's activations run in `act_format` ->
    GEMM(quantize(x, w.input_scale), w) {out_dtype = x's dtype}; with dynamic scales,
    GEMM(quantize_dynamic(x), w), and no input_scale."""

    def wanted(match: Match) -> bool:
        return act_formats.get(match.value("weight")) == act_format

    def quantize_input(match: Match, builder: GraphBuilder) -> None:
        gemm, x = match.root, match.value("x")
        offsets = operand(gemm, "offsets") if gemm.opname == "grouped_gemm" else None
        if dynamic:
            quantized = builder.op_named("quantize_dynamic", {"x": x, "offsets": offsets}, {"format": act_format},
                                         gemm.scope)[0]
        else:
            scale = input_scale(builder, match.value("weight"))
            quantized = builder.op_named("quantize", {"x": x, "input_scale": scale, "offsets": offsets},
                                         {"format": act_format}, gemm.scope)[0]
        operands = [quantized if name == x else name for name in gemm.operands]
        builder.op(gemm.opname, operands, {**dict(gemm.attrs.items), "out_dtype": builder.type_of(x).dtype.name},
                   gemm.scope, match.results)

    float_input = value("x", where=lambda producer, type_: not type_.dtype.quantized)
    return Rule(f"act_{act_format}", op(GEMM_OPS, x=float_input, weight=value("weight")), quantize_input, wanted)


@dataclass(frozen=True)
class AssignPrecision(Pass):
    name: ClassVar[str] = "assign_precision"
    policy: PrecisionPolicy = field(default_factory=lambda: PrecisionPolicy("bf16"))

    def _choose(self, weight: Weight, has_input_scale: bool, notes: list[str]) -> Choice:
        chosen: Precision | None = self.policy.precision_of(weight.category)
        if weight.type.dtype.quantized:  # stored quantized: deployed as exported, bit for bit
            stored = weight.type.dtype.name
            act = self.policy.act_format_for_stored(stored, has_input_scale)
            if chosen is None or chosen.weight_dtype != stored:
                notes.append(f"{weight.name}: kept as stored ({weight.type.dtype}); the policy asks for "
                             f"{chosen.label if chosen else self.policy.base}")
            if has_input_scale and act is None:
                notes.append(f"{weight.name}: the checkpoint's {weight.type.dtype} weights come with an input_scale "
                             f"({stored} activations), which this target cannot compute in: it runs weight-only, "
                             f"{stored} weights with {self.policy.base} activations")
            return Choice(weight, act)
        if chosen is None or self.policy.excluded(weight.name):
            return Choice(weight, None)
        columns = weight.type.shape[-1]
        reason = indivisible_input(chosen.weight_dtype, columns) if isinstance(columns, int) else None
        if reason:
            if self.policy.on_indivisible == "refuse":
                raise UsageError(f"{weight.name} has input dim {columns}, so it cannot be {chosen.label} ({reason}); "
                                 "exclude it or set on_indivisible = \"keep\"")
            notes.append(f"{weight.name}: kept in {weight.type.dtype} ({reason})")
            return Choice(weight, None)
        return Choice(replace(weight, type=weight.type.with_(dtype=DTYPES[chosen.weight_dtype])), chosen.act_format)

    def rules(self, act_formats: Mapping[str, str]) -> tuple[Rule, ...]:
        dynamic = self.policy.act_scales == "dynamic"
        return tuple(quantize_activations_rule(fmt, act_formats, dynamic) for fmt in ACT_FORMATS)

    def apply(self, graph: Graph) -> PassOutput:
        notes: list[str] = []
        gemm_weights = _gemm_weights(graph)
        names = {w.name for w in graph.weights}
        choices = {w.name: self._choose(w, f"{w.name}.input_scale" in names, notes) if w.name in gemm_weights
                   else Choice(w, None) for w in graph.weights}
        act_formats = {name: choice.act_format for name, choice in choices.items() if choice.act_format}
        retyped = replace(graph, weights=tuple(choices[w.name].weight for w in graph.weights))
        rewritten, counts = rewrite(retyped, self.rules(act_formats), self.name)
        for gemm in rewritten.ops:  # what the header retyping did, per GEMM kind and format
            weight = gemm_weight(gemm)
            dtype = choices[weight].weight.type.dtype if weight in choices else None
            if dtype is not None and dtype.quantized:
                key = f"{gemm.opname}_{dtype.name}"
                counts[key] = counts.get(key, 0) + 1
        return PassOutput(rewritten, counts, tuple(notes))


def exported_numerics(graph: Graph, imported: Graph) -> tuple[Graph, tuple[Weight, ...]] | None:
    """`graph` (an engine graph) with the numerics its checkpoint was exported with: every GEMM whose
    weight the checkpoint stores quantized with an input_scale quantizes its activations in that
    format, as on a target that computes in all of them. Returns the graph and the input_scale
    weights it had to take from `imported` (the graph as imported: they carry the checkpoint's
    sources), or None when `graph` already runs exactly that."""
    sources = {w.name: w for w in imported.weights}
    act_formats = {w.name: w.type.dtype.name for w in graph.weights
                   if w.type.dtype.quantized and w.name in sources and sources[w.name].type.dtype.quantized
                   and f"{w.name}.input_scale" in sources}
    present = {w.name for w in graph.weights}
    added = tuple(sources[f"{name}.input_scale"] for name in act_formats if f"{name}.input_scale" not in present)
    with_scales = replace(graph, weights=graph.weights + added)
    rules = (*(quantize_activations_rule(fmt, act_formats) for fmt in ACT_FORMATS),
             quantize_fused_experts_rule(act_formats))
    rewritten, counts = rewrite(with_scales, rules, "exported_numerics")
    return (rewritten, added) if any(counts.values()) else None


def quantize_fused_experts_rule(act_formats: Mapping[str, str]) -> Rule:
    """A fused expert GEMM (moe_expert_up / moe_expert_down) that reads float activations, where its
    weight's activations run in a format: it quantizes them on load with the weight's input_scale,
    its result keeping the dtype it had (what quantize_activations_rule does for core GEMMs)."""

    def wanted(match: Match) -> bool:
        return match.value("weight") in act_formats

    def quantize_on_load(match: Match, builder: GraphBuilder) -> None:
        expert, weight = match.root, match.value("weight")
        rows = expert.operands[0]
        assert rows is not None
        operands = dict(zip(opdef(expert.opname).operand_names, expert.operands, strict=False))
        operands["input_scale"] = input_scale(builder, weight)
        kept = {key: value for key, value in expert.attrs.items if key != KERNEL_ATTR}  # a kernel for the old formats
        attrs = {**kept, "act_format": act_formats[weight],
                 "out_dtype": builder.type_of(rows).dtype.name}
        builder.op_named(expert.opname, operands, attrs, expert.scope, match.results)

    pattern = op(("moe_expert_up", "moe_expert_down"), attrs={"act_format": None}, weight=value("weight"))
    return Rule("act_on_load", pattern, quantize_on_load, wanted)
