"""RMSNorm templates: the residual add fused with the norm and, optionally, with quantize-on-output
(FP8 with a static per-tensor scale, or NVFP4 with dynamic E4M3 block-16 scales under a static
global scale), and the gated, grouped RMSNorm of the Mamba2 output.

Meaning (runtime/reference): add_rms_norm = (rms_norm(x + residual), x + residual), the first then
quantized as the `quantize` op does (runtime/quantized_ops.quantize); gated_rms_norm =
norms.gated_rms_norm. One program normalises one row (one group of a row for the gated norm)
held whole in registers. The quantization rounds in fp32 arithmetic (quant_math) in both modes.
"""

import triton
import triton.language as tl

from .numerics import cast_rne, rounded
from .quant_math import nvfp4_quantize_tile, pack_e2m1, round_to_e4m3_signed


@triton.jit
def add_rms_norm(
    x_ptr, residual_ptr, weight_ptr, out_ptr, residual_out_ptr, input_scale_ptr, block_scale_ptr, eps,
    WIDTH: tl.constexpr, HAS_RESIDUAL: tl.constexpr, ACT_FORMAT: tl.constexpr, BLOCK_D: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """x, residual [rows, WIDTH]; out [rows, WIDTH] (stream dtype or float8e4nv), or for "nvfp4"
    packed codes uint8 [rows, WIDTH/2] and block scales float8e4nv [rows, WIDTH/16]."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    inside = cols < WIDTH
    stream: tl.constexpr = residual_out_ptr.dtype.element_ty
    x = tl.load(x_ptr + row * WIDTH + cols, mask=inside, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        x += tl.load(residual_ptr + row * WIDTH + cols, mask=inside, other=0.0).to(tl.float32)
        # The sum is rounded to the residual stream's dtype before the norm reads it, as in the model.
        x = rounded(x, stream, INTERPRET)
        tl.store(residual_out_ptr + row * WIDTH + cols, x.to(stream), mask=inside)
    variance = tl.sum(x * x, axis=0) / WIDTH
    weight = tl.load(weight_ptr + cols, mask=inside, other=0.0).to(tl.float32)
    y = weight * (x * tl.rsqrt(variance + eps))
    if ACT_FORMAT == "fp8":
        # The norm's output in the stream dtype, then e4m3(clamp(y / input_scale)).
        y = rounded(y, stream, INTERPRET)
        quantized = round_to_e4m3_signed(tl.math.div_rn(y, tl.load(input_scale_ptr)))
        tl.store(out_ptr + row * WIDTH + cols, quantized.to(tl.float8e4nv), mask=inside)
    elif ACT_FORMAT == "nvfp4":
        y = rounded(y, stream, INTERPRET)
        codes, block_scale = nvfp4_quantize_tile(tl.reshape(y, (1, BLOCK_D)), tl.load(input_scale_ptr))
        block_ids = tl.arange(0, BLOCK_D // 16)
        tl.store(block_scale_ptr + row * (WIDTH // 16) + block_ids,
                 tl.reshape(block_scale, (BLOCK_D // 16,)).to(tl.float8e4nv), mask=block_ids < WIDTH // 16)
        pair_ids = tl.arange(0, BLOCK_D // 2)
        tl.store(out_ptr + row * (WIDTH // 2) + pair_ids, tl.reshape(pack_e2m1(codes), (BLOCK_D // 2,)),
                 mask=pair_ids < WIDTH // 2)
    else:
        tl.store(out_ptr + row * WIDTH + cols, cast_rne(y, out_ptr.dtype.element_ty, INTERPRET), mask=inside)


@triton.jit
def gated_rms_norm(
    x_ptr, gate_ptr, weight_ptr, out_ptr, eps,
    WIDTH: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_GATE: tl.constexpr, BLOCK_G: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """x, gate [rows, WIDTH]; grid (rows, WIDTH / GROUP_SIZE)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * GROUP_SIZE + tl.arange(0, BLOCK_G)
    inside = tl.arange(0, BLOCK_G) < GROUP_SIZE
    x = tl.load(x_ptr + row * WIDTH + cols, mask=inside, other=0.0).to(tl.float32)
    if HAS_GATE:
        gate = tl.load(gate_ptr + row * WIDTH + cols, mask=inside, other=0.0).to(tl.float32)
        x = x * (gate * tl.sigmoid(gate))
    variance = tl.sum(x * x, axis=0) / GROUP_SIZE
    # Cast back to the input dtype before the weight multiplies, as the reference does.
    normed = rounded(x * tl.rsqrt(variance + eps), x_ptr.dtype.element_ty, INTERPRET)
    weight = tl.load(weight_ptr + cols, mask=inside, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * WIDTH + cols, cast_rne(weight * normed, out_ptr.dtype.element_ty, INTERPRET),
             mask=inside)
