"""Fused op declarations: what the fusion passes (passes/fuse_*.py) make of chains of core ops.
Each fused op means exactly the composition of the core ops it replaces; its reference
implementation (runtime/reference/fused.py) is that composition of the core references, and the
kernels of codegen/ are tested against it. Shapes use the same symbolic dims as the core ops."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from nemocompile.base.errors import IRError

from .ir import Attrs, Graph, Op
from .opdef import define, dims_agree, require
from .ops import ACTIVATIONS, QUANTIZE_FORMATS, _infer_quantize, _matmul_result, _verify_router, _with_last
from .types import F32, FP8_E4M3, FP8_SCALED, I64, NVFP4, NVFP4_CODES, TensorType

Types = Sequence[TensorType | None]


def _act_format(attrs: Attrs) -> str | None:
    value = attrs.get("act_format")
    if value is not None and value not in QUANTIZE_FORMATS:
        raise IRError(f"act_format {value!r} is not one of {', '.join(QUANTIZE_FORMATS)}")
    return value if isinstance(value, str) else None


def _quantized_input(x: TensorType, scale: TensorType | None, offsets: TensorType | None,
                     attrs: Attrs, what: str) -> TensorType:
    """The type a GEMM sees for its input: x itself, or x quantized to act_format with `scale`
    (the `quantize` op's rules) when act_format is set."""
    fmt = _act_format(attrs)
    if fmt is None:
        if scale is not None:
            raise IRError(f"{what} has an input_scale but no act_format")
        return x
    if scale is None:
        raise IRError(f"{what} quantizes its input to {fmt} and needs an input_scale")
    return _infer_quantize([x, scale, offsets], Attrs.of({"format": fmt}))[0]


# ---------------------------------------------------------------- mixture of experts

_ROUTER_ATTRS = [("top_k", "int"), ("n_group", "int"), ("topk_group", "int"), ("norm_topk_prob", "bool"),
                 ("routed_scaling_factor", "float")]


def _infer_route(types: Types, attrs: Attrs) -> tuple[TensorType, ...]:
    x, weight = require(types, 0), require(types, 1)
    if not dims_agree(x.shape[-1], weight.shape[1]):
        raise IRError(f"moe_route input has last dim {x.shape[-1]}, expected {weight.shape[1]}")
    shape = (*x.shape[:-1], attrs.int("top_k"))
    experts = attrs.int("num_experts")
    return (TensorType(F32, shape), TensorType(I64, shape), TensorType(I64, (experts + 1,)),
            TensorType(I64, ("routed",)))


def _verify_route(types: Types, attrs: Attrs) -> str | None:
    experts = require(types, 1).shape[0]
    if isinstance(experts, int) and experts != attrs.int("num_experts"):
        return f"num_experts {attrs.int('num_experts')} differs from the router weight's {experts} rows"
    return _verify_router(types, attrs)


define("moe_route", "fused", ["x", "weight:weight", "bias?:bias"], ["weights", "ids", "offsets", "order"],
       [*_ROUTER_ATTRS, ("num_experts", "int")], infer=_infer_route, verify=_verify_route,
       doc="moe_router, then the expert offsets and the token-expert pair order of moe_dispatch (rows are not "
           "gathered: the expert up-GEMM reads them through order)")

_EXPERT_GEMM_ATTRS = [("top_k", "int"), ("act_format", "str?"), ("out_dtype", "dtype?")]


def _expert_gemm(x: TensorType, weight: TensorType, scale: TensorType | None, offsets: TensorType,
                 attrs: Attrs, what: str) -> TensorType:
    if weight.rank != 3:
        raise IRError(f"{what} weight must be [experts, out, in], got {weight}")
    if not dims_agree(x.shape[-1], weight.shape[2]):
        raise IRError(f"{what} input has last dim {x.shape[-1]}, expected {weight.shape[2]}")
    gemm_input = _quantized_input(x, scale, offsets, attrs, what)
    return _with_last(_matmul_result(gemm_input, weight, attrs, what), weight.shape[1])


def _infer_expert_up(types: Types, attrs: Attrs) -> tuple[TensorType, ...]:
    x, offsets, weight = require(types, 0), require(types, 2), require(types, 3)
    rows = x.with_(shape=("routed", x.shape[-1]))
    return (_expert_gemm(rows, weight, types[4], offsets, attrs, "moe_expert_up"),)


def _verify_activation(types: Types, attrs: Attrs) -> str | None:
    kind = attrs.str("activation")
    return None if kind in ACTIVATIONS else f"activation {kind!r} is not one of {ACTIVATIONS}"


define("moe_expert_up", "fused", ["x", "order:index", "offsets:index", "weight:weight", "input_scale?:scale"],
       ["hidden"], [*_EXPERT_GEMM_ATTRS, ("activation", "str")], infer=_infer_expert_up,
       verify=_verify_activation,
       doc="activation(grouped_gemm(Q(x[order // top_k]), offsets, weight)): the rows of each token-expert pair "
           "gathered on load, quantized to act_format with input_scale[expert] when set (as `quantize` with "
           "offsets), the activation as epilogue")


def _infer_expert_down(types: Types, attrs: Attrs) -> tuple[TensorType, ...]:
    hidden, offsets, weight, weights = require(types, 0), require(types, 2), require(types, 3), require(types, 4)
    y = _expert_gemm(hidden, weight, types[5], offsets, attrs, "moe_expert_down")
    if not dims_agree(weights.shape[-1], attrs.int("top_k")):
        raise IRError(f"moe_expert_down weights {weights} do not hold top_k = {attrs.int('top_k')} per token")
    return (TensorType(y.dtype, (*weights.shape[:-1], y.shape[-1])),)


define("moe_expert_down", "fused",
       ["hidden", "order:index", "offsets:index", "weight:weight", "weights", "input_scale?:scale"], ["out"],
       _EXPERT_GEMM_ATTRS, infer=_infer_expert_down,
       doc="moe_combine(grouped_gemm(Q(hidden), offsets, weight), order, weights): the routing-weight multiply "
           "and the per-token sum as epilogue (fp32 accumulation), Q as for moe_expert_up")

# ---------------------------------------------------------------- GEMMs that quantize their input on load


# The codes forms of a fused norm's quantized output -> the quantized format they mean with input_scale.
_CODES = {FP8_E4M3: (FP8_SCALED, "E4M3 codes"), NVFP4_CODES: (NVFP4, "NVFP4 codes")}


def _infer_quant_linear(types: Types, attrs: Attrs) -> tuple[TensorType, ...]:
    x, weight, scale, bias = require(types, 0), require(types, 1), require(types, 2), types[3]
    if weight.rank != 2:
        raise IRError(f"quant_linear weight must be 2-D, got {weight}")
    if not dims_agree(x.shape[-1], weight.shape[1]):
        raise IRError(f"quant_linear input has last dim {x.shape[-1]}, expected {weight.shape[1]}")
    if bias is not None and not dims_agree(bias.shape[0], weight.shape[0]):
        raise IRError(f"quant_linear bias {bias} does not match weight {weight}")
    if x.dtype in _CODES:
        # Codes a fused norm wrote (add_rms_norm with act_format fp8 or nvfp4): they mean values only
        # with input_scale (E4M3 codes * input_scale; E2M1 codes * block scales * input_scale).
        scaled, what = _CODES[x.dtype]
        if _act_format(attrs) != scaled.name or scale is None:
            raise IRError(f"quant_linear reads {what} {x} and needs act_format {scaled.name} with their input_scale")
        gemm_input = x.with_(dtype=scaled)
    else:
        gemm_input = _quantized_input(x, scale, None, attrs, "quant_linear")
    return (_with_last(_matmul_result(gemm_input, weight, attrs, "quant_linear"), weight.shape[0]),)


define("quant_linear", "fused", ["x", "weight:weight", "input_scale:scale", "bias?:bias"], ["out"],
       [("act_format", "str"), ("out_dtype", "dtype")], infer=_infer_quant_linear,
       doc="linear(quantize(x, input_scale), weight, bias): the activations quantized to act_format on load "
           "(W4A4, W8A8), result in out_dtype. Codes a fused norm wrote are read as they are: fp8e4m3 x "
           "(act_format fp8) as linear(x * input_scale, weight, bias), nvfp4codes x (act_format nvfp4) as "
           "linear(e2m1(x) * block_scale(x) * input_scale, weight, bias)")


def _infer_quant_grouped_gemm(types: Types, attrs: Attrs) -> tuple[TensorType, ...]:
    x, offsets, weight, scale = require(types, 0), require(types, 1), require(types, 2), require(types, 3)
    return (_expert_gemm(x, weight, scale, offsets, attrs, "quant_grouped_gemm"),)


define("quant_grouped_gemm", "fused", ["x", "offsets:index", "weight:weight", "input_scale:scale"], ["out"],
       [("act_format", "str"), ("out_dtype", "dtype")], infer=_infer_quant_grouped_gemm,
       doc="grouped_gemm(quantize(x, input_scale, offsets), offsets, weight): rows of expert e quantized with "
           "input_scale[e] on load")

# ---------------------------------------------------------------- norms


def _infer_add_rms_norm(types: Types, attrs: Attrs) -> tuple[TensorType, ...]:
    x, residual, weight, scale = require(types, 0), require(types, 1), require(types, 2), types[3]
    if x.rank != residual.rank or not all(dims_agree(a, b) for a, b in zip(x.shape, residual.shape, strict=True)):
        raise IRError(f"add_rms_norm of mismatched shapes {x} and {residual}")
    if x.dtype != residual.dtype:
        raise IRError(f"add_rms_norm adds {x.dtype} to a {residual.dtype} residual")
    if not dims_agree(residual.shape[-1], weight.shape[0]):
        raise IRError(f"add_rms_norm input has last dim {residual.shape[-1]}, expected {weight.shape[0]}")
    out = _quantized_input(residual, scale, None, attrs, "add_rms_norm")
    # The codes themselves (the GEMM after it, a quant_linear, takes input_scale too): E4M3 codes for
    # fp8, packed E2M1 codes with their E4M3 block scales for nvfp4.
    codes = {scaled: code for code, (scaled, _) in _CODES.items()}
    return (out.with_(dtype=codes.get(out.dtype, out.dtype)), residual)


define("add_rms_norm", "fused", ["x", "residual", "weight:weight", "input_scale?:scale"], ["out", "residual_out"],
       [("eps", "float"), ("act_format", "str?")], infer=_infer_add_rms_norm,
       doc="residual_out = residual + x; out = rms_norm(residual_out), quantized to act_format with input_scale "
           "when set (as `quantize`), as codes: for fp8 the E4M3 codes (out * input_scale is the `quantize` "
           "result), for nvfp4 the packed E2M1 codes and E4M3 block scales (nvfp4codes; times input_scale they "
           "are the `quantize` result)")

# ---------------------------------------------------------------- what a graph holds, per fusion rule

# Each fusion rule of passes/fuse_*.py and how to recognise one of its rewrites in a graph.
def _reads_norm_codes(op: Op, graph: Graph) -> bool:
    """A quant_linear reading the codes a fused norm wrote (made by add_rms_norm_quantize, not by the
    quant_linear rule)."""
    producer = graph.producer(op.operands[0]) if op.operands and op.operands[0] is not None else None
    return producer is not None and producer.opname == "add_rms_norm" and producer.attrs.get("act_format") is not None


FUSIONS: dict[str, Callable[[Op, Graph], bool]] = {
    "fuse_experts": lambda op, _: op.opname == "moe_expert_down",  # one up/down pair per MoE layer
    "fuse_router": lambda op, _: op.opname == "moe_route",
    "add_rms_norm": lambda op, _: op.opname == "add_rms_norm",
    "add_rms_norm_quantize": lambda op, _: op.opname == "add_rms_norm" and op.attrs.get("act_format") is not None,
    "quant_linear": lambda op, graph: op.opname == "quant_linear" and not _reads_norm_codes(op, graph),
    "quant_grouped_gemm": lambda op, _: op.opname == "quant_grouped_gemm",
    "conv1d_silu": lambda op, _: op.opname == "causal_conv1d" and op.attrs.get("activation") == "silu",
}


def fusions_in(graph: Graph) -> dict[str, int]:
    """Fusion rule -> how many of its rewrites `graph` holds (inspect reads an engine's this way).
    add_rms_norm counts every fused norm, add_rms_norm_quantize those that also quantize."""
    return {name: sum(1 for op in graph.ops if found(op, graph)) for name, found in FUSIONS.items()}
