"""FP8 E4M3 with FP32 scales, as NVIDIA ModelOpt exports it.

A weight ``w`` is stored as ``data = e4m3(clamp(float32(w) / scale, ±448))`` (round to nearest
even) and read back as ``data * scale``. The scale is ``amax / 448`` in float32 for the whole
tensor (per-tensor), for each output row (per-channel) or for each slice of a stack of experts.
The bytes match ModelOpt 0.47's export path bit for bit
(``modelopt.torch.export.quant_utils.get_scaling_factor`` for the scale, ``to_quantized_weight``
for the data, which divides in float32 because the scale it gets has shape [1] or [out, 1]).
``FP8QTensor.quantize(w, scale)`` agrees when given such a scale; given a 0-dim scale it would
round a bf16 quotient to bf16 before E4M3, which we do not copy.

A zero amax (an all-zero tensor or row) gets the scale 1.0: ModelOpt's export replaces a zero
amax by the format's maximum (448) before dividing, so nothing is ever divided by zero.

The zero and denormal rule, shared with NVFP4 (``check_normal_scale``): a zero amax takes the
format's maximum as its amax (an all-zero tensor quantizes to exact zeros); a non-zero amax whose
float32 scale would not be a normal number (below 2**-126, i.e. amax below 448 * 2**-126 ~ 5.2e-36
here, 6 * 448 * 2**-126 ~ 3.2e-35 for NVFP4: a weight of denormals only) is refused, because
GPU kernels flush a denormal scale to zero and a scale of zero turns the weight into NaN or zeros.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from nemocompile.base.formats import FORMATS

E4M3_MAX = FORMATS["fp8e4m3"].max_value  # largest finite float8_e4m3fn value (448)
FLOAT32_TINY = torch.finfo(torch.float32).tiny  # 2**-126, the smallest normal float32: the least scale
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Values per chunk when converting: 128K keep a chunk's float32 temporaries (512 KiB) in cache,
# and make the per-op overhead of the few torch ops per chunk negligible.
CHUNK_VALUES = 1 << 20  # values per step: few, large torch ops
MEASURED_CHUNK_VALUES = 1 << 18  # quantize_fp8_measured: reused 1 MiB float32 temporaries, in the L3 cache
# Every E4M3 byte's float32 value, by torch's own conversion: a lookup is ~4x faster than the
# conversion on a CPU (which has no E4M3 instructions), with the same bits.
_E4M3_VALUES = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).to(torch.float32)


@dataclass(frozen=True, eq=False)
class FP8Tensor:
    """An FP8 E4M3 weight and its FP32 scale.

    data: float8_e4m3fn, the weight's shape [..., out, in].
    scale: float32, one of [] (per-tensor), [...] = data.shape[:-2] (one per stacked slice)
    or [..., out] = data.shape[:-1] (per-channel: one per output row).
    """

    data: torch.Tensor
    scale: torch.Tensor

    def __post_init__(self) -> None:
        if self.data.dtype != torch.float8_e4m3fn:
            raise ValueError(f"FP8Tensor data must be float8_e4m3fn, not {self.data.dtype}.")
        if self.scale.dtype != torch.float32:
            raise ValueError(f"FP8Tensor scale must be float32, not {self.scale.dtype}.")
        if self.data.ndim == 0:
            raise ValueError("FP8Tensor data must have at least one dim.")
        allowed = {(), tuple(self.data.shape[:-1]), tuple(self.data.shape[:-2])}
        if tuple(self.scale.shape) not in allowed:
            raise ValueError(
                f"FP8Tensor scale of shape {tuple(self.scale.shape)} fits neither per-tensor [], per-slice "
                f"{list(self.data.shape[:-2])} nor per-channel {list(self.data.shape[:-1])} scaling of data "
                f"{list(self.data.shape)}."
            )

    @property
    def shape(self) -> tuple[int, ...]:
        """The logical (and stored) shape [..., out, in]."""
        return tuple(self.data.shape)


def fp8_scale(amax: torch.Tensor) -> torch.Tensor:
    """``amax / 448`` in float32, any shape; a zero amax gives 1.0 (ModelOpt's export rule).

    Raises ValueError for a negative, NaN or infinite amax, or a non-zero one so small that the
    scale is not a normal float32 (the module's zero and denormal rule).
    """
    amax = amax.to(torch.float32)
    if not bool(torch.isfinite(amax).all()) or bool((amax < 0).any()):
        raise ValueError(f"an FP8 scale needs a finite, non-negative amax; got {describe_values(amax)}.")
    scale = torch.where(amax == 0, 1.0, amax / E4M3_MAX)
    check_normal_scale(scale, amax, "FP8")
    return scale


def check_normal_scale(scale: torch.Tensor, amax: torch.Tensor, fmt: str) -> None:
    """The zero and denormal rule of FP8 and NVFP4: ValueError where a non-zero amax gives a scale
    below the smallest normal float32 (a weight of denormals only)."""
    small = (amax > 0) & (scale < FLOAT32_TINY)
    if bool(small.any()):
        raise ValueError(
            f"the largest magnitude {float(amax[small].flatten()[0]):g} is so small that its {fmt} scale "
            f"would be a denormal float32 (below 2**-126), which GPU kernels flush to zero; FP8 and NVFP4 "
            f"refuse such a weight alike (keep it in a float format, or make it exactly zero)."
        )


def quantize_fp8(
    weight: torch.Tensor, *, per_channel: bool = False, scale: torch.Tensor | None = None
) -> FP8Tensor:
    """Quantize weight [..., out, in] (float32/bfloat16/float16) to FP8 E4M3.

    The scale is ``amax / 448`` over the whole tensor (scale []), or over each output row when
    per_channel (scale [..., out]); a given scale is used as it is, and must be positive, finite
    and of that shape. Values are clamped to ±448 before the cast, so a given scale smaller than
    amax/448 saturates instead of overflowing. Raises ValueError for
    NaN/Inf in the weight, a non-float weight, or a scale of the wrong shape or sign.
    """
    check_float_dtype(weight, "FP8")
    amax = _amax(weight, per_channel=per_channel)
    if scale is None:
        scale = fp8_scale(amax)
    else:
        scale = _checked_scale(scale, weight, per_channel)
    return FP8Tensor(_quantize_rows(weight, scale), scale)


def quantize_fp8_measured(
    weight: torch.Tensor, *, amax: torch.Tensor | None = None
) -> tuple[FP8Tensor, list[tuple[float, float]]]:
    """``quantize_fp8(weight)`` (per-tensor scale, the same bytes) and its error measured on the way:
    (sum x^2, sum (x - dequantize_fp8(q))^2) in float32 over each step of rows, in order, computed
    while the step is in cache (the streaming build quantizes each weight with this).

    `amax`: the largest magnitude of a whole tensor of which `weight` is a run of rows (0-d): the
    run then gets exactly the bytes of its rows in the whole tensor's quantization."""
    check_float_dtype(weight, "FP8")
    local = _amax(weight, per_channel=False)  # also refuses NaN and Inf in the run
    scale = fp8_scale(local if amax is None else amax)
    rows = weight.reshape(math.prod(weight.shape[:-1]), weight.shape[-1])
    out = torch.empty(rows.shape, dtype=torch.float8_e4m3fn, device=rows.device)
    errors = []
    step = max(1, MEASURED_CHUNK_VALUES // max(rows.shape[1], 1))
    # the step's temporaries, allocated once and reused (no step faults in fresh pages)
    size = min(step, rows.shape[0]) * rows.shape[1]
    exact_buf, quotient_buf = torch.empty(size, device=rows.device), torch.empty(size, device=rows.device)
    index_buf = torch.empty(size, dtype=torch.int32, device=rows.device)
    values = _E4M3_VALUES.to(rows.device)
    for start in range(0, rows.shape[0], step):
        chunk = slice(start, start + step)
        count = (min(start + step, rows.shape[0]) - start) * rows.shape[1]
        exact = exact_buf[:count].view(-1, rows.shape[1]).copy_(rows[chunk])  # never the caller's weight
        quotient = torch.div(exact, scale, out=quotient_buf[:count].view(exact.shape)).clamp_(-E4M3_MAX, E4M3_MAX)
        codes = out[chunk].copy_(quotient)  # the cast rounds to nearest even
        flat = exact.view(-1)
        signal = float(torch.dot(flat, flat))
        index = index_buf[:count].copy_(codes.view(torch.uint8).view(-1))
        dequantized = torch.index_select(values, 0, index, out=quotient_buf[:count]).mul_(scale)
        flat.sub_(dequantized)
        errors.append((signal, float(torch.dot(flat, flat))))
    return FP8Tensor(out.view(weight.shape), scale), errors


def quantize_fp8_stacked(weight: torch.Tensor) -> FP8Tensor:
    """Quantize a stack of experts weight [E, out, in], each slice with its own scale -> scale [E].

    Equal, slice for slice, to ``quantize_fp8(weight[e])``.
    """
    check_float_dtype(weight, "FP8")
    if weight.ndim != 3:
        raise ValueError(f"quantize_fp8_stacked takes a weight [E, out, in], not shape {list(weight.shape)}.")
    scale = fp8_scale(_finite_amax(weight.flatten(1), dim=1))
    return FP8Tensor(_quantize_rows(weight, scale), scale)


def dequantize_fp8(t: FP8Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``data * scale`` computed in float32, then cast to dtype; shape t.shape.

    ModelOpt's ``FP8QTensor.dequantize`` multiplies in the target dtype (the scale rounded to
    bf16 first); this keeps the fp32 product, which is what an FP8 GEMM's epilogue computes.
    The two agree exactly for dtype float32.
    """
    rows = t.data.reshape(math.prod(t.data.shape[:-1]), t.data.shape[-1])
    scale = _per_row(t.scale, t.data)
    out = torch.empty(rows.shape, dtype=dtype, device=rows.device)
    for chunk in _row_chunks(rows):
        out[chunk] = rows[chunk].to(torch.float32).mul_(scale[chunk, None])
    return out.view(t.shape)


def fake_quantize_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Round activations x [..., in] through FP8 with a static scale (from calibration), in x.dtype.

    scale: [] or any shape that broadcasts against x. Equals
    ``dequantize_fp8(quantize_fp8(x, scale=scale), x.dtype)`` for a per-tensor scale; NaN stays
    NaN and nothing is validated, as this runs on every forward.
    """
    scale = scale.to(torch.float32)
    return (fp8_codes(x, scale).to(torch.float32) * scale).to(x.dtype)


def fp8_codes(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The E4M3 codes of activations x with a static scale: e4m3(clamp(float32(x) / scale)), so
    ``codes.float() * scale`` is ``fake_quantize_fp8(x.float(), scale)`` bit for bit."""
    return _cast(x.to(torch.float32) / scale.to(torch.float32))


def e4m3_to_float32(values: torch.Tensor) -> torch.Tensor:
    """float8_e4m3fn values as float32 (any shape), bit for bit ``values.to(torch.float32)``."""
    codes = values.view(torch.uint8).reshape(-1).to(torch.int32)
    return _E4M3_VALUES.to(values.device).index_select(0, codes).view(values.shape)


def _cast(values: torch.Tensor) -> torch.Tensor:
    return values.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def _quantize_rows(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """e4m3(clamp(float32(weight) / scale)) with scale [], [...] or [..., out], a chunk of rows at a time."""
    rows = weight.reshape(math.prod(weight.shape[:-1]), weight.shape[-1])
    per_row = _per_row(scale, weight)
    out = torch.empty(rows.shape, dtype=torch.float8_e4m3fn, device=rows.device)
    for chunk in _row_chunks(rows):
        # bf16/fp16 / fp32 promotes to an fp32 quotient; out-of-place, as rows may be the caller's
        out[chunk] = torch.div(rows[chunk], per_row[chunk, None]).clamp_(-E4M3_MAX, E4M3_MAX)
    return out.view(weight.shape)


def _per_row(scale: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
    """The scale of each row of data viewed as [rows, in] -> float32 [rows]."""
    return torch.broadcast_to(_broadcastable(scale, data), (*data.shape[:-1], 1)).reshape(-1)


def _row_chunks(rows: torch.Tensor) -> Iterator[slice]:
    step = max(1, CHUNK_VALUES // max(rows.shape[1], 1))
    for start in range(0, rows.shape[0], step):
        yield slice(start, start + step)


def _amax(weight: torch.Tensor, *, per_channel: bool) -> torch.Tensor:
    if not per_channel:
        return _finite_amax(weight, dim=None)
    if weight.ndim < 2:
        raise ValueError(f"per-channel FP8 needs a weight [..., out, in], not shape {list(weight.shape)}.")
    return _finite_amax(weight, dim=-1)


def _finite_amax(weight: torch.Tensor, dim: int | None) -> torch.Tensor:
    """max |weight| over dim (all dims if None) as float32; ValueError if the weight holds NaN or Inf."""
    if weight.numel() == 0:  # amax cannot reduce nothing; zeros of the reduced shape
        return torch.zeros_like(weight, dtype=torch.float32).sum(dim=dim)
    # aminmax reads the weight once and allocates no |weight| copy; NaN propagates through it.
    low, high = torch.aminmax(weight) if dim is None else torch.aminmax(weight, dim=dim)
    amax = torch.maximum(high, -low)
    if not bool(torch.isfinite(amax).all()):
        shape = list(weight.shape)
        raise ValueError(f"cannot quantize a weight of shape {shape} that holds NaN or Inf values.")
    return amax.to(torch.float32)


def _checked_scale(scale: torch.Tensor, weight: torch.Tensor, per_channel: bool) -> torch.Tensor:
    scale = scale.to(torch.float32)
    expected = tuple(weight.shape[:-1]) if per_channel else ()
    if tuple(scale.shape) != expected:
        kind = "per-channel" if per_channel else "per-tensor"
        raise ValueError(
            f"a {kind} FP8 scale for a weight {list(weight.shape)} must have shape {list(expected)}, "
            f"not {list(scale.shape)}."
        )
    if not bool(torch.isfinite(scale).all()) or bool((scale <= 0).any()):
        raise ValueError(f"an FP8 scale must be positive and finite; got {describe_values(scale)}.")
    return scale


def _broadcastable(scale: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
    """scale reshaped to broadcast against data: [] stays, [...] (per slice) and [..., out] gain dims."""
    if scale.ndim == 0:
        return scale
    return scale.reshape(*scale.shape, *([1] * (data.ndim - scale.ndim)))


def check_float_dtype(weight: torch.Tensor, fmt: str) -> None:
    """ValueError unless weight is float32, bfloat16 or float16, the dtypes checkpoints hold."""
    if weight.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{fmt} quantizes float32, bfloat16 or float16 tensors, not {weight.dtype}.")


def describe_values(values: torch.Tensor) -> str:
    """The first few values and the shape, for error messages."""
    flat = values.detach().flatten()
    shown = ", ".join(f"{v:g}" for v in flat[:4].tolist())
    more = ", ..." if flat.numel() > 4 else ""
    return f"[{shown}{more}] (shape {list(values.shape)})"
