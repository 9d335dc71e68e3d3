"""RMS norms of Nemotron-H: the plain one around every block and the gated one inside Mamba2."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Root-mean-square norm over the last axis: ``weight * x / sqrt(mean(x^2) + eps)``.

    x is [..., D], weight [D]; the result has x's shape and dtype. The statistics and the
    weight multiply run in float32 and only the product is cast back (unlike Llama, which
    casts before multiplying by the weight).
    """
    if x.dtype == weight.dtype == torch.float32:  # torch's fused kernel: the same operations, one call
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    x32 = x.to(torch.float32)
    variance = x32.pow(2).mean(-1, keepdim=True)
    normed = x32 * torch.rsqrt(variance + eps)
    return (weight.to(torch.float32) * normed).to(x.dtype)


def gated_rms_norm(
    x: torch.Tensor,
    gate: torch.Tensor | None,
    weight: torch.Tensor,
    group_size: int,
    eps: float,
) -> torch.Tensor:
    """Gate, then RMS-normalise each group of ``group_size`` channels: the Mamba2 output norm.

    x and gate are [..., D] with D a multiple of group_size, weight [D]. Computes
    ``y = x * silu(gate)`` in float32, divides every group of y by its RMS, casts back to
    x's dtype and only then multiplies by the weight, so the result has the dtype that
    ``weight * x`` promotes to (float32 for a float32 weight even when x is bfloat16).
    """
    input_dtype = x.dtype
    gated = x.to(torch.float32)
    if gate is not None:
        gated = gated * F.silu(gate.to(torch.float32))
    *prefix, width = gated.shape
    if width % group_size != 0:
        raise ValueError(f"gated_rms_norm: width {width} is not a multiple of group_size {group_size}.")
    groups = gated.view(*prefix, width // group_size, group_size)
    normed = F.rms_norm(groups, (group_size,), None, eps).view(*prefix, width)  # x * rsqrt(mean(x^2) + eps)
    return weight * normed.to(input_dtype)
