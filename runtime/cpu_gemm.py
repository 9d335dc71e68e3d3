"""Float32 GEMMs on the CPU through oneDNN, with each weight packed once when an engine loads.

torch's CPU `F.linear` in float32 calls MKL, whose GEMV (one token: decode) reads weights at
about 9-10 GB/s with 2 threads on the AMD EPYC machines this project runs CI on, where oneDNN's
reads them at 16-25 GB/s (`python bench/bench_runtime.py` shows the effect on whole decode
steps). Decode is bound by reading weights, so the reference runtime multiplies float32 weights
through oneDNN where every op that reads them runs its reference implementation on the CPU.

The product is the reference's (`x @ weight^T + bias`, float32 accumulation); only the order in
which the products are summed differs, so results agree to float32 rounding, not bit for bit.
Packed weights replace the dense ones (one copy in memory, not two). bfloat16 weights are left
as they are: torch already multiplies them through oneDNN. Turned off by the setting
`cpu_onednn_gemm` (NEMOCOMPILE_CPU_ONEDNN_GEMM=0), e.g. to compare against MKL."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise

import torch

from nemocompile.base.settings import settings
from nemocompile.graph.ir import Op
from nemocompile.graph.kernels import REFERENCE


@dataclass(frozen=True, eq=False)
class PackedLinear:
    """A float32 weight [out, in], or stacked experts [E, out, in], multiplied by oneDNN: one
    [out, in] tensor per expert (one in all for a plain weight), packed in oneDNN's layout, or
    views of the dense weight `source` (oneDNN reads a dense weight too; compiled decode steps,
    runtime/compiled_step.py, read `source` themselves)."""

    shape: torch.Size
    packed: tuple[torch.Tensor, ...]
    source: torch.Tensor | None = None

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def dense(self) -> torch.Tensor:
        """The weight as a plain float32 tensor (a copy)."""
        if self.source is not None:
            return self.source.clone()
        pieces = [p.to_dense() for p in self.packed]
        return pieces[0] if len(self.shape) == 2 else torch.stack(pieces)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None, expert: int = 0) -> torch.Tensor:
        """x [..., in] (float32) times expert `expert`'s weight, transposed, plus bias: [..., out]."""
        if x.numel() == 0:
            empty = x.new_zeros(*x.shape[:-1], self.shape[-2])
            return empty if bias is None else empty + bias
        out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed[expert], bias, "none",
                                                               [], "")
        return out

    def grouped(self, x_sorted: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """The `grouped_gemm` of stacked experts: rows offsets[e]:offsets[e+1] of x_sorted [M, in]
        times expert e's weight, transposed: [M, out]."""
        out = x_sorted.new_empty(x_sorted.shape[0], self.shape[1])
        for expert, (begin, end) in enumerate(pairwise(offsets.tolist())):
            if end > begin:
                out[begin:end] = self.linear(x_sorted[begin:end], None, expert)
        return out


def pack(weight: torch.Tensor, dense: bool = False) -> PackedLinear:
    """`weight` (float32 [out, in] or [E, out, in], on the CPU) packed for oneDNN; dense: kept as it
    is (one copy, which compiled decode steps read too) and handed to oneDNN in that layout."""
    if dense:
        weight = weight.contiguous()
        return PackedLinear(weight.shape, (weight,) if weight.ndim == 2 else tuple(weight.unbind(0)), weight)
    experts = [weight] if weight.ndim == 2 else list(weight.unbind(0))
    return PackedLinear(weight.shape, tuple(w.contiguous().to_mkldnn() for w in experts))


# Ops whose reference implementation multiplies a weight as a GEMM, and which operand is the weight.
GEMM_WEIGHT_OPERAND = {"linear": 1, "quant_linear": 1, "grouped_gemm": 2, "quant_grouped_gemm": 2,
                       "moe_expert_up": 3, "moe_expert_down": 3}


def available() -> bool:
    return (settings().cpu_onednn_gemm and torch.backends.mkldnn.is_available()  # type: ignore[no-untyped-call]
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def packable_weights(steps: Sequence[tuple[Op, str]], weights: Mapping[str, object],
                     device: torch.device) -> set[str]:
    """The weights to pack: float32 [out, in] or [E, out, in] tensors on the CPU that only GEMM
    operands read, each in an op that runs its reference implementation. `steps` holds each op
    with the kernel it resolved to (a Triton kernel reads the dense weight itself)."""
    if device.type != "cpu" or not available():
        return set()
    readers: dict[str, list[bool]] = {}
    for op, kernel in steps:
        for index, name in enumerate(op.operands):
            if name is not None and name in weights:
                readers.setdefault(name, []).append(
                    kernel == REFERENCE and GEMM_WEIGHT_OPERAND.get(op.opname) == index)
    chosen = set()
    for name, gemm_only in readers.items():
        value = weights[name]
        if (all(gemm_only) and isinstance(value, torch.Tensor) and value.dtype == torch.float32
                and value.ndim in (2, 3) and value.device.type == "cpu" and value.numel() > 0):
            chosen.add(name)
    return chosen
