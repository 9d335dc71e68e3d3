"""NVFP4 as NVIDIA ModelOpt defines it: E2M1 codes, an E4M3 scale per 16 inputs, an FP32 global scale.

A weight [..., out, in] is cut into blocks of 16 along ``in``. With ``global_scale = amax / (6*448)``
(ModelOpt's ``weight_scale_2``) each block gets ``block_scale = e4m3(block_amax / (6 * global_scale))``
(round to nearest even, clamped to [2**-9, 448]) and each value ``x`` the E2M1 code nearest to
``x / (float(block_scale) * global_scale)`` (ties to even, saturating at 6). Codes are
``sign << 3 | magnitude index``; two share a byte, the even element in the low nibble.

Bit for bit with ModelOpt 0.47 ``NVFP4QTensor.quantize`` / ``dequantize``
(``modelopt.torch.quantization.qtensor.nvfp4_tensor``), including its edge cases:

- the per-block scale is computed in fp32 as ``block_amax / (6.0 * global_scale)`` (the product
  first), the values as ``x / (float(block_scale) * global_scale)`` (a true division by the fp32
  product, not a multiply by a reciprocal);
- an all-zero block gets block scale 1.0 and codes 0;
- a block whose scale would underflow E4M3 is clamped to its smallest subnormal 2**-9, never 0;
- a negative value that rounds to zero keeps its sign bit (code 8), while -0.0 gets code 0;
- an all-zero tensor (amax 0), where ModelOpt divides 0 by 0 and writes NaN scales, instead
  gets the amax it substitutes on export for a zero amax, the format maximum 6: global scale
  6 / 2688, block scales 1.0, codes 0, so it dequantizes to exact zeros;
- a non-zero amax whose global scale would be a denormal float32 (amax below 2688 * 2**-126,
  a weight of denormals only) is refused, the same rule as FP8's (``fp8.check_normal_scale``).

``four_over_six=True`` is ModelOpt's "Four Over Six" weight recipe (``NVFP4_FOUR_OVER_SIX_CFG``):
the FP8 normalisation maximum is 256 (``global_scale = amax / (6*256)``), and each block keeps
either its amax (largest value scaled to 6) or 1.5x its amax (largest value scaled to 4),
whichever gives the smaller squared error, ties going to 6. The choice reproduces ModelOpt's
MSE calibration (candidates 1.0 and 1.5, its calibration fake-quant with the E4M3 scale rounded
through ``448 / (1.75 * amax / 6)``), the bytes its static-quantizer export
(``block_scale = e4m3(amax_sel / 6 * 256 / (amax / 6))``; zero blocks get 448).

Every function is vectorized torch, processing the blocks in cache-sized chunks.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from nemocompile.base.formats import FORMATS
from nemocompile.runtime.formats.fp8 import (
    E4M3_MAX,
    check_float_dtype,
    check_normal_scale,
    describe_values,
    e4m3_to_float32,
)

BLOCK_SIZE = FORMATS["nvfp4"].block  # 16
E2M1_MAX = FORMATS["fp4e2m1"].max_value  # 6
E4M3_MIN_SUBNORMAL = 2.0**-9
FOUR_OVER_SIX_FP8_MAX = 256.0
FOUR_OVER_SIX_AMAX_MULTIPLIER = 1.5  # amax * 1.5 / 6 == amax / 4: the block's largest value maps to 4

E2M1_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
_E2M1_SIGNED_VALUES = torch.cat([E2M1_VALUES, -E2M1_VALUES])
_E2M1_SIGNED_VALUES[8] = 0.0  # code 8 (sign bit, magnitude 0) reads back +0.0, as in ModelOpt

# Blocks per chunk: 128K values keep a chunk's temporaries (512 KiB each) in cache, and are
# enough that the per-op overhead of ~16 small torch ops per chunk stays a few percent.
_CHUNK_BLOCKS = 65536  # 1M values per step: few, large torch ops (small ones stall on a busy machine)
# Blocks per step of the weight quantizer (quantize_nvfp4): 256K values. Its temporaries are
# allocated once per weight and reused (1 MiB each, about 5 MiB in all, within the L3 cache), and a
# step's ~30 torch ops cost a few microseconds each whatever their size: on one thread of a busy
# 2-core machine, 8K-block steps took 10% more CPU time, 2K-block steps 70% more.
_ENCODE_BLOCKS = 16384


@dataclass(frozen=True, eq=False)
class NVFP4Tensor:
    """An NVFP4 weight in ModelOpt's exported layout.

    packed: uint8 [..., out, in/2] (``weight``), two E2M1 codes per byte, even element low.
    block_scale: float8_e4m3fn [..., out, in/16] (``weight_scale``).
    global_scale: float32 [] (``weight_scale_2``), or one per leading slice [...] for stacked experts.
    """

    packed: torch.Tensor
    block_scale: torch.Tensor
    global_scale: torch.Tensor

    def __post_init__(self) -> None:
        if self.packed.dtype != torch.uint8 or self.packed.ndim == 0:
            kind = f"{self.packed.dtype} [{', '.join(map(str, self.packed.shape))}]"
            raise ValueError(f"NVFP4Tensor packed must be uint8 with at least one dim, not {kind}.")
        if self.block_scale.dtype != torch.float8_e4m3fn:
            raise ValueError(f"NVFP4Tensor block_scale must be float8_e4m3fn, not {self.block_scale.dtype}.")
        if self.global_scale.dtype != torch.float32:
            raise ValueError(f"NVFP4Tensor global_scale must be float32, not {self.global_scale.dtype}.")
        packed, scales = list(self.packed.shape), list(self.block_scale.shape)
        if packed[:-1] != scales[:-1] or packed[-1] * 2 != scales[-1] * BLOCK_SIZE:
            raise ValueError(
                f"NVFP4Tensor block_scale {scales} does not match packed {packed}: expected "
                f"{[*packed[:-1], packed[-1] * 2 // BLOCK_SIZE]}."
            )
        if list(self.global_scale.shape) not in ([], packed[:-2]):
            raise ValueError(
                f"NVFP4Tensor global_scale must have shape [] or {packed[:-2]}, not {list(self.global_scale.shape)}."
            )

    @property
    def shape(self) -> tuple[int, ...]:
        """The logical shape [..., out, in]."""
        return (*self.packed.shape[:-1], self.packed.shape[-1] * 2)


def nvfp4_global_scale(amax: torch.Tensor, *, four_over_six: bool = False) -> torch.Tensor:
    """``amax / (6 * 448)`` in float32 (``/ (6 * 256)`` with four_over_six), any shape.

    A zero amax becomes 6, as ModelOpt's export does for a zero amax, so the scale is never zero.
    Raises ValueError for a negative, NaN or infinite amax, or a non-zero one so small the scale
    would be a denormal float32 (the zero and denormal rule shared with FP8).
    """
    amax = _sanitized_amax(amax)
    scale = amax / (E2M1_MAX * (FOUR_OVER_SIX_FP8_MAX if four_over_six else E4M3_MAX))
    check_normal_scale(scale, amax, "NVFP4")
    return scale


def quantize_nvfp4(
    weight: torch.Tensor, global_scale: torch.Tensor | None = None, *, four_over_six: bool = False
) -> NVFP4Tensor:
    """Quantize weight [..., in] (float32/bfloat16/float16, in % 16 == 0) to NVFP4.

    The global scale comes from the whole tensor's amax unless given: [] or one per leading
    slice, shape weight.shape[:-2]; it must be positive and finite. four_over_six picks each
    block's scale by squared error (see the module doc) and derives its own global scale.
    Raises ValueError for NaN/Inf values, an input dim not divisible by 16, or a bad global scale.
    """
    blocks = _blocks_of(weight)
    block_amax = _block_amax_of_weight(blocks)
    _check_finite(block_amax, weight)
    leading = list(weight.shape[:-2])
    if global_scale is None:
        amax = block_amax.amax() if block_amax.numel() else block_amax.new_zeros(())
        return _quantize(weight, blocks, block_amax, amax, None, four_over_six=four_over_six)
    if four_over_six:
        raise ValueError("quantize_nvfp4 with four_over_six derives its own global scale; do not pass one.")
    global_scale = global_scale.to(torch.float32)
    if list(global_scale.shape) not in ([], leading):
        raise ValueError(
            f"an NVFP4 global scale for a weight {list(weight.shape)} must have shape [] or {leading}, "
            f"not {list(global_scale.shape)}."
        )
    if not bool(torch.isfinite(global_scale).all()) or bool((global_scale <= 0).any()):
        raise ValueError(
            f"an NVFP4 global scale must be positive and finite; got {describe_values(global_scale)}."
        )
    return _quantize(weight, blocks, block_amax, None, global_scale, four_over_six=False)


def quantize_nvfp4_measured(
    weight: torch.Tensor, *, four_over_six: bool = False, amax: torch.Tensor | None = None
) -> tuple[NVFP4Tensor, list[tuple[float, float]]]:
    """``quantize_nvfp4(weight, four_over_six=...)`` (the same bytes) and its error measured on the
    way: (sum x^2, sum (x - dequantize_nvfp4(q))^2) in float32 over each step of blocks, in order.
    The streaming build quantizes each weight with this, so the error costs no second pass.

    `amax`: the largest magnitude of a whole tensor of which `weight` is a run of rows (0-d): the
    run then gets exactly the bytes of its rows in the whole tensor's quantization, so a large
    tensor can be quantized a run at a time."""
    blocks = _blocks_of(weight)
    block_amax = _block_amax_of_weight(blocks)
    _check_finite(block_amax, weight)
    if amax is None:
        amax = block_amax.amax() if block_amax.numel() else block_amax.new_zeros(())
    errors: list[tuple[float, float]] = []
    return _quantize(weight, blocks, block_amax, amax, None, four_over_six=four_over_six, errors=errors), errors


def quantize_nvfp4_stacked(weight: torch.Tensor, *, four_over_six: bool = False) -> NVFP4Tensor:
    """Quantize a stack of experts weight [E, out, in], each slice with its own global scale.

    Returns global_scale [E]; equal, slice for slice, to ``quantize_nvfp4(weight[e])``.
    """
    if weight.ndim != 3:
        shape = list(weight.shape)
        raise ValueError(f"quantize_nvfp4_stacked takes a weight [E, out, in], not shape {shape}.")
    blocks = _blocks_of(weight)
    block_amax = _block_amax_of_weight(blocks)
    _check_finite(block_amax, weight)
    per_slice = block_amax.view(weight.shape[0], -1)
    amax = per_slice.amax(dim=1) if per_slice.shape[1] else per_slice.new_zeros(weight.shape[0])
    return _quantize(weight, blocks, block_amax, amax, None, four_over_six=four_over_six)


def dequantize_nvfp4(t: NVFP4Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``E2M1 value * (float(block_scale) * global_scale)`` in float32, cast to dtype; shape t.shape."""
    packed = t.packed.reshape(-1, BLOCK_SIZE // 2)
    denominators = _block_denominators(t.block_scale, t.global_scale)
    signed_values = _E2M1_SIGNED_VALUES.to(packed.device)
    out = torch.empty(packed.shape[0], BLOCK_SIZE, dtype=dtype, device=packed.device)
    for chunk in _chunks(packed.shape[0]):
        codes = _unpack(packed[chunk])
        values = signed_values.index_select(0, codes.view(-1).to(torch.int32)).view(codes.shape)
        out[chunk] = values.mul_(denominators[chunk, None])
    return out.view(t.shape)


def fake_quantize_nvfp4(x: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """Round activations x [..., in] through NVFP4 and back, in x.dtype.

    Block scales are dynamic (from each block of 16 along the last dim); the global scale is
    static (the calibrated ``input_scale``): [] or any shape broadcasting to x.shape[:-1] + (1,),
    e.g. [rows, 1] for per-expert scales gathered per row. Equals
    ``dequantize_nvfp4(quantize_nvfp4(x, global_scale), x.dtype)`` row for row; nothing is
    validated (this runs on every forward), NaN stays NaN.
    """
    blocks = _blocks_of(x, validate_dtype=False)
    n_blocks = x.shape[-1] // BLOCK_SIZE
    per_row = global_scale.to(torch.float32)
    global_per_block = torch.broadcast_to(per_row, (*x.shape[:-1], n_blocks)).reshape(-1)
    block_scale = _dynamic_block_scale(_block_amax(blocks), global_per_block)
    denominators = block_scale.to(torch.float32) * global_per_block
    out = torch.empty(blocks.shape, dtype=x.dtype, device=x.device)
    for chunk in _chunks(blocks.shape[0]):
        out[chunk] = _round_to_e2m1(blocks[chunk] / denominators[chunk, None]).mul_(denominators[chunk, None])
    return out.view(x.shape)


def nvfp4_codes(x: torch.Tensor, global_scale: torch.Tensor) -> NVFP4Tensor:
    """The NVFP4 codes of activations x [..., in] with the static global scale (the calibrated
    ``input_scale``, 0-d): dynamic E4M3 block scales and packed E2M1 codes, computed from
    float32(x) as ``fake_quantize_nvfp4`` rounds it, so ``dequantize_nvfp4`` of the result is
    ``fake_quantize_nvfp4(x.float(), global_scale)`` bit for bit. This is the form a fused norm hands
    the W4A4 GEMM after it (the IR's ``nvfp4codes``). Nothing is validated (it runs on every forward)."""
    global_scale = global_scale.to(torch.float32).reshape(())
    blocks = _blocks_of(x.to(torch.float32), validate_dtype=False)
    block_scale = _dynamic_block_scale(_block_amax(blocks), global_scale)
    packed = _encode(blocks, block_scale.to(torch.float32) * global_scale)
    return NVFP4Tensor(packed.view(*x.shape[:-1], x.shape[-1] // 2),
                       block_scale.view(*x.shape[:-1], x.shape[-1] // BLOCK_SIZE), global_scale)


# ------------------------------------------------------------------------------------ internals


def _quantize(
    weight: torch.Tensor,
    blocks: torch.Tensor,
    block_amax: torch.Tensor,
    amax: torch.Tensor | None,
    global_scale: torch.Tensor | None,
    *,
    four_over_six: bool,
    errors: list[tuple[float, float]] | None = None,
) -> NVFP4Tensor:
    """Encode blocks [B, 16] of weight, given the global amax (one per group) or the global scale.

    The B blocks split evenly into as many groups as amax/global_scale has elements (1, or one
    per leading slice), each group sharing one global scale. `errors`: see _encode.
    """
    if global_scale is None:
        assert amax is not None
        amax = _sanitized_amax(amax)
        global_scale = nvfp4_global_scale(amax, four_over_six=four_over_six)
    n_groups = max(global_scale.numel(), 1)
    # one global scale for all blocks stays a 0-d tensor that broadcasts (no [B] copy of it)
    global_per_block = (global_scale.reshape(()) if n_groups == 1
                        else _per_block(global_scale, n_groups, blocks.shape[0]))
    if four_over_six:
        assert amax is not None
        amax_per_block = _per_block(amax, n_groups, blocks.shape[0])
        block_scale = _four_over_six_block_scale(blocks, block_amax.to(torch.float32), amax_per_block)
    else:
        block_scale = _dynamic_block_scale(block_amax.to(torch.float32), global_per_block)
    denominators = e4m3_to_float32(block_scale) * global_per_block
    packed = _encode(blocks, denominators, errors)
    return NVFP4Tensor(
        packed.view(*weight.shape[:-1], weight.shape[-1] // 2),
        block_scale.view(*weight.shape[:-1], weight.shape[-1] // BLOCK_SIZE),
        global_scale,
    )


def _dynamic_block_scale(block_amax: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """ModelOpt's ``get_weights_scaling_factor``: block_amax [B] fp32, global_scale [B] -> e4m3 [B]."""
    scale = block_amax / (E2M1_MAX * global_scale)
    scale = torch.where(scale == 0, 1.0, scale)
    return scale.clamp_(E4M3_MIN_SUBNORMAL, E4M3_MAX).to(torch.float8_e4m3fn)


def _four_over_six_block_scale(
    blocks: torch.Tensor, block_amax: torch.Tensor, amax: torch.Tensor
) -> torch.Tensor:
    """Each block's e4m3 scale under Four Over Six; blocks [B, 16], block_amax and amax [B] fp32.

    First ModelOpt's MSE calibration: the squared error of each candidate amax (the block's,
    and 1.5x it) under its calibration fake-quant, argmin with ties to the first. Then its
    static-quantizer export of the chosen amax.
    """
    scaled_amax = block_amax * FOUR_OVER_SIX_AMAX_MULTIPLIER
    # ModelOpt's compute_fp4_scales: the e4m3 rounding is normalised to amax * (448/256) / 6.
    calibration_amax = amax * (E4M3_MAX / FOUR_OVER_SIX_FP8_MAX) / E2M1_MAX
    to_four = torch.empty(blocks.shape[0], dtype=torch.bool, device=blocks.device)
    for chunk in _chunks(blocks.shape[0]):
        x = blocks[chunk].to(torch.float32)
        errors = [
            _squared_error(x, _calibration_scale(candidate[chunk] / E2M1_MAX, calibration_amax[chunk]))
            for candidate in (block_amax, scaled_amax)
        ]
        to_four[chunk] = errors[1] < errors[0]
    chosen = torch.where(to_four, scaled_amax, block_amax) / E2M1_MAX
    chosen = torch.where(chosen == 0, 1.0, chosen)
    scale = chosen * FOUR_OVER_SIX_FP8_MAX / (amax / E2M1_MAX)
    return scale.clamp_(E4M3_MIN_SUBNORMAL, E4M3_MAX).to(torch.float8_e4m3fn)


def _calibration_scale(scale: torch.Tensor, scale_amax: torch.Tensor) -> torch.Tensor:
    """ModelOpt's ``fp8_eager``: scale [b] rounded through e4m3 normalised to scale_amax [b], fp32."""
    safe_amax = torch.where(scale_amax <= 2.0**-24, 1.0, scale_amax)
    to_fp8 = E4M3_MAX / safe_amax
    from_fp8 = 1.0 / to_fp8
    return (scale * to_fp8).clamp_(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).to(torch.float32) * from_fp8


def _squared_error(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Sum over each block of x [b, 16] (fp32) of (x - fake_quant(x))², as ModelOpt's calibration
    kernel fake-quantizes: values divided by the scale [b], a zero scale quantizing to zero."""
    zero = scale == 0
    safe = torch.where(zero, 1.0, scale)[:, None]
    magnitude = _e2m1_magnitude(_e2m1_magnitude_code(torch.div(x.abs(), safe).clamp_(max=E2M1_MAX)))
    quantized = torch.where(x >= 0, magnitude, -magnitude).mul_(safe)
    quantized = torch.where(zero[:, None], 0.0, quantized)
    return (x - quantized).pow_(2).sum(dim=-1)


def _encode(blocks: torch.Tensor, denominators: torch.Tensor,
            errors: list[tuple[float, float]] | None = None) -> torch.Tensor:
    """Codes of blocks [B, 16] divided by denominators [B] fp32, packed two per byte -> uint8 [B, 8].

    With `errors`, each step also appends (sum x^2, sum (x - dequantized x)^2) over its blocks, in
    float32, while the step's values are in cache (the dequantized magnitude is the code's E2M1
    value times the denominator, as ``dequantize_nvfp4`` computes it). A step is _ENCODE_BLOCKS
    blocks; its temporaries are allocated once and reused, so no step faults in fresh pages.

    Per step: the true fp32 quotient; its sign bit (bit 31, shifted to code bit 3); its magnitude
    clamped to 6 and the magnitude's E2M1 index (_e2m1_index_bits, left in a float's low bits);
    the sign or-ed into the index's bits, whose low byte is then the code, narrowed to bytes; each
    pair of bytes viewed as one int16 and folded so that its low byte holds both (even element low)."""
    out = torch.empty(blocks.shape[0], BLOCK_SIZE // 2, dtype=torch.uint8, device=blocks.device)
    size = min(_ENCODE_BLOCKS, blocks.shape[0]) * BLOCK_SIZE
    scaled_buf, magnitude_buf, index_buf = (torch.empty(size, device=blocks.device) for _ in range(3))
    sign_buf = torch.empty(size, dtype=torch.int32, device=blocks.device)
    byte_buf = torch.empty(size, dtype=torch.uint8, device=blocks.device)
    pair_buf = torch.empty(size // 2, dtype=torch.int16, device=blocks.device)
    for start in range(0, blocks.shape[0], _ENCODE_BLOCKS):
        chunk = slice(start, min(start + _ENCODE_BLOCKS, blocks.shape[0]))
        count = (chunk.stop - start) * BLOCK_SIZE
        x = blocks[chunk]
        denominator = denominators[chunk, None]
        scaled = scaled_buf[:count]
        torch.div(x, denominator, out=scaled.view(-1, BLOCK_SIZE))  # a true fp32 division
        scaled.add_(0.0)  # -0.0 + 0.0 is +0.0 (code 0)
        # the sign bit (code bit 3) of every value below zero: bit 31 of its float32, shifted to bit 3
        sign = torch.bitwise_right_shift(scaled.view(torch.int32), 28, out=sign_buf[:count]).bitwise_and_(8)
        magnitude = torch.abs(scaled, out=magnitude_buf[:count]).clamp_(max=E2M1_MAX)
        index = _e2m1_index_bits(magnitude, index_buf[:count], scratch=scaled)  # (the quotient is done with)
        codes = sign.bitwise_or_(index.view(torch.int32))  # its low byte: sign << 3 | magnitude index
        pairs = byte_buf[:count].copy_(codes).view(torch.int16)  # little endian: the even element low
        folded = torch.bitwise_right_shift(pairs, 4, out=pair_buf[: count // 2]).bitwise_or_(pairs)
        out[chunk].view(-1).copy_(folded)  # the cast to uint8 keeps the low byte
        if errors is not None:
            exact = magnitude.copy_(x.reshape(-1)).abs_()  # (the clamped magnitude is done with)
            signal = float(torch.dot(exact, exact))
            value = _e2m1_value_of_index_bits(index, scaled, codes.view(torch.float32))
            exact.view(-1, BLOCK_SIZE).sub_(value.view(-1, BLOCK_SIZE).mul_(denominator))
            errors.append((signal, float(torch.dot(exact, exact))))
    return out


# 1.5 * 2**23: a float32 in [2**23, 2**24) has ulp 1, so adding this to y in [-2**22, 2**22] rounds y
# to the nearest integer, ties to even (the constant is even), and leaves that integer in the low bits.
_ROUNDING_MAGIC = 12582912.0
_ROUNDING_MAGIC_TENSOR = torch.tensor(_ROUNDING_MAGIC)
_MAGIC_HALF_NEGATED = torch.tensor(-_ROUNDING_MAGIC / 2)
_MAGIC_DOUBLE_NEGATED = torch.tensor(-(2 * _ROUNDING_MAGIC + 8.0))


def _e2m1_index_bits(magnitude: torch.Tensor, out: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """The E2M1 magnitude index (0..7) of each magnitude in [0, 6], ties to even, as a float32
    ``1.5 * 2**23 + index`` in `out` (same shape): the index is the low 3 bits of its int32 view.
    Overwrites magnitude and scratch (same shape).

    The index is min(round(2m), round(m) + 2, round(m/2) + 4) (see _e2m1_magnitude_code), taken
    here as min(round(2m), round(min(m - 2, m/2)) + 4): m - 2 is exact on [1, 6] (Sterbenz's lemma
    up to 4; above, the difference has the finer ulp), so every line is exact wherever it is the
    smallest, and for m < 1 the first is smaller than the others whatever m - 2 rounds to. Each
    rounding is one addition of the magic constant, which also leaves the integer in the result's
    bits: six elementwise ops, against nine for rounding each line and converting to int."""
    low = torch.add(_ROUNDING_MAGIC_TENSOR.to(magnitude.device), magnitude, alpha=2.0, out=out)
    high = torch.minimum(torch.sub(magnitude, 2.0, out=scratch), magnitude.mul_(0.5), out=magnitude)
    high.add_(_ROUNDING_MAGIC + 4.0)
    return torch.minimum(low, high, out=low)


def _e2m1_codes(scaled: torch.Tensor) -> torch.Tensor:
    """E2M1 codes (sign << 3 | magnitude index) of scaled fp32 values, as fp32 0..15; overwrites scaled.

    The sign bit is set for every value below zero, also those that round to magnitude 0 (ModelOpt
    tests ``x < 0``), but not for -0.0.
    """
    negative = scaled < 0
    return _e2m1_magnitude_code(scaled.abs_().clamp_(max=E2M1_MAX)).add_(negative, alpha=8)


def _round_to_e2m1(scaled: torch.Tensor) -> torch.Tensor:
    """scaled fp32 rounded to the signed E2M1 grid, saturating at ±6; overwrites scaled.

    Matches a round trip through codes: a negative value that rounds to zero gives +0.0 (code 8).
    """
    negative = scaled < 0
    magnitude = _e2m1_magnitude(_e2m1_magnitude_code(scaled.abs_().clamp_(max=E2M1_MAX)))
    return torch.where(negative, torch.rsub(magnitude, 0.0), magnitude)


def _e2m1_magnitude_code(magnitude: torch.Tensor) -> torch.Tensor:
    """Index 0..7 (fp32) of the E2M1 value nearest to magnitude in [0, 6], ties to even; overwrites it.

    The grid has step 1/2 on [0, 2], 1 on [2, 4] and 2 on [4, 6], and index = 2m, m + 2 and
    m/2 + 4 on those pieces. That piecewise-linear map is concave, so it is the minimum of its
    three lines, and round-half-even (monotone) commutes with the minimum. Scaling by 2 or 1/2
    is exact in binary floating point, and an even index is an even mantissa, so this is exact
    round-to-nearest-even with no comparison table.
    """
    low = torch.mul(magnitude, 2.0).round_()
    middle = torch.round(magnitude).add_(2.0)
    high = magnitude.mul_(0.5).round_().add_(4.0)
    torch.minimum(low, middle, out=low)
    return torch.minimum(low, high, out=low)


def _e2m1_magnitude(code: torch.Tensor) -> torch.Tensor:
    """The E2M1 magnitude of index code (fp32 0..7): max(c/2, c - 2, 2c - 8), the convex inverse."""
    value = torch.maximum(code * 0.5, code - 2.0)
    return torch.maximum(value, code.mul_(2.0).sub_(8.0), out=value)


def _e2m1_value_of_index_bits(index: torch.Tensor, out: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """The E2M1 magnitude of each ``1.5 * 2**23 + i`` from _e2m1_index_bits, in `out` (fp32, same
    shape); overwrites index and scratch. It is max(i/2, i - 2, 2i - 8) (_e2m1_magnitude), each line
    one op on the float: a scaling by a power of two and the subtraction of a constant from the
    same binade are exact."""
    value = torch.add(_MAGIC_HALF_NEGATED.to(index.device), index, alpha=0.5, out=out)  # i / 2
    torch.maximum(value, torch.sub(index, _ROUNDING_MAGIC + 2.0, out=scratch), out=value)  # i - 2
    line = torch.add(_MAGIC_DOUBLE_NEGATED.to(index.device), index, alpha=2.0, out=index)  # 2i - 8
    return torch.maximum(value, line, out=value)


def _unpack(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [b, 8] -> codes uint8 [b, 16], the low nibble first."""
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).view(packed.shape[0], -1)


def _blocks_of(x: torch.Tensor, *, validate_dtype: bool = True) -> torch.Tensor:
    """x [..., in] viewed (or copied) as blocks [B, 16]; checks dtype and that 16 divides in."""
    if validate_dtype:
        check_float_dtype(x, "NVFP4")
    if x.ndim == 0 or x.shape[-1] % BLOCK_SIZE != 0:
        size = x.shape[-1] if x.ndim else "no"
        raise ValueError(
            f"NVFP4 quantizes blocks of {BLOCK_SIZE} along the last (input) dim, but a tensor of shape "
            f"{list(x.shape)} has {size} elements there, not a multiple of {BLOCK_SIZE}."
        )
    return x.reshape(-1, BLOCK_SIZE)


def _block_amax(blocks: torch.Tensor) -> torch.Tensor:
    """max |x| of each block [B, 16] -> float32 [B] (exact; NaN and Inf propagate)."""
    out = torch.empty(blocks.shape[0], dtype=torch.float32, device=blocks.device)
    for chunk in _chunks(blocks.shape[0]):
        out[chunk] = blocks[chunk].abs().amax(dim=-1)
    return out


_MAGNITUDE_BITS = {torch.bfloat16: (torch.int16, 0x7FFF), torch.float16: (torch.int16, 0x7FFF),
                   torch.float32: (torch.int32, 0x7FFFFFFF)}


def _block_amax_of_weight(blocks: torch.Tensor) -> torch.Tensor:
    """max |x| of each block [B, 16] of a weight (bfloat16, float16, float32) -> [B], exact, in the
    weight's dtype (the quantizer widens each step's slice to float32 where it needs it).

    A float with its sign bit cleared orders as its bits do as an integer (Inf above every finite
    value, NaN above Inf), so the maximum is taken on the integer bits: about 3x faster than abs
    and a float reduction over 16 elements, and NaN or Inf still come out as NaN or Inf."""
    integer, magnitude_mask = _MAGNITUDE_BITS[blocks.dtype]
    bits = blocks.contiguous().view(integer)
    out = torch.empty(blocks.shape[0], dtype=integer, device=blocks.device)
    magnitudes = torch.empty(min(_ENCODE_BLOCKS, blocks.shape[0]), BLOCK_SIZE, dtype=integer, device=blocks.device)
    for start in range(0, blocks.shape[0], _ENCODE_BLOCKS):
        chunk = slice(start, min(start + _ENCODE_BLOCKS, blocks.shape[0]))
        step = torch.bitwise_and(bits[chunk], magnitude_mask, out=magnitudes[: chunk.stop - start])
        torch.amax(step, dim=-1, out=out[chunk])
    return out.view(blocks.dtype)


def _block_denominators(block_scale: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """float(block_scale) * global_scale for each block -> fp32 [B]; global_scale [] or leading dims."""
    global_per_block = _per_block(global_scale, max(global_scale.numel(), 1), block_scale.numel())
    return block_scale.reshape(-1).to(torch.float32) * global_per_block


def _per_block(per_group: torch.Tensor, n_groups: int, n_blocks: int) -> torch.Tensor:
    """A value per group ([] or [G]) repeated for each of the group's consecutive blocks -> [B]."""
    per_group = per_group.to(torch.float32).reshape(n_groups, 1)
    return per_group.expand(n_groups, n_blocks // n_groups).reshape(-1)


def _sanitized_amax(amax: torch.Tensor) -> torch.Tensor:
    amax = amax.to(torch.float32)
    if not bool(torch.isfinite(amax).all()) or bool((amax < 0).any()):
        raise ValueError(
            f"an NVFP4 global scale needs a finite, non-negative amax; got {describe_values(amax)}."
        )
    return torch.where(amax == 0, E2M1_MAX, amax)


def _check_finite(block_amax: torch.Tensor, weight: torch.Tensor) -> None:
    if block_amax.numel() and not bool(torch.isfinite(block_amax.amax())):
        bad = int((~torch.isfinite(weight)).sum())
        raise ValueError(
            f"cannot quantize a weight of shape {list(weight.shape)} that holds {bad} NaN or Inf values."
        )


def _chunks(n_blocks: int) -> Iterator[slice]:
    for start in range(0, n_blocks, _CHUNK_BLOCKS):
        yield slice(start, min(start + _CHUNK_BLOCKS, n_blocks))
