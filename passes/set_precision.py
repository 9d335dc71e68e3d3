"""set_precision: one floating-point format for weights and activations (fp32 or bf16), as the
foundation's `--precision` asks. Routers keep fp32 weights (their logits decide expert choice),
SSM states stay fp32; every op's types are re-inferred. Per-op target policies (NVFP4, FP8)
build on this pass. Runs on the block graph, before decompose, so the casts that decompose
emits already name the final activation dtype."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

from nemocompile.base.errors import UsageError
from nemocompile.base.formats import BASE_PRECISIONS, PRECISIONS
from nemocompile.graph.builder import GraphBuilder, reemit
from nemocompile.graph.ir import Graph, StateSlot, Weight
from nemocompile.graph.nemotron_h import FP32_CATEGORIES, INPUT_SCALE_CATEGORY
from nemocompile.graph.types import DTYPES, DType

from .base import Pass, PassOutput
from .precision_policy import FLOAT_ONLY

SSM_STATE_DTYPES = {name: DTYPES[PRECISIONS[name].weight_dtype] for name in FLOAT_ONLY["ssm_state"]}
# Routers decide expert choice (graph/nemotron_h.py); activation scales are exact calibration constants.
KEEP_FP32_CATEGORIES = FP32_CATEGORIES | {INPUT_SCALE_CATEGORY}


def _weight_dtype(weight: Weight, dtype: DType) -> DType:
    if not weight.type.dtype.is_float or weight.type.dtype.quantized or weight.category in KEEP_FP32_CATEGORIES:
        return weight.type.dtype
    return dtype


def _state_dtype(slot: StateSlot, dtype: DType, ssm: DType) -> DType:
    return ssm if slot.kind == "ssm" else dtype


@dataclass(frozen=True)
class SetPrecision(Pass):
    name: ClassVar[str] = "set_precision"
    precision: str = "bf16"
    ssm_state: str = "fp32"  # fp16 halves the Mamba state between calls (it still computes in fp32)

    def __post_init__(self) -> None:
        if self.precision not in BASE_PRECISIONS:
            raise UsageError(f"--precision must be one of {', '.join(BASE_PRECISIONS)}, got '{self.precision}'")
        if self.ssm_state not in SSM_STATE_DTYPES:
            raise UsageError(f"ssm_state must be one of {', '.join(SSM_STATE_DTYPES)}, got '{self.ssm_state}'")

    def apply(self, graph: Graph) -> PassOutput:
        dtype = DTYPES[PRECISIONS[self.precision].weight_dtype]
        builder = GraphBuilder(graph.name, {**dict(graph.metadata), "precision": self.precision}, self.name)
        changed = 0
        for value in graph.inputs:
            builder.input(value.name, value.type)
        for weight in graph.weights:
            new_type = weight.type.with_(dtype=_weight_dtype(weight, dtype))
            changed += new_type is not weight.type
            builder.add_weight(replace(weight, type=new_type))
        for slot in graph.states:
            builder.state(slot.name, slot.kind,
                          slot.type.with_(dtype=_state_dtype(slot, dtype, SSM_STATE_DTYPES[self.ssm_state])),
                          slot.update)
        for bound in graph.dims:
            builder.bound(bound.name, bound.low, bound.high)
        for op in graph.ops:
            reemit(builder, op)
        for name in graph.outputs:
            builder.output(name)
        return PassOutput(builder.build(), {"weights_retyped": changed})
