"""Standard-ONNX lowerings of the fused ops the fusion passes make (graph/fused_ops.py): each is the
composition of the lowerings of the core ops it replaced, rounding where they round."""

from __future__ import annotations

from nemocompile.graph.ir import Op
from nemocompile.graph.opdef import operand
from nemocompile.graph.types import FP8_E4M3, NVFP4_CODES

from .context import Lowering
from .lower_core import activation_value, fp8_codes_value, linear_value, quantize_value, rms_norm_value
from .lower_moe import combine_value, expert_order, gather_rows, grouped_gemm_value, router_values


def _req(op: Op, name: str) -> str:
    found = operand(op, name)
    assert found is not None, f"{op.opname} without {name}"
    return found


def _act_format(op: Op) -> str | None:
    value = op.attrs.get("act_format")
    return value if isinstance(value, str) else None


def _quantized(low: Lowering, op: Op, x32: str, rank: int, width: int, offsets32: str | None) -> str:
    """x quantized to the op's act_format with its input_scale (unchanged without an act_format)."""
    fmt = _act_format(op)
    if fmt is None:
        return x32
    return quantize_value(low, x32, rank, width, fmt, _req(op, "input_scale"), offsets32)


def quant_linear(low: Lowering, op: Op) -> None:
    x = _req(op, "x")
    if low.type_of(x).dtype == FP8_E4M3:  # E4M3 codes a fused norm wrote: codes * input_scale
        q = low.b.one("Mul", [low.value(x), low.value(_req(op, "input_scale"))])
    elif low.type_of(x).dtype == NVFP4_CODES:  # NVFP4 codes a fused norm wrote, carried as their values
        q = low.value(x)
    else:
        q = _quantized(low, op, low.value(x), len(low.dims(x)), low.static(x, -1), None)
    low.bind(op, [linear_value(low, q, _req(op, "weight"), operand(op, "bias"))])


def quant_grouped_gemm(low: Lowering, op: Op) -> None:
    x, offsets = _req(op, "x"), low.value(_req(op, "offsets"))
    q = _quantized(low, op, low.value(x), 2, low.static(x, -1), offsets)
    low.bind(op, [grouped_gemm_value(low, q, offsets, _req(op, "weight"))])


def moe_route(low: Lowering, op: Op) -> None:
    weights, ids = router_values(low, op)
    offsets, order = expert_order(low, ids, op.attrs.int("num_experts"))
    low.bind(op, [weights, ids, offsets, order])


def moe_expert_up(low: Lowering, op: Op) -> None:
    x = _req(op, "x")
    order, offsets = low.value(_req(op, "order")), low.value(_req(op, "offsets"))
    width = low.static(x, -1)
    rows = gather_rows(low, low.value(x), width, order, op.attrs.int("top_k"))
    hidden = grouped_gemm_value(low, _quantized(low, op, rows, 2, width, offsets), offsets, _req(op, "weight"))
    hidden = low.b.round_to(hidden, op.result.type.dtype)  # the GEMM's result, before its epilogue
    low.bind(op, [activation_value(low, hidden, op.attrs.str("activation"))])


def moe_expert_down(low: Lowering, op: Op) -> None:
    hidden, weights = _req(op, "hidden"), _req(op, "weights")
    order, offsets = low.value(_req(op, "order")), low.value(_req(op, "offsets"))
    q = _quantized(low, op, low.value(hidden), 2, low.static(hidden, -1), offsets)
    y = low.b.round_to(grouped_gemm_value(low, q, offsets, _req(op, "weight")), op.result.type.dtype)
    width = op.result.type.shape[-1]
    assert isinstance(width, int)
    low.bind(op, [combine_value(low, y, order, low.value(weights), low.static(weights, -1), width)])


def add_rms_norm(low: Lowering, op: Op) -> None:
    b = low.b
    x, residual = _req(op, "x"), _req(op, "residual")
    dtype = low.type_of(residual).dtype
    residual_out = b.round_to(b.one("Add", [low.value(residual), low.value(x)]), dtype)
    normed = b.round_to(rms_norm_value(low, residual_out, _req(op, "weight"), op.attrs.float("eps")), dtype)
    if op.results[0].type.dtype == FP8_E4M3:  # the E4M3 codes (as float32 values), read by a quant_linear
        codes = fp8_codes_value(low, normed, low.value(_req(op, "input_scale")))
        low.bind(op, [codes, residual_out], rounded=False)
        return
    # NVFP4 codes (nvfp4codes) are carried as the values they mean under input_scale (the `quantize`
    # value: DequantizeLinear of the FLOAT4E2M1 codes with their block scales), which the quant_linear
    # after it reads as they are; ONNX has no value holding packed codes and block scales together.
    out = _quantized(low, op, normed, len(low.dims(residual)), low.static(residual, -1), None)
    low.bind(op, [out, residual_out])
