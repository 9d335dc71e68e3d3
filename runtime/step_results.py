"""Storing an op's results in the executor's registers, each checked against the dtype its IR
type gives (an implementation that returns another dtype is a bug, named here)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from nemocompile.base.errors import IRError

if TYPE_CHECKING:
    from .executor import Step


def store_results(step: Step, results: Sequence[torch.Tensor], regs: list[Any]) -> None:
    for position, (index, tensor, dtype) in enumerate(zip(step.results, results, step.dtypes, strict=True)):
        if tensor.dtype != dtype:
            op = step.op
            raise IRError(f"{op.opname} at {op.scope} produced {tensor.dtype} for %{op.results[position].name}, "
                          f"the IR says {op.results[position].type.dtype}")
        regs[index] = tensor
