"""Standard-ONNX lowerings of the core ops that are not Mamba, attention or MoE: embedding, norms,
GEMMs, activation quantization, elementwise ops. Each computes in float32 as its reference does
and leaves the rounding to the result's dtype to `Lowering.bind`."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from nemocompile.base.errors import IRError
from nemocompile.base.formats import FORMATS
from nemocompile.graph.ir import Op
from nemocompile.graph.opdef import operand

from .context import TENSORRT, Lowering
from .onnx_graph import NARROW_FLOATS, TRT_DOMAIN, onnx_type

NVFP4_BLOCK = FORMATS["nvfp4"].block
E2M1_MAX = FORMATS["fp4e2m1"].max_value
E4M3_MAX = FORMATS["fp8e4m3"].max_value
E4M3_MIN_SUBNORMAL = 2.0**-9  # the smallest E4M3 subnormal: a block scale is never below it


def _x(low: Lowering, op: Op, name: str) -> str:
    found = operand(op, name)
    assert found is not None, f"{op.opname} without {name}"
    return found


def embedding(low: Lowering, op: Op) -> None:
    b = low.b
    ids, table = _x(low, op, "ids"), _x(low, op, "table")
    if low.is_weight(table) and not low.type_of(table).dtype.quantized:
        # gather the stored rows, then widen only those (not the whole table)
        rows = b.one("Gather", [low.weight_parts(table).data, low.value(ids)], axis=0)
        low.bind(op, [rows if low.type_of(table).dtype.name == "f32" else b.to_f32(rows)], rounded=False)
        return
    low.bind(op, [b.one("Gather", [low.value(table), low.value(ids)], axis=0)])


def rms_rows(low: Lowering, x32: str, eps: float) -> str:
    """x / sqrt(mean(x^2, last dim) + eps), float32."""
    b = low.b
    variance = b.one("ReduceMean", [b.one("Mul", [x32, x32]), b.ints([-1])], keepdims=1)
    inverse = b.one("Reciprocal", [b.one("Sqrt", [b.one("Add", [variance, b.scalar(eps)])])])
    return b.one("Mul", [x32, inverse])


def rms_norm_value(low: Lowering, x32: str, weight: str, eps: float) -> str:
    return low.b.one("Mul", [low.value(weight), rms_rows(low, x32, eps)])


def rms_norm(low: Lowering, op: Op) -> None:
    low.bind(op, [rms_norm_value(low, low.value(_x(low, op, "x")), _x(low, op, "weight"), op.attrs.float("eps"))])


def gated_rms_norm(low: Lowering, op: Op) -> None:
    b = low.b
    x, gate, weight = _x(low, op, "x"), _x(low, op, "gate"), _x(low, op, "weight")
    group = op.attrs.int("group_size")
    width = low.static(x, -1)
    gated = b.one("Mul", [low.value(x), silu(low, low.value(gate))])
    rank = len(low.dims(x))
    grouped = b.one("Reshape", [gated, b.ints([0] * (rank - 1) + [width // group, group])])
    normed = b.one("Reshape", [rms_rows(low, grouped, op.attrs.float("eps")), b.ints([0] * (rank - 1) + [width])])
    # the reference casts back to x's dtype before multiplying by the weight
    normed = b.round_to(normed, low.type_of(x).dtype)
    low.bind(op, [b.one("Mul", [low.value(weight), normed])])


def silu(low: Lowering, x32: str) -> str:
    return low.b.one("Mul", [x32, low.b.one("Sigmoid", [x32])])


def matmul_t(low: Lowering, x32: str, w32: str) -> str:
    """x @ w^T for w [out, in] (float32 values)."""
    return low.b.one("MatMul", [x32, low.b.one("Transpose", [w32], perm=[1, 0])])


def linear_value(low: Lowering, x32: str, weight: str, bias: str | None) -> str:
    """x @ weight^T + bias in float32 (a quantized weight dequantized first)."""
    out = matmul_t(low, x32, low.value(weight))
    return out if bias is None else low.b.one("Add", [out, low.value(bias)])


def _native_float_linear(low: Lowering, op: Op) -> str | None:
    """In the TensorRT export, a bf16/f16 GEMM runs in its own dtype (TensorRT accumulates in fp32):
    x cast to the weight's dtype times the stored weight, the result carried as float32 again."""
    x, weight, bias = _x(low, op, "x"), _x(low, op, "weight"), operand(op, "bias")
    dtype = low.type_of(weight).dtype
    if low.mode != TENSORRT or dtype.name not in NARROW_FLOATS or low.type_of(x).dtype != dtype:
        return None
    if not low.is_weight(weight) or (bias is not None and (not low.is_weight(bias) or low.type_of(bias).dtype != dtype)):
        return None
    b = low.b
    native = b.one("Cast", [low.value(x)], to=onnx_type(dtype))
    stored = low.weight_parts(weight).data
    out = b.one("MatMul", [native, b.one("Transpose", [stored], perm=[1, 0])])
    if bias is not None:
        out = b.one("Add", [out, low.weight_parts(bias).data])
    return b.to_f32(out)


