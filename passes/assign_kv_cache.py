"""assign_kv_cache: the KV cache in the format the precision policy names (`kv_cache`).

A float cache (bf16, fp32) is set_precision's and this pass leaves it. With `kv_cache = fp8`
every attention layer's key and value caches hold FP8 E4M3 codes, and its `attention_gqa` reads
one fp32 scale per tensor, `{scope}.k_scale` and `{scope}.v_scale`. A ModelOpt checkpoint exported
with an FP8 KV cache brings them (graph/importer.py imports its `k_proj.k_scale`/`v_proj.v_scale`
as these weights, with their source, and the driver sets kv_cache = fp8 for it); otherwise they are
weights without a source, and calibration sets each to amax / 448 of the keys or values the float
model writes, as ModelOpt's FP8 KV export does. A new key is stored as E4M3(clamp(k / k_scale, -448, 448)) and every key
attention reads, the new ones included, is that code times k_scale (runtime/reference/attention.py).
Runs after assign_precision, so the float graph calibration runs keeps its float cache."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from nemocompile.base.errors import UsageError
from nemocompile.base.formats import FORMATS, PRECISIONS
from nemocompile.graph.builder import GraphBuilder
from nemocompile.graph.ir import Graph
from nemocompile.graph.nemotron_h import INPUT_SCALE_CATEGORY, kv_scale_name
from nemocompile.graph.opdef import operand
from nemocompile.graph.types import DTYPES, F32, TensorType

from .base import Pass, PassOutput
from .precision_policy import FP8_KV_CACHE


@dataclass(frozen=True)
class AssignKvCache(Pass):
    name: ClassVar[str] = "assign_kv_cache"
    kv_cache: str = "bf16"

    def __post_init__(self) -> None:
        if self.kv_cache not in PRECISIONS:
            raise UsageError(f"kv_cache must be a precision, got '{self.kv_cache}'")

    def apply(self, graph: Graph) -> PassOutput:
        if self.kv_cache != FP8_KV_CACHE:
            return PassOutput(graph, {"fp8_kv_layers": 0, "checkpoint_kv_scales": 0})
        code = DTYPES[FORMATS[PRECISIONS[FP8_KV_CACHE].weight_dtype].storage or ""]  # the raw E4M3 element
        builder = GraphBuilder(graph.name, dict(graph.metadata), self.name)
        for value in graph.inputs:
            builder.input(value.name, value.type)
        for weight in graph.weights:
            builder.add_weight(weight)
        for slot in graph.states:
            builder.state(slot.name, slot.kind, slot.type.with_(dtype=code) if slot.kind == "kv" else slot.type,
                          slot.update)
        for bound in graph.dims:
            builder.bound(bound.name, bound.low, bound.high)
        builder.number_after([r.name for op in graph.ops for r in op.results])
        layers = 0
        from_checkpoint = 0  # scales the checkpoint brings (a source), not calibrated
        weights = graph.weight_map()
        for op in graph.ops:
            if op.opname != "attention_gqa" or operand(op, "k_scale") is not None:
                builder.reemit(op)
                continue
            scales = []
            for which in ("k", "v"):
                name = kv_scale_name(op.scope, which)
                if not builder.has(name):  # a checkpoint may bring its own (ModelOpt's KV export)
                    builder.weight(name, TensorType(F32, ()), INPUT_SCALE_CATEGORY)
                elif weights[name].sources:
                    from_checkpoint += 1
                scales.append(name)
            builder.reemit(op, operands=[*op.operands[:6], *scales])
            layers += 1
        for name in graph.outputs:
            builder.output(name)
        notes = (f"FP8 KV cache: {from_checkpoint} of the {2 * layers} KV-cache scales (k_scale, v_scale) are the "
                 f"checkpoint's own (ModelOpt kv_cache_quant_algo FP8), not calibrated",) if from_checkpoint else ()
        return PassOutput(builder.build(), {"fp8_kv_layers": layers, "checkpoint_kv_scales": from_checkpoint}, notes)
