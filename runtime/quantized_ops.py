"""The deployed numerics of quantized GEMMs, as the reference meaning of `linear` and
`grouped_gemm` with quantized weights:
- W4A16 / W8A16: the dequantized weight times the activations, fp32 accumulation;
- W4A4: activations quantized to NVFP4 per 16-block on the fly (dynamic block scale, static
  global scale `input_scale`), then as above;
- W8A8: activations quantized to FP8 with the static per-tensor scale `input_scale`."""

from __future__ import annotations

import torch

from .formats import (
    FP8Tensor,
    NVFP4Tensor,
    dequantize_fp8,
    dequantize_nvfp4,
    fake_quantize_fp8,
    fake_quantize_nvfp4,
)
from .weights import WeightValue


def dequantized(weight: WeightValue) -> torch.Tensor:
    if isinstance(weight, NVFP4Tensor):
        return dequantize_nvfp4(weight, torch.float32)
    if isinstance(weight, FP8Tensor):
        return dequantize_fp8(weight, torch.float32)
    return weight.float()


def quantize_activations(x: torch.Tensor, act_format: str | None, scale: torch.Tensor | None) -> torch.Tensor:
    """x in fp32, quantized and dequantized as the deployed kernel sees it. `scale` is [] or per
    row [rows, 1]."""
    if act_format is None:
        return x
    assert scale is not None
    if act_format == "nvfp4":
        return fake_quantize_nvfp4(x, scale)
    return fake_quantize_fp8(x, scale)


def quant_linear(x: torch.Tensor, weight: WeightValue, bias: torch.Tensor | None, input_scale: torch.Tensor | None,
                 act_format: str | None) -> torch.Tensor:
    activations = quantize_activations(x.float(), act_format, input_scale)
    out = activations @ dequantized(weight).T
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


def quant_grouped_gemm(x_sorted: torch.Tensor, offsets: torch.Tensor, weight: WeightValue,
                       input_scale: torch.Tensor | None, act_format: str | None) -> torch.Tensor:
    full = dequantized(weight)  # [E, out, in]
    out = torch.zeros(x_sorted.shape[0], full.shape[1], dtype=torch.float32, device=x_sorted.device)
    bounds = offsets.tolist()
    for expert in range(full.shape[0]):
        start, end = bounds[expert], bounds[expert + 1]
        if start == end:
            continue
        rows = x_sorted[start:end].float()
        scale = input_scale[expert] if input_scale is not None else None
        out[start:end] = quantize_activations(rows, act_format, scale) @ full[expert].T
    return out.to(x_sorted.dtype)
