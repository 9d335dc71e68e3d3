"""IR dtypes <-> torch dtypes."""

from __future__ import annotations

import torch

from nemocompile.graph.types import DType

TORCH_DTYPES: dict[str, torch.dtype] = {
    "f32": torch.float32,
    "bf16": torch.bfloat16,
    "f16": torch.float16,
    "fp8e4m3": torch.float8_e4m3fn,
    "i64": torch.int64,
    "i32": torch.int32,
    "u8": torch.uint8,
    "bool": torch.bool,
}


def torch_dtype(dtype: DType | str) -> torch.dtype:
    return TORCH_DTYPES[dtype if isinstance(dtype, str) else dtype.name]
