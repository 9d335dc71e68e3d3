"""IR dtypes <-> torch dtypes."""

from __future__ import annotations

import torch

from nemocompile.base.formats import ir_formats
from nemocompile.graph.checkpoint import TORCH_DTYPE_NAMES
from nemocompile.graph.types import DType

# safetensors dtype string -> torch dtype, for every format this torch build can hold.
SAFETENSORS_TORCH_DTYPES: dict[str, torch.dtype] = {
    key: getattr(torch, name) for key, name in TORCH_DTYPE_NAMES.items() if hasattr(torch, name)}

# IR dtype name -> torch dtype, by the torch dtype names the format registry holds.
TORCH_DTYPES: dict[str, torch.dtype] = {fmt.name: getattr(torch, fmt.torch_name) for fmt in ir_formats()
                                        if fmt.torch_name}


def torch_dtype(dtype: DType | str) -> torch.dtype:
    return TORCH_DTYPES[dtype if isinstance(dtype, str) else dtype.name]


def value_dtype(dtype: DType) -> torch.dtype:
    """The torch dtype the reference runtime holds a value of `dtype` in: a quantized activation
    (the result of `quantize`) as its exact values in fp32; NVFP4 codes a fused norm wrote
    (`nvfp4codes`) as an NVFP4Tensor, whose packed codes are uint8 (runtime/step_results.py checks
    the form)."""
    if dtype.name == "nvfp4codes":
        return torch.uint8
    return torch.float32 if dtype.quantized else torch_dtype(dtype)


def ir_dtype(dtype: torch.dtype) -> str:
    """The IR dtype name of a torch dtype."""
    for name, candidate in TORCH_DTYPES.items():
        if candidate == dtype:
            return name
    raise KeyError(f"no IR dtype for {dtype}")
