"""Shared helpers for the Triton kernel tests: emit kernel instances into a folder laid out as an
engine's kernels/ and load them through the runtime's loader (the interpreter on a CPU), so every
kernel test runs the code path an engine runs."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from nemocompile.codegen.triton.emit import emit
from nemocompile.codegen.triton.spec import KernelInstance
from nemocompile.runtime.kernels.triton_loader import TritonKernels


def interpreted(instances: Sequence[KernelInstance], root: Path) -> TritonKernels:
    """The instances' sources emitted under root/kernels (no binaries) and loaded for the CPU."""
    emit(instances, root, "sm_90", root / "unused-cache", compile_binaries=False)
    return TritonKernels.from_directory(root, "cpu")


def poisoned(*shape: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """An output buffer full of NaN, so any element a kernel does not write fails the comparison."""
    return torch.full(shape, float("nan"), dtype=dtype)


def bf16_ulp(values: torch.Tensor) -> torch.Tensor:
    """The spacing of bf16 numbers at |values| (the smallest normal's spacing near zero)."""
    magnitude = values.float().abs().clamp_min(torch.finfo(torch.bfloat16).tiny)
    return torch.exp2(torch.floor(torch.log2(magnitude)) - 7)


def row_rounding_bound(rows: torch.Tensor, order: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """[N, D]: sum over token t's k rows of |routing weight| x one bf16 ulp of the row (bf16 [N*k, D]
    in dispatch order). The fused down-GEMM rounds each expert row to bf16 as the reference does, but
    its fp32 sums run in another order, so a row may round to the neighbouring bf16 value: that moves
    the combined output by up to this much, which exceeds the output's own ulps where rows cancel."""
    tokens, top_k = weights.shape
    per_row = bf16_ulp(rows) * weights.reshape(-1)[order].abs()[:, None]
    return torch.zeros(tokens, rows.shape[1]).index_add_(0, order // top_k, per_row)


def assert_within_bf16_ulps(actual: torch.Tensor, expected: torch.Tensor, ulps: float, scale_floor: float,
                            extra: torch.Tensor | None = None) -> None:
    """|actual - expected| <= ulps bf16 ulps of max(|expected|, scale_floor) (+ extra), elementwise; no NaN."""
    assert not torch.isnan(actual).any(), "the kernel left elements unwritten (NaN poison) or produced NaN"
    bound = ulps * bf16_ulp(torch.maximum(expected.float().abs(), torch.tensor(scale_floor)))
    if extra is not None:
        bound = bound + extra
    error = (actual.float() - expected.float()).abs()
    worst = int(torch.argmax(error - bound))
    assert bool((error <= bound).all()), (f"element {worst}: {float(actual.flatten()[worst])} vs "
                                          f"{float(expected.flatten()[worst])}, bound {float(bound.flatten()[worst])}")
