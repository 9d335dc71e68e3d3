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
    """The ops of one routed-expert block, from its router to the op whose result is the block's
    (moe_combine, or moe_expert_down once the experts are fused), and what the plugin reads."""

    ops: tuple[Op, ...]
    router: Op
    last: Op
    x: str  # the experts' input (the router's, or the latent projection's output)
    up_weight: str
    down_weight: str
    up_scale: str | None  # the static activation scales, when the expert GEMMs quantize their input
    down_scale: str | None
    activation: str
    act_format: str | None
    num_experts: int


class _Walk:
    def __init__(self, low: Lowering, router: Op) -> None:
        self.graph = low.graph
        self.where = f"the MoE at {router.scope or 'top level'}"

    def refuse(self, why: str) -> IRError:
        return IRError(f"{self.where} has no FusedMoE form: {why}")

    def only_user(self, value: str, opname: str) -> Op:
        users = self.graph.users(value)
        if len(users) != 1 or users[0].opname != opname:
            raise self.refuse(f"%{value} should feed one {opname}, it feeds "
                              f"{', '.join(u.opname for u in users) or 'nothing'}")
        return users[0]

    def maybe_quantize(self, value: str) -> Op | None:
        users = self.graph.users(value)
        return users[0] if len(users) == 1 and users[0].opname == "quantize" else None

    def check_closed(self, ops: tuple[Op, ...], result: str) -> None:
        """Nothing outside the block reads a value made inside it, but its result."""
        inside = {r.name for o in ops for r in o.results} - {result}
        for o in self.graph.ops:
            leaked = [] if o in ops else [name for name in o.operands if name in inside]
            if leaked:
                raise self.refuse(f"%{leaked[0]} is read outside the experts (by {o.opname} at {o.scope})")


def _scale(op: Op | None) -> str | None:
    return None if op is None else operand(op, "input_scale")


def _format(op: Op | None) -> str | None:
    value = None if op is None else op.attrs.get("format", op.attrs.get("act_format"))
    return value if isinstance(value, str) else None


def moe_region(low: Lowering, router: Op) -> MoeRegion:
    """The routed-expert ops fed by `router` (moe_router, or moe_route once fused): refused, naming
    the scope, unless they are dispatch, (quantize,) grouped_gemm, activation, (quantize,)
    grouped_gemm, combine, or their fused form moe_expert_up, moe_expert_down."""
    walk = _Walk(low, router)
    if router.opname == "moe_route":
        return _fused_region(walk, router)
    weights_out, ids = (r.name for r in router.results)
    dispatch = walk.only_user(ids, "moe_dispatch")
    x_sorted = dispatch.results[0].name
    up_quantize = walk.maybe_quantize(x_sorted)
    up = walk.only_user(up_quantize.result.name if up_quantize else x_sorted, "grouped_gemm")
    activation = walk.only_user(up.result.name, "activation")
    down_quantize = walk.maybe_quantize(activation.result.name)
    down = walk.only_user(down_quantize.result.name if down_quantize else activation.result.name, "grouped_gemm")
    combine = walk.only_user(down.result.name, "moe_combine")
    if operand(combine, "weights") != weights_out or operand(combine, "order") != dispatch.results[2].name:
        raise walk.refuse("its combine does not read the router's weights and order")
    ops = tuple(o for o in (router, dispatch, up_quantize, up, activation, down_quantize, down, combine) if o)
    walk.check_closed(ops, combine.result.name)
    return MoeRegion(ops, router, combine, str(operand(dispatch, "x")), str(operand(up, "weight")),
                     str(operand(down, "weight")), _scale(up_quantize), _scale(down_quantize),
                     activation.attrs.str("kind"), _format(up_quantize), dispatch.attrs.int("num_experts"))


def _fused_region(walk: _Walk, route: Op) -> MoeRegion:
    weights_out, _, offsets, order = (r.name for r in route.results)
    ups = [u for u in walk.graph.users(order) if u.opname == "moe_expert_up"]
    if len(ups) != 1:
        raise walk.refuse(f"%{order} should feed one moe_expert_up")
    up = ups[0]
    down = walk.only_user(up.result.name, "moe_expert_down")
    if (operand(down, "weights"), operand(down, "order"), operand(down, "offsets")) != (weights_out, order, offsets):
        raise walk.refuse("its moe_expert_down does not read the router's weights, order and offsets")
    ops = (route, up, down)
    walk.check_closed(ops, down.result.name)
    return MoeRegion(ops, route, down, str(operand(up, "x")), str(operand(up, "weight")), str(operand(down, "weight")),
                     _scale(up), _scale(down), up.attrs.str("activation"), _format(up), route.attrs.int("num_experts"))


def moe(low: Lowering, region: MoeRegion) -> None:
    """The FusedMoE plugin node for one MoE region; binds the block's result."""
    def parts(weight: str) -> list[str]:
        found = low.weight_parts(weight)
        return [found.data, found.scale, found.scale_2]

    def input_scale(scale: str | None) -> str:
        return "" if scale is None else _ir_value(low, scale)

    router = region.router
    inputs = [_ir_value(low, operand(router, "x")), _ir_value(low, region.x),
              _ir_value(low, operand(router, "weight")), _ir_value(low, operand(router, "bias")),
              *parts(region.up_weight), input_scale(region.up_scale),
              *parts(region.down_weight), input_scale(region.down_scale)]
    attrs = {key: attr_value(router.attrs[key])
             for key in ("top_k", "n_group", "topk_group", "norm_topk_prob", "routed_scaling_factor")}
    attrs.update(num_experts=region.num_experts, activation=region.activation,
                 weight_format=low.weights[region.up_weight].type.dtype.name, act_format=region.act_format or "none")
    result = region.last.result
    (out,) = _emit(low, FUSED_MOE, inputs, [(result.name, result.type.dtype.name)], attrs)
    low.bind(region.last, [out], rounded=False)
