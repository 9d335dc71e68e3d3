"""Exact number-format arithmetic for the GEMM templates, in fp32 so the compiled kernel and the
interpreter run the same code: E2M1 decode/encode, E4M3 rounding, the NVFP4 dynamic block scale.

Rounding uses the fp32 "magic number" trick rather than hardware conversions because the
interpreter's fp32 -> fp8e4nv cast is wrong near powers of two and for subnormals, and the PTX
E2M1 conversions exist only on sm_100a. Divisions that decide a rounding use div_rn (IEEE),
as the reference does; Triton's plain fp32 `/` may lower to an approximate division."""

import triton
import triton.language as tl

E2M1_MAX = tl.constexpr(6.0)
E4M3_MAX = tl.constexpr(448.0)
E4M3_MIN_SUBNORMAL = tl.constexpr(0.001953125)  # 2**-9
ROUND_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2**23: x + M - M rounds |x| < 2**22 to an integer, ties to even


@triton.jit
def round_half_even(x):
    return (x + ROUND_MAGIC) - ROUND_MAGIC


@triton.jit
def e2m1_value(code):
    """int32 code 0..15 (sign << 3 | magnitude index) -> its fp32 value; an exact select, no table."""
    index = (code & 7).to(tl.float32)
    magnitude = tl.where(index < 4.0, index * 0.5, tl.where(index < 6.0, index - 2.0, index * 2.0 - 8.0))
    return tl.where((code & 8) != 0, -magnitude, magnitude)


@triton.jit
def unpack_e2m1(packed):
    """uint8 [R, C] of two codes per byte (low nibble = even element) -> fp32 values [R, 2C]."""
    codes = packed.to(tl.int32)
    pairs = tl.join(e2m1_value(codes & 15), e2m1_value(codes >> 4))
    return tl.reshape(pairs, [packed.shape[0], 2 * packed.shape[1]])


@triton.jit
def e2m1_code(scaled):
    """fp32 values (already divided by their scale) -> int32 E2M1 codes, round to nearest even,
    saturating at 6; the sign bit is set for every value below zero (as ModelOpt does).
    The index of the nearest grid point is min(round(2m), round(m) + 2, round(m/2) + 4)."""
    magnitude = tl.minimum(tl.abs(scaled), E2M1_MAX)
    low = round_half_even(magnitude * 2.0)
    middle = round_half_even(magnitude) + 2.0
    high = round_half_even(magnitude * 0.5) + 4.0
    index = tl.minimum(tl.minimum(low, middle), high).to(tl.int32)
    return tl.where(scaled < 0.0, index + 8, index)


@triton.jit
def pack_e2m1(codes):
    """int32 codes [R, 2C] -> uint8 [R, C], the even element in the low nibble."""
    pairs = tl.reshape(codes, [codes.shape[0], codes.shape[1] // 2, 2])
    even, odd = tl.split(pairs)
    return (even | (odd << 4)).to(tl.uint8)


@triton.jit
def round_to_e4m3(value):
    """Non-negative finite fp32 -> the nearest E4M3 value (ties to even) as fp32, saturating at 448."""
    bits = value.to(tl.int32, bitcast=True)
    exponent = tl.maximum(((bits >> 23) & 255) - 127, -6)  # below 2**-6 the E4M3 step is 2**-9
    step = ((exponent - 3 + 127) << 23).to(tl.float32, bitcast=True)
    return tl.minimum(round_half_even(value / step) * step, E4M3_MAX)  # value / 2**n is exact


@triton.jit
def round_to_e4m3_signed(value):
    """fp32 -> nearest E4M3 value as fp32, clamped to +-448 first (the reference clamps, then casts)."""
    clamped = tl.minimum(tl.maximum(value, -E4M3_MAX), E4M3_MAX)
    magnitude = round_to_e4m3(tl.abs(clamped))
    return tl.where(clamped < 0.0, -magnitude, magnitude)


@triton.jit
def nvfp4_quantize_tile(x, global_scale):
    """x fp32 [R, K] (K % 16 == 0) quantized to NVFP4 with dynamic E4M3 block scales over 16
    elements and the static fp32 global scale -> (codes int32 [R, K], block scales fp32 [R, K/16]),
    as runtime/formats/nvfp4.fake_quantize_nvfp4 defines it."""
    rows: tl.constexpr = x.shape[0]
    cols: tl.constexpr = x.shape[1]
    blocks = tl.reshape(x, [rows, cols // 16, 16])
    amax = tl.max(tl.abs(blocks), axis=2)
    scale = tl.math.div_rn(amax, E2M1_MAX * global_scale)
    scale = tl.where(scale == 0.0, 1.0, scale)
    scale = round_to_e4m3(tl.minimum(tl.maximum(scale, E4M3_MIN_SUBNORMAL), E4M3_MAX))
    denominator = scale * global_scale
    scaled = tl.math.div_rn(blocks, tl.broadcast_to(denominator[:, :, None], [rows, cols // 16, 16]))
    return tl.reshape(e2m1_code(scaled), [rows, cols]), scale


@triton.jit
def expand_block_scales(scales, cols: tl.constexpr):
    """[R, cols/16] -> [R, cols], each scale repeated over its 16 elements."""
    rows: tl.constexpr = scales.shape[0]
    return tl.reshape(tl.broadcast_to(scales[:, :, None], [rows, cols // 16, 16]), [rows, cols])
