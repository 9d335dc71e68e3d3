"""IR dtypes <-> torch dtypes."""

from __future__ import annotations

import torch

from nemocompile.base.formats import ir_formats
from nemocompile.graph.types import DType

# IR dtype name -> torch dtype, by the torch dtype names the format registry holds.
TORCH_DTYPES: dict[str, torch.dtype] = {fmt.name: getattr(torch, fmt.torch_name) for fmt in ir_formats()
                                        if fmt.torch_name}


def torch_dtype(dtype: DType | str) -> torch.dtype:
    return TORCH_DTYPES[dtype if isinstance(dtype, str) else dtype.name]
