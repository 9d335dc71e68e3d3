"""Reference implementations of the fused ops (graph/fused_ops.py): each is the composition of the
core references of the ops it replaces, in the same order and dtypes, so a fused graph computes
the very numbers of the unfused one. Kernels of fused ops are tested against these functions.

Weights are plain tensors or the runtime's quantized formats (NVFP4Tensor, FP8Tensor); a GEMM
with a quantized weight multiplies the dequantized weight in fp32 (runtime/quantized_ops.py), one
with a float32 weight packed for oneDNN multiplies through it (runtime/cpu_gemm.py).
`out_dtype` is always the dtype of the GEMM's result as the IR types it."""

from __future__ import annotations

import torch

from ..cpu_gemm import PackedLinear
from ..formats import NVFP4Tensor, dequantize_nvfp4, fp8_codes, nvfp4_codes
from ..quantized_ops import quant_grouped_gemm, quant_linear, quantize
from ..weights import WeightValue
from .elementwise import add, linear, relu2, silu
from .moe import expert_order, gather_rows, grouped_gemm, moe_combine, moe_router
from .norms import rms_norm


def activation(x: torch.Tensor, kind: str) -> torch.Tensor:
    """The `activation` op: relu2 or silu."""
    if kind == "relu2":
        return relu2(x)
    if kind == "silu":
        return silu(x)
    raise ValueError(f"activation: unknown kind {kind!r}")


def linear_any(x: torch.Tensor, weight: WeightValue, bias: torch.Tensor | None,
               out_dtype: torch.dtype) -> torch.Tensor:
    """The `linear` op: a float weight in x's dtype, a quantized one dequantized (fp32 accumulation)."""
    if isinstance(weight, torch.Tensor):
        return linear(x, weight, bias)
    if isinstance(weight, PackedLinear):
        return weight.linear(x, bias)
    return quant_linear(x, weight, bias, out_dtype)


def grouped_gemm_any(x: torch.Tensor, offsets: torch.Tensor, weight: WeightValue,
                     out_dtype: torch.dtype) -> torch.Tensor:
    """The `grouped_gemm` op, float or quantized weight as for linear_any."""
    if isinstance(weight, torch.Tensor):
        return grouped_gemm(x, offsets, weight)
    if isinstance(weight, PackedLinear):
        return weight.grouped(x, offsets)
    return quant_grouped_gemm(x, offsets, weight, out_dtype)


def moe_route(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *, top_k: int, n_group: int,
              topk_group: int, norm_topk_prob: bool, routed_scaling_factor: float,
              num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """moe_router then moe_dispatch's grouping: (weights [..., k] f32, ids [..., k] i64,
    offsets [E+1] i64, order [N*k] i64) for x [..., D]."""
    flat = x.reshape(-1, x.shape[-1])
    weights, ids = moe_router(flat, weight, bias, top_k=top_k, n_group=n_group, topk_group=topk_group,
                              norm_topk_prob=norm_topk_prob, routed_scaling_factor=routed_scaling_factor)
    offsets, order = expert_order(ids, num_experts)
    shape = (*x.shape[:-1], top_k)
    return weights.reshape(shape), ids.reshape(shape), offsets, order


def _quantized(x: torch.Tensor, act_format: str | None, input_scale: torch.Tensor | None,
               offsets: torch.Tensor | None) -> torch.Tensor:
    if act_format is None:
        return x
    assert input_scale is not None, "an act_format needs its input_scale"
    return quantize(x, act_format, input_scale, offsets)


def moe_expert_up(x: torch.Tensor, order: torch.Tensor, offsets: torch.Tensor, weight: WeightValue,
                  input_scale: torch.Tensor | None, *, top_k: int, activation_kind: str, act_format: str | None,
                  out_dtype: torch.dtype) -> torch.Tensor:
    """activation(grouped_gemm(Q(x[order // top_k]), offsets, weight)), x [..., D] -> [N*k, I]."""
    rows = gather_rows(x.reshape(-1, x.shape[-1]), order, top_k)
    hidden = grouped_gemm_any(_quantized(rows, act_format, input_scale, offsets), offsets, weight, out_dtype)
    return activation(hidden, activation_kind)


def moe_expert_down(hidden: torch.Tensor, order: torch.Tensor, offsets: torch.Tensor, weight: WeightValue,
                    weights: torch.Tensor, input_scale: torch.Tensor | None, *, act_format: str | None,
                    out_dtype: torch.dtype) -> torch.Tensor:
    """moe_combine(grouped_gemm(Q(hidden), offsets, weight), order, weights): [N*k, I] -> [..., D]."""
    y = grouped_gemm_any(_quantized(hidden, act_format, input_scale, offsets), offsets, weight, out_dtype)
    flat_weights = weights.reshape(-1, weights.shape[-1])
    out = moe_combine(y, order, flat_weights, flat_weights.shape[0])
    return out.reshape(*weights.shape[:-1], y.shape[-1])


def quant_linear_on_load(x: torch.Tensor | NVFP4Tensor, weight: WeightValue, input_scale: torch.Tensor,
                         bias: torch.Tensor | None, *, act_format: str, out_dtype: torch.dtype) -> torch.Tensor:
    """The `quant_linear` op: linear(quantize(x, input_scale), weight, bias). Codes a fused norm
    wrote are the value `quantize` gave, bit for bit, once scaled: E4M3 codes x (FP8) mean
    x * input_scale; NVFP4 codes (an NVFP4Tensor whose global scale is input_scale) mean their
    dequantized values."""
    if isinstance(x, NVFP4Tensor):
        return linear_any(dequantize_nvfp4(x, torch.float32), weight, bias, out_dtype)
    if x.dtype == torch.float8_e4m3fn:
        return linear_any(x.to(torch.float32) * input_scale.to(torch.float32), weight, bias, out_dtype)
    return linear_any(quantize(x, act_format, input_scale), weight, bias, out_dtype)


def quant_grouped_gemm_on_load(x: torch.Tensor, offsets: torch.Tensor, weight: WeightValue,
                               input_scale: torch.Tensor, *, act_format: str, out_dtype: torch.dtype) -> torch.Tensor:
    """The `quant_grouped_gemm` op: grouped_gemm(quantize(x, input_scale, offsets), offsets, weight)."""
    return grouped_gemm_any(quantize(x, act_format, input_scale, offsets), offsets, weight, out_dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, input_scale: torch.Tensor | None,
                 *, eps: float, act_format: str | None) -> tuple[torch.Tensor | NVFP4Tensor, torch.Tensor]:
    """(out, residual_out): residual_out = residual + x; out = rms_norm(residual_out), quantized
    to act_format (as `quantize`) when given, as codes: for fp8 its E4M3 codes (codes * input_scale
    is the `quantize` result), for nvfp4 an NVFP4Tensor of packed E2M1 codes, E4M3 block scales and
    input_scale as global scale (dequantized, the `quantize` result)."""
    residual_out = add(residual, x)
    normed = rms_norm(residual_out, weight, eps)
    if act_format is None:
        return normed, residual_out
    assert input_scale is not None, "an act_format needs its input_scale"
    if act_format == "fp8":
        return fp8_codes(normed, input_scale), residual_out
    return nvfp4_codes(normed, input_scale), residual_out

