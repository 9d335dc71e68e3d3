"""Storing an op's results in the executor's registers, each checked against the dtype its IR
type gives (an implementation that returns another dtype is a bug, named here)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from nemocompile.base.errors import IRError
from nemocompile.graph.ir import Op

from .formats import NVFP4Tensor

if TYPE_CHECKING:
    from .executor import Step


def wrong_result(op: Op, position: int, value: torch.Tensor | NVFP4Tensor, dtype: torch.dtype) -> str | None:
    """Why `value` is not the form of op's result `position` (held as `dtype`, runtime/dtypes.value_dtype),
    or None: a tensor of that dtype, or, for `nvfp4codes`, an NVFP4Tensor (packed codes, block scales,
    global scale)."""
    codes = op.results[position].type.dtype.name == "nvfp4codes"
    if isinstance(value, NVFP4Tensor) if codes else isinstance(value, torch.Tensor) and value.dtype == dtype:
        return None
    form = "NVFP4 codes" if isinstance(value, NVFP4Tensor) else str(value.dtype)
    return f"{op.opname} at {op.scope} produced {form} for %{op.results[position].name}, the IR says " \
           f"{op.results[position].type.dtype}"


def store_results(step: Step, results: Sequence[torch.Tensor | NVFP4Tensor], regs: list[Any]) -> None:
    for position, (index, value, dtype) in enumerate(zip(step.results, results, step.dtypes, strict=True)):
        # (the common case first, cheaply: a tensor of the expected dtype that is not uint8)
        if not (isinstance(value, torch.Tensor) and value.dtype == dtype and dtype != torch.uint8):
            error = wrong_result(step.op, position, value, dtype)
            if error is not None:
                raise IRError(error)
        regs[index] = value
