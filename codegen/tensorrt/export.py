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

from collections.abc import Mapping
from pathlib import Path

import onnx

from nemocompile.base.errors import IRError
from nemocompile.graph.ir import Graph, Op

from . import lower_attention, lower_core, lower_fused, lower_mamba, lower_moe, plugins
from .context import DECOMPOSED, MODES, TENSORRT, Lower, Lowering
from .onnx_graph import NARROW_FLOATS, OnnxBuilder, onnx_type
from .weights import WeightBytes

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
    for weight in graph.weights:
        name = weight.type.dtype.name
        if weight.type.dtype.quantized and name not in ("nvfp4", "fp8"):
            raise IRError(f"weight {weight.name} is stored as {name}, which has no ONNX form yet")


def export_graph(graph: Graph, weights: WeightBytes, mode: str, name: str = "") -> onnx.ModelProto:
    """The ONNX model of `graph` in `mode` (tensorrt or decomposed). `weights` holds the bytes of
    every stored weight tensor (graph/storage.py names) the graph reads."""
    if mode not in MODES:
        raise IRError(f"ONNX export mode {mode!r} is not one of {', '.join(MODES)}")
    check_exportable(graph)
    builder = OnnxBuilder(name or graph.name)
    low = Lowering(builder, graph, weights, mode)
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


DATA_ALIGNMENT = 4096  # each external tensor starts on a page, so it can be mapped in place
EXTERNAL_MIN_BYTES = 1024  # smaller initializers stay inside the model file


def write_models(directory: Path, models: Mapping[str, onnx.ModelProto], data_file: str) -> list[str]:
    """Write each model as `directory/<name>` with its initializers of EXTERNAL_MIN_BYTES or more in
    one shared file `directory/data_file` (a tensor the models share is stored once). Returns the
    file names written."""
    directory.mkdir(parents=True, exist_ok=True)
    placed: dict[str, tuple[int, int, bytes]] = {}
    with (directory / data_file).open("wb") as data:
        for model in models.values():
            for tensor in model.graph.initializer:
                raw = tensor.raw_data
                if len(raw) < EXTERNAL_MIN_BYTES:
                    continue
                known = placed.get(tensor.name)
                if known is None:
                    offset = -data.tell() % DATA_ALIGNMENT + data.tell()
                    data.seek(offset)
                    data.write(raw)
                    known = placed[tensor.name] = (offset, len(raw), raw)
                elif known[2] != raw:
                    raise IRError(f"initializer {tensor.name} differs between the exported models")
                tensor.ClearField("raw_data")
                tensor.data_location = onnx.TensorProto.EXTERNAL
                del tensor.external_data[:]
                for key, value in (("location", data_file), ("offset", str(known[0])), ("length", str(known[1]))):
                    entry = tensor.external_data.add()
                    entry.key, entry.value = key, value
    for name, model in models.items():
        (directory / name).write_bytes(model.SerializeToString())
    return [*models, data_file]


def check_model_file(path: Path) -> None:
    """ONNX's own checker with full_check (shape inference included) on a written model."""
    onnx.checker.check_model(str(path), full_check=True)


__all__ = ["DECOMPOSED", "TENSORRT", "check_exportable", "check_model_file", "export_graph", "write_models"]
