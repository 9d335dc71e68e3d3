"""The deployed numerics of quantized GEMMs, as the reference meaning of `quantize` and of
`linear` / `grouped_gemm` with quantized weights:
- W4A16 / W8A16: the dequantized weight times the activations, fp32 accumulation;
- W4A4: `quantize` rounds activations to NVFP4 per 16-block (dynamic block scale, static global
  scale `input_scale`), then the GEMM as above;
- W8A8: `quantize` rounds activations to FP8 with the static per-tensor scale `input_scale`;
- dynamic activation scales (`quantize_dynamic`, no calibration): FP8 one scale per token, NVFP4
  one global scale per tensor, both computed from the activations on every call.

Speed: a grouped GEMM dequantizes only the experts that receive rows, one at a time. Weights are
prepared once, when an executor is made (`prepare`), and read back bit for bit as the reference
dequantizers give them: NVFP4 gets each block's fp32 denominator (float(block_scale) *
global_scale) computed ahead, and a byte of two codes is read through a 256-entry table of value
pairs (on the CPU the unscaled values are held as bf16 instead: no lookup per step); FP8 E4M3 data is held as bf16, which holds every E4M3 value exactly and widens to fp32 by
a shift (the CPU has no fast E4M3 conversion)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from nemocompile.base.formats import FORMATS

from .cpu_gemm import PackedLinear
from .formats import (
    FP8Tensor,
    NVFP4Tensor,
    dequantize_fp8,
    dequantize_nvfp4,
    fake_quantize_fp8,
    fake_quantize_nvfp4,
)
from .formats.fp8 import FLOAT32_TINY
from .formats.nvfp4 import BLOCK_SIZE
from .weights import WeightValue

# amax of an all-zero activation, and amax / scale, from the format registry (448 and 448 for FP8,
# 6 and 6 * 448 for NVFP4)
ELEMENT_MAX = {name: FORMATS[name].max_value for name in ("fp8", "nvfp4")}
SCALED_MAX = {name: FORMATS[name].scaled_max for name in ("fp8", "nvfp4")}

NVFP4_BLOCK = BLOCK_SIZE  # from the format registry


def _pair_table() -> torch.Tensor:
    """fp32 [256, 2]: the two E2M1 values of each byte (low nibble first), read from the reference
    dequantizer itself with unit scales, so the table cannot disagree with it."""
    every_byte = torch.arange(256, dtype=torch.uint8).reshape(32, NVFP4_BLOCK // 2)
    unit = NVFP4Tensor(every_byte, torch.ones(32, 1, dtype=torch.float8_e4m3fn), torch.tensor(1.0))
    return dequantize_nvfp4(unit, torch.float32).reshape(256, 2)


PAIR_VALUES = _pair_table()


@dataclass(frozen=True, eq=False)
class PreparedNVFP4(NVFP4Tensor):
    """An NVFP4 weight with each block's fp32 denominator computed ahead: [..., out, in/16]
    (0.25 bytes per weight on top of the stored 0.5625). On the CPU also its E2M1 values, unscaled,
    as bf16 [..., out, in] (exact: every E2M1 value is a bf16 number; 2 bytes per weight more), so
    that a dequantize is a widening and one multiply instead of a table lookup per byte; elsewhere
    `values` is empty and the byte-pair table is read. Still an NVFP4Tensor to any kernel."""

    denominators: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    values: torch.Tensor = field(default_factory=lambda: torch.empty(0))


@dataclass(frozen=True, eq=False)
class PreparedFP8(FP8Tensor):
    """An FP8 E4M3 weight with its values also held as bf16 (exact: 2 bytes per weight on top of
    the stored 1). Still an FP8Tensor to any kernel."""

    values: torch.Tensor = field(default_factory=lambda: torch.empty(0))


def _per_row_scale(scale: torch.Tensor, ndim: int) -> torch.Tensor:
    """An FP8 scale ([], per slice [...], or per channel [..., out]) shaped to broadcast over [..., out, in]."""
    return scale.reshape(*scale.shape, *([1] * (ndim - scale.ndim))) if scale.ndim else scale


def prepare(weight: WeightValue) -> WeightValue:
    """The layout the reference GEMMs read fastest (done once, when an executor is made)."""
    if isinstance(weight, FP8Tensor) and not isinstance(weight, PreparedFP8):
        return PreparedFP8(weight.data, weight.scale, weight.data.to(torch.bfloat16))
    if isinstance(weight, NVFP4Tensor) and not isinstance(weight, PreparedNVFP4):
        global_scale = weight.global_scale.to(torch.float32)
        per_slice = global_scale.reshape(*global_scale.shape, 1, 1) if global_scale.ndim else global_scale
        denominators = weight.block_scale.to(torch.float32) * per_slice
        values = _code_values(weight.packed) if weight.packed.device.type == "cpu" else torch.empty(0)
        return PreparedNVFP4(weight.packed, weight.block_scale, weight.global_scale, denominators, values)
    return weight


def _code_values(packed: torch.Tensor) -> torch.Tensor:
    """packed uint8 [..., out, in/2] -> the unscaled E2M1 values bf16 [..., out, in], read through
    the byte-pair table (a row at a time: bounded temporaries)."""
    flat = packed.reshape(-1, packed.shape[-1])
    out = torch.empty(flat.shape[0], flat.shape[1] * 2, dtype=torch.bfloat16)
    table = PAIR_VALUES.to(torch.bfloat16)
    for start in range(0, flat.shape[0], 4096):
        rows = flat[start:start + 4096]
        out[start:start + 4096] = table.index_select(0, rows.reshape(-1).to(torch.int32)).view(rows.shape[0], -1)
    return out.view(*packed.shape[:-1], packed.shape[-1] * 2)


def _nvfp4_values(packed: torch.Tensor, denominators: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """packed uint8 [out, in/2] (or its unscaled values bf16 [out, in], when held) and denominators
    [out, in/16] -> fp32 [out, in]."""
    rows, half = packed.shape
    blocks = half * 2 // NVFP4_BLOCK
    if values.numel():
        unscaled = values.view(rows, blocks, NVFP4_BLOCK).to(torch.float32)
    else:
        table = PAIR_VALUES.to(packed.device)
        unscaled = table.index_select(0, packed.reshape(-1).to(torch.int32)).view(rows, blocks, NVFP4_BLOCK)
    return unscaled.mul_(denominators[..., None]).view(rows, half * 2)


def _fp8_values(values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """bf16-held E4M3 values [out, in] times their scale, in fp32 (as dequantize_fp8 computes it)."""
    return values.to(torch.float32).mul_(_per_row_scale(scale.to(torch.float32), values.ndim))


def dequantized(weight: WeightValue) -> torch.Tensor:
    if isinstance(weight, PreparedNVFP4) and weight.packed.ndim == 2:
        return _nvfp4_values(weight.packed, weight.denominators, weight.values)
    if isinstance(weight, PreparedFP8) and weight.data.ndim == 2:
        return _fp8_values(weight.values, weight.scale)
    if isinstance(weight, NVFP4Tensor):
        return dequantize_nvfp4(weight, torch.float32)
    if isinstance(weight, FP8Tensor):
        return dequantize_fp8(weight, torch.float32)
    if isinstance(weight, PackedLinear):
        return weight.dense()
    return weight.float()


def expert_weight(weight: WeightValue, expert: int) -> torch.Tensor:
    """Expert `expert` of a stacked weight [E, out, in], dequantized to fp32 [out, in]."""
    if isinstance(weight, PreparedNVFP4):
        values = weight.values[expert] if weight.values.numel() else weight.values
        return _nvfp4_values(weight.packed[expert], weight.denominators[expert], values)
    if isinstance(weight, NVFP4Tensor):
        scale = weight.global_scale[expert] if weight.global_scale.ndim else weight.global_scale
        return dequantize_nvfp4(NVFP4Tensor(weight.packed[expert], weight.block_scale[expert], scale))
    if isinstance(weight, FP8Tensor):
        scale = weight.scale[expert] if weight.scale.ndim else weight.scale
        if isinstance(weight, PreparedFP8):
            return _fp8_values(weight.values[expert], scale)
        return dequantize_fp8(FP8Tensor(weight.data[expert], scale), torch.float32)
    if isinstance(weight, PackedLinear):
        return weight.packed[expert].to_dense()
    return weight[expert].float()


def quantize_activations(x: torch.Tensor, act_format: str | None, scale: torch.Tensor | None) -> torch.Tensor:
    """x in fp32, quantized and dequantized as the deployed kernel sees it. `scale` is [] or per
    row [rows, 1]."""
    if act_format is None:
        return x
    assert scale is not None
    if act_format == "nvfp4":
        return fake_quantize_nvfp4(x, scale)
    return fake_quantize_fp8(x, scale)


def quantize(x: torch.Tensor, act_format: str, input_scale: torch.Tensor,
             offsets: torch.Tensor | None = None) -> torch.Tensor:
    """The `quantize` op: x quantized to `act_format`, held as its exact values in fp32 (every
    NVFP4 or FP8 value times its scales is an fp32 number, so nothing is lost). With `offsets`,
    rows offsets[e]:offsets[e+1] use input_scale[e]."""
    if offsets is None:
        return quantize_activations(x.float(), act_format, input_scale)
    # Every row is rounded with its own expert's scale, all rows in one call (each row's numbers
    # depend only on the row and its scale).
    return quantize_activations(x.float(), act_format, _per_row(input_scale.reshape(-1), offsets))


def _per_row(per_expert: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """per_expert [E] -> [rows, 1]: row r gets the value of the expert whose rows
    offsets[e]:offsets[e+1] hold it."""
    return per_expert.repeat_interleave(offsets.diff(), output_size=int(offsets[-1]))[:, None]


def dynamic_scale(x: torch.Tensor, act_format: str) -> torch.Tensor:
    """The scale `quantize_dynamic` computes from x (fp32): FP8 per row [rows, 1] = row amax / 448;
    NVFP4 per tensor [] = amax / (6 * 448). A zero amax takes the format's element maximum (as
    calibration does), and a scale below the smallest normal float32 is raised to it (kernels flush
    denormal scales to zero)."""
    if act_format == "fp8":
        amax = x.abs().amax(dim=-1, keepdim=True) if x.shape[-1] else x.new_zeros((*x.shape[:-1], 1))
    else:
        amax = x.abs().amax() if x.numel() else x.new_zeros(())
    amax = torch.where(amax > 0, amax, torch.full_like(amax, ELEMENT_MAX[act_format]))
    return (amax / SCALED_MAX[act_format]).clamp_min(FLOAT32_TINY)


def quantize_dynamic(x: torch.Tensor, act_format: str, offsets: torch.Tensor | None = None) -> torch.Tensor:
    """The `quantize_dynamic` op: x quantized with scales computed from itself (each expert's rows
    as one tensor when `offsets` groups them), held as exact fp32 values like `quantize`."""
    values = x.float()
    if offsets is None or act_format == "fp8":  # FP8's dynamic scale is per row already
        return quantize_activations(values, act_format, dynamic_scale(values, act_format))
    # NVFP4: one global scale per expert, from the amax of its rows, all rows in one call.
    row_amax = values.abs().amax(dim=-1) if values.shape[-1] else values.new_zeros(values.shape[0])
    counts = offsets.diff()
    expert_amax = torch.segment_reduce(row_amax, "max", lengths=counts, unsafe=True) if len(row_amax) else \
        row_amax.new_zeros(counts.shape)
    expert_amax = torch.where(expert_amax > 0, expert_amax, torch.full_like(expert_amax, ELEMENT_MAX[act_format]))
    scale = (expert_amax / SCALED_MAX[act_format]).clamp_min(FLOAT32_TINY)
    return quantize_activations(values, act_format, _per_row(scale, offsets))


def quant_linear(x: torch.Tensor, weight: WeightValue, bias: torch.Tensor | None,
                 out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x (float, or quantized by `quantize`) times the dequantized weight, accumulated in fp32;
    the result in `out_dtype` (x's dtype when not given)."""
    out = x.float() @ dequantized(weight).T
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype or x.dtype)


def quant_grouped_gemm(x_sorted: torch.Tensor, offsets: torch.Tensor, weight: WeightValue,
                       out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Rows of expert e times expert e's dequantized weight; only experts with rows are dequantized."""
    out = torch.zeros(x_sorted.shape[0], weight.shape[1], dtype=torch.float32, device=x_sorted.device)
    bounds = offsets.tolist()
    for expert in range(len(bounds) - 1):
        start, end = bounds[expert], bounds[expert + 1]
        if start == end:
            continue
        out[start:end] = x_sorted[start:end].float() @ expert_weight(weight, expert).T
    return out.to(out_dtype or x_sorted.dtype)
