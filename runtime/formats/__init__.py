"""Number formats of the engine's weights and activations: NVFP4 and FP8 E4M3, bit for bit as NVIDIA ModelOpt."""

from __future__ import annotations

from nemocompile.runtime.formats.fp8 import (
    E4M3_MAX,
    FP8Tensor,
    dequantize_fp8,
    fake_quantize_fp8,
    fp8_codes,
    fp8_scale,
    quantize_fp8,
    quantize_fp8_measured,
    quantize_fp8_stacked,
)
from nemocompile.runtime.formats.nvfp4 import (
    BLOCK_SIZE,
    E2M1_VALUES,
    NVFP4Tensor,
    dequantize_nvfp4,
    fake_quantize_nvfp4,
    nvfp4_codes,
    nvfp4_global_scale,
    quantize_nvfp4,
    quantize_nvfp4_measured,
    quantize_nvfp4_stacked,
)

__all__ = [
    "BLOCK_SIZE",
    "E2M1_VALUES",
    "E4M3_MAX",
    "FP8Tensor",
    "NVFP4Tensor",
    "dequantize_fp8",
    "dequantize_nvfp4",
    "fake_quantize_fp8",
    "fake_quantize_nvfp4",
    "fp8_codes",
    "fp8_scale",
    "nvfp4_codes",
    "nvfp4_global_scale",
    "quantize_fp8",
    "quantize_fp8_measured",
    "quantize_fp8_stacked",
    "quantize_nvfp4",
    "quantize_nvfp4_measured",
    "quantize_nvfp4_stacked",
]
