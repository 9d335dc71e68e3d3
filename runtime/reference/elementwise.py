"""Dense and pointwise ops: projections, the relu^2 and SiLU activations, the residual add."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight^T + bias``: x [..., K], weight [N, K] (checkpoint layout), bias [N] -> [..., N]."""
    return F.linear(x, weight, bias)


def relu2(x: torch.Tensor) -> torch.Tensor:
    """Squared ReLU, ``max(x, 0)^2``, the activation of Nemotron-H's MLPs and experts."""
    return torch.square(F.relu(x))


def silu(x: torch.Tensor) -> torch.Tensor:
    """SiLU, ``x * sigmoid(x)``, the activation after the Mamba2 convolution."""
    return F.silu(x)


def add(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise sum with torch broadcasting and type promotion (the residual connection)."""
    return a + b
