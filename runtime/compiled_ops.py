"""Implementations of decode-step ops written for torch.compile (runtime/compiled_step.py): each
computes its op's reference result (runtime/reference_dispatch.py), but with no host
synchronisation, no shape that depends on tensor values and no Python loop over experts, so that
Inductor traces a run of them as one graph and fuses it into a few C++ loops.

- A float32 GEMM of a few rows (decode) is written as a reduction over K per output element:
  Inductor turns it into one vectorised, multi-threaded pass over the weight, which reads it at
  about 30 GB/s on the project's 2-core machines, against 16-23 GB/s for oneDNN's GEMV and 9 GB/s
  for MKL's. Beyond GEMV_MAX_ROWS rows, and for bf16 weights (whose Inductor reduction reads
  6.7 GB/s against oneDNN's 10), it stays `F.linear`.
- Routed experts (float32 weights; bf16 ones stay with the eager grouped GEMM, as for linear) are
  computed per (token, slot) pair against that pair's expert's weight, read in place by index:
  the same products as the grouped GEMM's, with no dispatch loop, as long as there are at most
  PAIRS_MAX pairs. Beyond that the reference implementation runs (torch.compile then splits the
  graph around its host-side loop). The route op is the reference's: its expert counting switches
  to comparisons when traced (runtime/reference/moe.py).

Products and sums are the reference's in float32 (bf16 operands widen first, one rounding at the
end, as the reference's oneDNN GEMMs accumulate); only the summation order differs, so results
agree to float32 rounding, not bit for bit: the tests state the tolerance."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nemocompile.graph.ir import Op

from .reference import fused
from .reference_dispatch import REFERENCE, Args, OpImpl, Result, _opt, _t

GEMV_MAX_ROWS = 8  # rows up to which a GEMM is written as a reduction (decode batches)
PAIRS_MAX = 64  # (token, expert) pairs up to which routed experts are computed per pair


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] times weight [N, K] transposed, plus bias, in x's dtype: as one reduction per
    output element for a few rows, else F.linear."""
    rows = x.reshape(-1, x.shape[-1])
    if rows.shape[0] > GEMV_MAX_ROWS or weight.dtype != torch.float32:  # bf16: oneDNN's GEMV is faster
        return F.linear(x, weight, bias)
    # one reduction per row over the same weight: Inductor fuses them into one pass over it, and
    # each stays parallel over the outputs
    wide = weight.float()
    acc = torch.stack([(wide * row.float()).sum(-1) for row in rows.unbind(0)])
    out = acc if bias is None else acc + bias.float()
    return out.reshape(*x.shape[:-1], weight.shape[0]).to(x.dtype)


def _linear(op: Op, a: Args) -> tuple[torch.Tensor, ...]:
    return (gemv(_t(a[0]), _t(a[1]), _opt(a[2])),)


def _expert_of_row(offsets: torch.Tensor, rows: int) -> torch.Tensor:
    """The expert of each of `rows` rows in expert order: row r belongs to expert e when
    offsets[e] <= r < offsets[e+1] (offsets [E+1])."""
    row = torch.arange(rows, device=offsets.device)
    return (row[:, None] >= offsets[None, 1:]).sum(1)


def _pairs_gemm(rows: torch.Tensor, weight: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """Row r of rows [M, K] times weight[experts[r]] [N, K] transposed: [M, N] in rows' dtype."""
    return (weight[experts].float() * rows.float()[:, None, :]).sum(-1).to(rows.dtype)


def _moe_expert_up(op: Op, a: Args) -> tuple[Result, ...]:
    x, order, offsets, weight = _t(a[0]), _t(a[1]), _t(a[2]), _t(a[3])
    if order.shape[0] > PAIRS_MAX:
        return REFERENCE["moe_expert_up"](op, a)
    rows = x.reshape(-1, x.shape[-1])[order // op.attrs.int("top_k")]
    hidden = _pairs_gemm(rows, weight, _expert_of_row(offsets, rows.shape[0]))
    return (fused.activation(hidden, op.attrs.str("activation")),)


def _moe_expert_down(op: Op, a: Args) -> tuple[Result, ...]:
    """The pairs' outputs, put back in (token, slot) order and summed over slots with the routing
    weights in float32 (the reference sums them in expert order)."""
    hidden, order, offsets, weight, weights = _t(a[0]), _t(a[1]), _t(a[2]), _t(a[3]), _t(a[4])
    if order.shape[0] > PAIRS_MAX or order.shape[0] != weights.numel():  # (not every pair: a rank's share)
        return REFERENCE["moe_expert_down"](op, a)
    y = _pairs_gemm(hidden, weight, _expert_of_row(offsets, hidden.shape[0]))  # expert order
    flat_weights = weights.reshape(-1, weights.shape[-1])
    tokens, top_k = flat_weights.shape
    position = torch.empty_like(order)
    position[order] = torch.arange(order.shape[0], device=order.device)  # pair t*k+j -> its row
    pairs = y[position].reshape(tokens, top_k, -1)
    out = (pairs * flat_weights[..., None]).sum(1).to(y.dtype)
    return (out.reshape(*weights.shape[:-1], y.shape[-1]),)


# Ops whose reference implementation torch.compile cannot trace whole, or traces into slow code.
TRACEABLE: dict[str, OpImpl] = {
    "linear": _linear,
    "moe_expert_up": _moe_expert_up,
    "moe_expert_down": _moe_expert_down,
}