def linear(low: Lowering, op: Op) -> None:
    native = _native_float_linear(low, op)
    if native is not None:
        low.bind(op, [native], rounded=False)
        return
    low.bind(op, [linear_value(low, low.value(_x(low, op, "x")), _x(low, op, "weight"), operand(op, "bias"))])


def add(low: Lowering, op: Op) -> None:
    low.bind(op, [low.b.one("Add", [low.value(_x(low, op, "a")), low.value(_x(low, op, "b"))])])


def cast(low: Lowering, op: Op) -> None:
    low.bind(op, [low.value(_x(low, op, "x"))])  # bind rounds to the result's dtype


def activation_value(low: Lowering, x32: str, kind: str) -> str:
    if kind == "relu2":
        relu = low.b.one("Relu", [x32])
        return low.b.one("Mul", [relu, relu])
    if kind == "silu":
        return silu(low, x32)
    raise IRError(f"activation {kind!r} has no ONNX form yet")


def activation(low: Lowering, op: Op) -> None:
    low.bind(op, [activation_value(low, low.value(_x(low, op, "x")), op.attrs.str("kind"))])


def split(low: Lowering, op: Op) -> None:
    sizes = list(op.attrs.ints("sizes"))
    low.bind(op, low.b.node("Split", [low.value(_x(low, op, "x")), low.b.ints(sizes)], len(sizes), axis=-1))


# ---------------------------------------------------------------- activation quantization


def expert_of_row(low: Lowering, offsets: str, rows_of: str) -> str:
    """For rows grouped by expert (expert e owns rows offsets[e]:offsets[e+1]), each row's expert:
    the number of offsets[1:] at or below the row index. int64 [rows]."""
    b = low.b
    count = b.one("Gather", [b.one("Shape", [rows_of]), b.i64(0)], axis=0)
    rows = b.one("Range", [b.i64(0), count, b.i64(1)])
    ends = b.one("Slice", [offsets, b.ints([1]), b.ints([np.iinfo(np.int64).max]), b.ints([0])])
    below = b.one("LessOrEqual", [b.one("Unsqueeze", [ends, b.ints([0])]), b.one("Unsqueeze", [rows, b.ints([1])])])
    return b.one("ReduceSum", [b.one("Cast", [below], to=TensorProto.INT64), b.ints([1])], keepdims=0)


def _fp8_quantize(low: Lowering, x32: str, scale: str, per_row: bool) -> str:
    b = low.b
    zero = b.const(np.zeros((), dtype=np.uint8))
    zero_point = b.one("Cast", [zero], to=TensorProto.FLOAT8E4M3FN)
    if not per_row:
        q = b.one("QuantizeLinear", [x32, scale, zero_point], saturate=1)
        return b.one("DequantizeLinear", [q, scale, zero_point])
    # one scale per row: x / scale rounded with a unit scale (the same division, then E4M3)
    column = b.one("Unsqueeze", [scale, b.ints([1])])
    unit = b.scalar(1.0)
    q = b.one("QuantizeLinear", [b.one("Div", [x32, column]), unit, zero_point], saturate=1)
    return b.one("Mul", [b.one("DequantizeLinear", [q, unit, zero_point]), column])


