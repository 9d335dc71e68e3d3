"""The ONNX export of a compiled graph, for TensorRT. Two forms of the same graph:

- `tensorrt`: standard ONNX ops, NVFP4/FP8 weights as DequantizeLinear of FLOAT4E2M1/FLOAT8E4M3FN
  initializers, activation quantization as Q/DQ (NVFP4 through TensorRT's TRT_FP4DynamicQuantize),
  and the Mamba2 scan/state update, the routed experts and cached attention as plugin ops
  (plugins.py, docs/tensorrt.md);
- `decomposed`: every plugin written out in standard ops, which gives the graph a meaning anyone
  can run (onnxruntime, ONNX's reference evaluator).

State (KV cache, conv window, SSM state) is explicit: each slot is a model input of its IR name and
its new content an output named as the IR names the update (`layers.1.k` -> `layers.1.k.next`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import BinaryIO

import onnx

from nemocompile.base.errors import IRError
from nemocompile.graph.ir import Graph, Op

from . import lower_attention, lower_core, lower_fused, lower_mamba, lower_moe, plugins
from .context import DECOMPOSED, MODES, TENSORRT, Lower, Lowering
from .onnx_graph import NARROW_FLOATS, ExternalData, OnnxBuilder, onnx_type
from .weights import BytesSource, WeightSource

STANDARD: dict[str, Lower] = {
    "embedding": lower_core.embedding,
    "rms_norm": lower_core.rms_norm,
    "gated_rms_norm": lower_core.gated_rms_norm,
    "linear": lower_core.linear,
    "quantize": lower_core.quantize,
    "add": lower_core.add,
    "cast": lower_core.cast,
    "activation": lower_core.activation,
    "split": lower_core.split,
    "causal_conv1d": lower_mamba.causal_conv1d,
    "ssd_chunk_scan": lower_mamba.ssd_chunk_scan,
    "ssd_state_update": lower_mamba.ssd_state_update,
    "attention_gqa": lower_attention.attention_gqa,
    "moe_router": lower_moe.moe_router,
    "moe_dispatch": lower_moe.moe_dispatch,
    "grouped_gemm": lower_moe.grouped_gemm,
    "moe_combine": lower_moe.moe_combine,
    # the fused ops of the fusion passes (graph/fused_ops.py)
    "moe_route": lower_fused.moe_route,
    "moe_expert_up": lower_fused.moe_expert_up,
    "moe_expert_down": lower_fused.moe_expert_down,
    "quant_linear": lower_fused.quant_linear,
    "quant_grouped_gemm": lower_fused.quant_grouped_gemm,
    "add_rms_norm": lower_fused.add_rms_norm,
}
PLUGIN: dict[str, Lower] = {
    "ssd_chunk_scan": plugins.mamba2,
    "ssd_state_update": plugins.mamba2,
    "attention_gqa": plugins.attention,
}


def _lower_ops(low: Lowering) -> None:
    # each routed-expert block becomes one plugin node, placed where its combine was (every input
    # of the block is made by then)
    regions = ([plugins.moe_region(low, op) for op in low.graph.ops if op.opname in ("moe_router", "moe_route")]
               if low.mode == TENSORRT else [])
    at_combine = {id(region.last): region for region in regions}
    inside = {id(o) for region in regions for o in region.ops}
    for op in low.graph.ops:
        if id(op) in at_combine:
            plugins.moe(low, at_combine[id(op)])
            continue
        if id(op) in inside:
            continue
        lower = (PLUGIN.get(op.opname) if low.mode == TENSORRT else None) or STANDARD.get(op.opname)
        if lower is None:
            raise IRError(_no_form(op))
        lower(low, op)


def _no_form(op: Op) -> str:
    where = f" at {op.scope}" if op.scope else ""
    return f"op '{op.opname}'{where} has no ONNX form yet; the ONNX export supports {', '.join(sorted(STANDARD))}"


def check_exportable(graph: Graph) -> None:
    """Refuse, naming it, the first op or weight format the export has no form for (before any
    weight is read)."""
    for op in graph.ops:
        if op.opname not in STANDARD:
            raise IRError(_no_form(op))
    for slot in graph.states:
        if slot.kind == "kv" and slot.type.dtype.name not in ("bf16", "f32", "f16"):
            raise IRError(f"state {slot.name} is an {slot.type.dtype.name} KV cache (kv_cache = fp8), which has no "
                          f"ONNX form yet; build with a bf16 KV cache for --tensorrt")
    for weight in graph.weights:
        name = weight.type.dtype.name
        if weight.type.dtype.quantized and name not in ("nvfp4", "fp8"):
            raise IRError(f"weight {weight.name} is stored as {name}, which has no ONNX form yet")


def export_graph(graph: Graph, weights: WeightSource | Mapping[str, bytes], mode: str, name: str = "",
                 external: ExternalData | None = None) -> onnx.ModelProto:
    """The ONNX model of `graph` in `mode` (tensorrt or decomposed). `weights` gives every stored
    weight tensor (graph/storage.py names) the graph reads. With `external`, tensors of
    EXTERNAL_MIN_BYTES or more are not read: the model refers to their place in that data file
    (write it with `write_data`); without, every initializer is inline."""
    if mode not in MODES:
        raise IRError(f"ONNX export mode {mode!r} is not one of {', '.join(MODES)}")
    check_exportable(graph)
    source = BytesSource(weights) if isinstance(weights, Mapping) else weights
    builder = OnnxBuilder(name or graph.name, external=external)
    low = Lowering(builder, graph, source, mode)
    for value in graph.inputs:
        builder.graph_input(value.name, value.type)
        narrow = value.type.dtype.name in NARROW_FLOATS
        low.values[value.name] = builder.to_f32(value.name) if narrow else value.name
    for slot in graph.states:
        builder.graph_input(slot.name, slot.type)
        narrow = slot.type.dtype.name in NARROW_FLOATS
        low.values[slot.name] = builder.to_f32(slot.name) if narrow else slot.name
    _lower_ops(low)
    types = graph.value_types()
    outputs = [*graph.outputs, *(slot.update for slot in graph.states)]
    for output in outputs:
        type_ = types[output]
        builder.node("Cast", [low.values[output]], [output], to=onnx_type(type_.dtype))
        builder.graph_output(output, type_)
    return builder.model()


CopyInto = Callable[[str, BinaryIO], int]  # copy a stored tensor's bytes into a file; returns the count


def write_data(path: Path, external: ExternalData, copy_into: CopyInto) -> None:
    """Write the external data file of `external`'s layout, each tensor copied by `copy_into` (which
    streams it, so no tensor need be whole in memory)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as data:
        for name, (offset, length) in sorted(external.placed.items(), key=lambda item: item[1][0]):
            data.seek(offset)
            written = copy_into(name, data)
            if written != length:
                raise IRError(f"weight tensor {name} gave {written} bytes for the ONNX data file, its place holds {length}")
        data.truncate(external.end)


def write_models(directory: Path, models: Mapping[str, onnx.ModelProto]) -> list[str]:
    """Write each model as `directory/<name>`; returns the file names written."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, model in models.items():
        (directory / name).write_bytes(model.SerializeToString())
    return list(models)


def check_model_file(path: Path) -> None:
    """ONNX's own checker with full_check (shape inference included) on a written model."""
    onnx.checker.check_model(str(path), full_check=True)


__all__ = ["DECOMPOSED", "TENSORRT", "ExternalData", "check_exportable", "check_model_file", "export_graph", "write_data",
           "write_models"]
