"""nemocompile: compile Nemotron-H checkpoints into engines for a named NVIDIA GPU, and run them.

    import nemocompile
    nemocompile.build("path/to/checkpoint", "engine", target="h100")
    engine = nemocompile.load("engine")
    ids = engine.generate([[1, 2, 3]], max_new_tokens=16)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from nemocompile.runtime.formats import (
        FP8Tensor,
        NVFP4Tensor,
        dequantize_fp8,
        dequantize_nvfp4,
        quantize_fp8,
        quantize_nvfp4,
    )

    from .api import build, load

_FORMATS = ("FP8Tensor", "NVFP4Tensor", "dequantize_fp8", "dequantize_nvfp4", "quantize_fp8", "quantize_nvfp4")
__all__ = [  # noqa: RUF022 (grouped: API, then formats)
    "__version__", "build", "load",
    "FP8Tensor", "NVFP4Tensor", "dequantize_fp8", "dequantize_nvfp4", "quantize_fp8", "quantize_nvfp4",
]


def __getattr__(name: str) -> Any:
    # torch is imported only when the API is used, so `nemocompile --help` starts fast.
    if name in ("build", "load"):
        from . import api

        return getattr(api, name)
    if name in _FORMATS:
        from nemocompile.runtime import formats

        return getattr(formats, name)
    raise AttributeError(f"module 'nemocompile' has no attribute {name!r}")