def fp8_codes_value(low: Lowering, x32: str, scale: str) -> str:
    """The E4M3 codes of x (float32) with the static per-tensor scale (an ONNX value), carried in
    float32: e4m3(clamp(x / scale)), which times the scale is `_fp8_quantize`'s value."""
    b = low.b
    zero_point = b.one("Cast", [b.const(np.zeros((), dtype=np.uint8))], to=TensorProto.FLOAT8E4M3FN)
    q = b.one("QuantizeLinear", [x32, scale, zero_point], saturate=1)
    return b.one("DequantizeLinear", [q, b.scalar(1.0), zero_point])


def nvfp4_block_scales(low: Lowering, x32: str, rank: int, width: int, global_scale: str) -> str:
    """E4M3 block scales of x [..., width] for blocks of 16 along the last dim: block_amax / (6 *
    global_scale), a zero block at 1.0, clamped to [2^-9, 448] (as runtime/formats/nvfp4.py).
    global_scale is a scalar or one per row [rows, 1, 1]. FLOAT8E4M3FN [..., width / 16]."""
    b = low.b
    blocks = b.one("Reshape", [x32, b.ints([0] * (rank - 1) + [width // NVFP4_BLOCK, NVFP4_BLOCK])])
    amax = b.one("ReduceMax", [b.one("Abs", [blocks]), b.ints([-1])], keepdims=0)
    scale = b.one("Div", [amax, b.one("Mul", [b.scalar(E2M1_MAX), global_scale])])
    zero = b.one("Equal", [scale, b.scalar(0.0)])
    scale = b.one("Where", [zero, b.scalar(1.0), scale])
    scale = b.one("Clip", [scale, b.scalar(E4M3_MIN_SUBNORMAL), b.scalar(E4M3_MAX)])
    return b.one("Cast", [scale], to=TensorProto.FLOAT8E4M3FN)


def _nvfp4_quantize(low: Lowering, x32: str, rank: int, width: int, global_scale: str, per_row: bool) -> str:
    b = low.b
    axis = rank - 1
    if low.mode == TENSORRT and not per_row:
        codes, block_scale = b.node("TRT_FP4DynamicQuantize", [x32, global_scale], 2, domain=TRT_DOMAIN,
                                    axis=-1, block_size=NVFP4_BLOCK, scale_type=TensorProto.FLOAT8E4M3FN)
        scales = b.one("DequantizeLinear", [block_scale, global_scale])
        return b.one("DequantizeLinear", [codes, scales], axis=axis, block_size=NVFP4_BLOCK)
    gs_blocks = b.one("Unsqueeze", [global_scale, b.ints([1])]) if per_row else global_scale
    block_scale = nvfp4_block_scales(low, x32, rank, width, gs_blocks)
    scales = b.one("DequantizeLinear", [block_scale, global_scale], axis=0 if per_row else None)
    codes = b.one("QuantizeLinear", [x32, scales], axis=axis, block_size=NVFP4_BLOCK,
                  output_dtype=TensorProto.FLOAT4E2M1, saturate=1)
    return b.one("DequantizeLinear", [codes, scales], axis=axis, block_size=NVFP4_BLOCK)


def quantize_value(low: Lowering, x32: str, rank: int, width: int, fmt: str, scale: str,
                   offsets32: str | None) -> str:
    """x [..., width] (float32) quantized to fmt with the static scale `scale` (an IR value) and
    back, as the `quantize` op means it; with offsets (an ONNX value), row r uses scale[its expert]."""
    global_scale = low.value(scale)
    if offsets32 is not None:
        global_scale = low.b.one("Gather", [global_scale, expert_of_row(low, offsets32, x32)], axis=0)
    if fmt == "fp8":
        return _fp8_quantize(low, x32, global_scale, offsets32 is not None)
    if fmt == "nvfp4":
        return _nvfp4_quantize(low, x32, rank, width, global_scale, offsets32 is not None)
    raise IRError(f"quantize to {fmt} has no ONNX form yet")


def quantize(low: Lowering, op: Op) -> None:
    x, offsets = _x(low, op, "x"), operand(op, "offsets")
    low.bind(op, [quantize_value(low, low.value(x), len(low.dims(x)), low.static(x, -1), op.attrs.str("format"),
                                 _x(low, op, "input_scale"), None if offsets is None else low.value(offsets))])
