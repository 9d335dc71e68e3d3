"""The plugin ops of the TensorRT export: custom-domain nodes TensorRT resolves to plugins by
op_type (creator name), `plugin_version` and `plugin_namespace`. Their contracts (inputs, outputs,
attributes, dtypes, state) are in docs/tensorrt.md; each is the meaning of the IR ops it stands for.
Plugin inputs and outputs are in the IR's dtypes (bf16 stays bf16), quantized weights are passed as
their stored initializers (codes and scales)."""

from __future__ import annotations

from dataclasses import dataclass

from nemocompile.base.errors import IRError
from nemocompile.graph.ir import Op
from nemocompile.graph.opdef import operand

from .context import Lowering
from .onnx_graph import CUSTOM_DOMAIN, NARROW_FLOATS, PLUGIN_VERSION, attr_value, onnx_type

MAMBA2_CHUNK_SCAN = "Mamba2ChunkScan"
MAMBA2_STATE_UPDATE = "Mamba2StateUpdate"
CACHED_GQA = "CachedGQAttention"
FUSED_MOE = "FusedMoE"
PLUGIN_OPS = (MAMBA2_CHUNK_SCAN, MAMBA2_STATE_UPDATE, CACHED_GQA, FUSED_MOE)

# the ops the MoE plugin stands for, from the router to the combine
MOE_OPS = ("moe_router", "moe_dispatch", "grouped_gemm", "moe_combine", "quantize", "activation")


def _ir_value(low: Lowering, name: str | None) -> str:
    """An IR value as the plugin reads it: in its IR dtype; a weight as its stored initializer."""
    if name is None:
        return ""
    if low.is_weight(name):
        weight = low.weights[name]
        if weight.type.dtype.quantized:
            raise IRError(f"weight {name} is quantized; pass its parts")
        return low.weight_parts(name).data
    value = low.value(name)
    dtype = low.type_of(name).dtype
    return low.b.one("Cast", [value], to=onnx_type(dtype)) if dtype.name in NARROW_FLOATS else value


def _emit(low: Lowering, op_type: str, inputs: list[str], results: list[tuple[str, str]],
          attrs: dict[str, object]) -> list[str]:
    """The plugin node; returns its outputs as float32 holding values of their IR dtypes."""
    b = low.b
    outputs = b.node(op_type, inputs, len(results), domain=CUSTOM_DOMAIN, plugin_namespace=CUSTOM_DOMAIN,
                     plugin_version=PLUGIN_VERSION, **attrs)
    return [b.to_f32(out) if dtype in NARROW_FLOATS else out for out, (_, dtype) in zip(outputs, results, strict=True)]


def _attrs(op: Op) -> dict[str, object]:
    return {key: attr_value(value) for key, value in op.attrs.items if key != "kernel"}


def mamba2(low: Lowering, op: Op) -> None:
    names = ("x", "dt", "A_log", "B", "C", "D", "dt_bias", "ssm_state")
    op_type = MAMBA2_CHUNK_SCAN if op.opname == "ssd_chunk_scan" else MAMBA2_STATE_UPDATE
    results = [(r.name, r.type.dtype.name) for r in op.results]
    low.bind(op, _emit(low, op_type, [_ir_value(low, operand(op, n)) for n in names], results, _attrs(op)),
             rounded=False)


def attention(low: Lowering, op: Op) -> None:
    names = ("q", "k", "v", "k_cache", "v_cache", "cache_lens")
    results = [(r.name, r.type.dtype.name) for r in op.results]
    low.bind(op, _emit(low, CACHED_GQA, [_ir_value(low, operand(op, n)) for n in names], results, _attrs(op)),
             rounded=False)


@dataclass(frozen=True)
class MoeRegion:
    """The ops of one routed-expert block, from its router to its combine."""

    ops: tuple[Op, ...]
    router: Op
    dispatch: Op
    up: Op
    down: Op
    activation: Op
    combine: Op
    up_quantize: Op | None
    down_quantize: Op | None


def moe_region(low: Lowering, router: Op) -> MoeRegion:
    """The routed-expert ops fed by `router`: refused, naming the scope, unless they are exactly
    dispatch, (quantize,) grouped_gemm, activation, (quantize,) grouped_gemm, combine."""
    graph = low.graph
    where = f"the MoE at {router.scope or 'top level'}"

    def only_user(value: str, opname: str) -> Op:
        users = graph.users(value)
        if len(users) != 1 or users[0].opname != opname:
            raise IRError(f"{where} has no FusedMoE form: %{value} should feed one {opname}, "
                          f"it feeds {', '.join(u.opname for u in users) or 'nothing'}")
        return users[0]

    weights_out, ids = (r.name for r in router.results)
    dispatch = only_user(ids, "moe_dispatch")
    x_sorted = dispatch.results[0].name
    first = graph.users(x_sorted)
    up_quantize = first[0] if len(first) == 1 and first[0].opname == "quantize" else None
    up = only_user(up_quantize.result.name if up_quantize else x_sorted, "grouped_gemm")
    activation = only_user(up.result.name, "activation")
    second = graph.users(activation.result.name)
    down_quantize = second[0] if len(second) == 1 and second[0].opname == "quantize" else None
    down = only_user(down_quantize.result.name if down_quantize else activation.result.name, "grouped_gemm")
    combine = only_user(down.result.name, "moe_combine")
    if operand(combine, "weights") != weights_out or operand(combine, "order") != dispatch.results[2].name:
        raise IRError(f"{where} has no FusedMoE form: its combine does not read the router's weights and order")
    ops = tuple(o for o in (router, dispatch, up_quantize, up, activation, down_quantize, down, combine) if o)
    inside = {r.name for o in ops for r in o.results} - {combine.result.name}
    for o in graph.ops:
        if o in ops:
            continue
        leaked = [name for name in o.operands if name in inside]
        if leaked:
            raise IRError(f"{where} has no FusedMoE form: %{leaked[0]} is read outside the experts "
                          f"(by {o.opname} at {o.scope})")
    return MoeRegion(ops, router, dispatch, up, down, activation, combine, up_quantize, down_quantize)


def moe(low: Lowering, region: MoeRegion) -> None:
    """The FusedMoE plugin node for one MoE region; binds the combine's result."""
    def parts(gemm: Op) -> list[str]:
        weight = operand(gemm, "weight")
        assert weight is not None
        found = low.weight_parts(weight)
        return [found.data, found.scale, found.scale_2]

    def input_scale(quant: Op | None) -> str:
        return "" if quant is None else _ir_value(low, operand(quant, "input_scale"))

    router = region.router
    up_weight = low.weights[str(operand(region.up, "weight"))]
    inputs = [_ir_value(low, operand(router, "x")), _ir_value(low, operand(region.dispatch, "x")),
              _ir_value(low, operand(router, "weight")), _ir_value(low, operand(router, "bias")),
              *parts(region.up), input_scale(region.up_quantize),
              *parts(region.down), input_scale(region.down_quantize)]
    attrs = _attrs(router)
    attrs.update(num_experts=region.dispatch.attrs.int("num_experts"), activation=region.activation.attrs.str("kind"),
                 weight_format=up_weight.type.dtype.name,
                 act_format=region.up_quantize.attrs.str("format") if region.up_quantize else "none")
    result = region.combine.result
    (out,) = _emit(low, FUSED_MOE, inputs, [(result.name, result.type.dtype.name)], attrs)
    low.bind(region.combine, [out], rounded=False)
