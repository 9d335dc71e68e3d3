"""assign_precision: give every GEMM weight the format its component's policy names (NVFP4, FP8,
or the float base) and mark which GEMMs quantize their activations (W4A4, W8A8). A GEMM that
quantizes activations gets an `input_scale` weight operand: taken from a ModelOpt checkpoint
when it has one, otherwise set by calibration at build time. Weights already quantized in the
checkpoint keep their format (never re-quantized). Runs after decompose, on core ops."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import ClassVar

from nemocompile.base.errors import UsageError
from nemocompile.graph.builder import GraphBuilder, rebuild_header, reemit
from nemocompile.graph.ir import Graph, Op, Weight
from nemocompile.graph.nemotron_h import INPUT_SCALE_CATEGORY
from nemocompile.graph.types import DTYPES, F32, TensorType

from .base import Pass, PassOutput
from .precision_policy import Precision, PrecisionPolicy

GEMM_OPS = {"linear": 1, "grouped_gemm": 2}  # op -> index of its weight operand


@dataclass(frozen=True)
class Choice:
    weight: Weight
    act_format: str | None


def _gemm_weights(graph: Graph) -> set[str]:
    """Weights read only by GEMMs (a tied embedding table also feeds `embedding`: not quantized)."""
    gemm: set[str] = set()
    other: set[str] = set()
    for op in graph.ops:
        for index, name in enumerate(op.operands):
            if name is None:
                continue
            (gemm if GEMM_OPS.get(op.opname) == index else other).add(name)
    return gemm - other


@dataclass(frozen=True)
class AssignPrecision(Pass):
    name: ClassVar[str] = "assign_precision"
    policy: PrecisionPolicy = field(default_factory=lambda: PrecisionPolicy("bf16"))

    def _choose(self, weight: Weight, notes: list[str]) -> Choice:
        chosen: Precision | None = self.policy.precision_of(weight.category)
        if weight.type.dtype.quantized:  # stored quantized: keep it, bit for bit
            act = self.policy.act_format_for_stored(weight.type.dtype.name, chosen)
            if chosen is None or chosen.weight_dtype != weight.type.dtype.name:
                notes.append(f"{weight.name}: kept as stored ({weight.type.dtype}); the policy asks for "
                             f"{chosen.label if chosen else self.policy.base}")
            return Choice(weight, act)
        if chosen is None or self.policy.excluded(weight.name):
            return Choice(weight, None)
        columns = weight.type.shape[-1]
        if chosen.weight_dtype == "nvfp4" and isinstance(columns, int) and columns % 16:
            if self.policy.on_indivisible == "refuse":
                raise UsageError(f"{weight.name} has input dim {columns}, not divisible by 16, so it cannot be "
                                 "NVFP4; exclude it or set on_indivisible = \"keep\"")
            notes.append(f"{weight.name}: kept in {weight.type.dtype} (input dim {columns} is not divisible by 16)")
            return Choice(weight, None)
        return Choice(replace(weight, type=weight.type.with_(dtype=DTYPES[chosen.weight_dtype])), chosen.act_format)

    def apply(self, graph: Graph) -> PassOutput:
        notes: list[str] = []
        gemm_weights = _gemm_weights(graph)
        choices = {w.name: self._choose(w, notes) if w.name in gemm_weights else Choice(w, None)
                   for w in graph.weights}
        builder = rebuild_header(graph, self.name, [choices[w.name].weight for w in graph.weights])
        counts: dict[str, int] = {}
        for op in graph.ops:
            index = GEMM_OPS.get(op.opname)
            weight_name = op.operands[index] if index is not None else None
            choice = choices.get(weight_name) if weight_name else None
            if choice is None or (not choice.weight.type.dtype.quantized):
                reemit(builder, op)
                continue
            dtype = choice.weight.type.dtype.name
            counts[f"{op.opname}_{dtype}"] = counts.get(f"{op.opname}_{dtype}", 0) + 1
            scale = None
            if choice.act_format is not None:
                scale = self._input_scale(builder, choice.weight)
                counts[f"act_{choice.act_format}"] = counts.get(f"act_{choice.act_format}", 0) + 1
            self._emit_gemm(builder, op, scale, choice.act_format)
        for name in graph.outputs:
            builder.output(name)
        return PassOutput(builder.build(), counts, tuple(notes))

    @staticmethod
    def _input_scale(builder: GraphBuilder, weight: Weight) -> str:
        """The activation scale of a GEMM: [] for a linear, [experts] for stacked experts; the
        checkpoint's when it has one, else a weight without source that calibration sets."""
        name = f"{weight.name}.input_scale"
        if builder.has(name):  # imported from the checkpoint (ModelOpt stores input_scale)
            return name
        return builder.weight(name, TensorType(F32, tuple(weight.type.shape[:-2])), INPUT_SCALE_CATEGORY)

    @staticmethod
    def _emit_gemm(builder: GraphBuilder, op: Op, scale: str | None, act_format: str | None) -> None:
        operands = list(op.operands)
        operands[-1] = scale
        attrs = {"act_format": act_format} if act_format else {}
        builder.op(op.opname, operands, attrs, op.scope, [r.name for r in op.results])
