"""Launchers of the norm, Mamba, attention and router kernels: they adapt an op's operands and
attributes (as the executor passes them) to the wrappers of runtime/kernels/triton_ops.py and return
the op's results as its reference implementation does (runtime/reference_dispatch.py). The GEMM
launchers are in triton_backend.py, which collects both in LAUNCHERS."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from nemocompile.base.errors import EngineError
from nemocompile.graph.ir import Op

from ..formats import NVFP4Tensor
from ..reference_dispatch import Args, Result
from . import triton_ops
from .triton_loader import TritonKernels

Launcher = Callable[[TritonKernels, Sequence[str], Op, Args], tuple[Result, ...]]


def _t(op: Op, args: Args, index: int) -> torch.Tensor:
    value = args[index] if index < len(args) else None
    if not isinstance(value, torch.Tensor):
        raise EngineError(f"{op.opname} at {op.scope}: operand {index} must be a tensor, got {type(value).__name__}")
    return value


def _opt(args: Args, index: int) -> torch.Tensor | None:
    value = args[index] if index < len(args) else None
    return value if isinstance(value, torch.Tensor) else None


def rms_norm(kernels: TritonKernels, names: Sequence[str], op: Op, args: Args) -> tuple[torch.Tensor, ...]:
    (out,), _ = triton_ops.add_rms_norm(kernels, names[0], _t(op, args, 0), None, _t(op, args, 1),
                                        op.attrs.float("eps"))
    return (out,)


def add_rms_norm(kernels: TritonKernels, names: Sequence[str], op: Op, args: Args) -> tuple[Result, ...]:
    """(out, residual_out), as the kernel wrote them: a quantized out is codes, which the quant_linear
    after it reads with the same input_scale. FP8: the E4M3 codes (the IR's fp8e4m3); NVFP4: the
    packed E2M1 codes and E4M3 block scales as an NVFP4Tensor under input_scale (the IR's nvfp4codes)."""
    scale = _opt(args, 3)
    outs, residual = triton_ops.add_rms_norm(kernels, names[0], _t(op, args, 0), _t(op, args, 1), _t(op, args, 2),
                                             op.attrs.float("eps"), scale)
    if len(outs) == 2:
        assert scale is not None  # the wrapper refuses a quantizing kernel without one
        return NVFP4Tensor(outs[0], outs[1], scale.reshape(()).float()), residual
    return outs[0], residual


def gated_rms_norm(kernels: TritonKernels, names: Sequence[str], op: Op, args: Args) -> tuple[torch.Tensor, ...]:
    return (triton_ops.gated_rms_norm(kernels, names[0], _t(op, args, 0), _t(op, args, 1), _t(op, args, 2),
                                      op.attrs.float("eps")),)


def causal_conv1d(kernels: TritonKernels, names: Sequence[str], op: Op, args: Args) -> tuple[torch.Tensor, ...]:
    return triton_ops.causal_conv1d(kernels, names[0], _t(op, args, 0), _t(op, args, 1), _opt(args, 2),
                                    _t(op, args, 3), seq_lens=_opt(args, 4))


def _ssd_sizes(op: Op) -> dict[str, int | float]:
    at = op.attrs
    return {"num_heads": at.int("num_heads"), "head_dim": at.int("head_dim"), "n_groups": at.int("n_groups"),
            "state_size": at.int("state_size"), "dt_min": at.float("dt_min"), "dt_max": at.float("dt_max")}


def ssd_chunk_scan(kernels: TritonKernels, names: Sequence[str], op: Op, args: Args) -> tuple[torch.Tensor, ...]:
    state = _t(op, args, 7)
    y, final = triton_ops.ssd_chunk_scan(kernels, names[0], *(_t(op, args, i) for i in range(7)),
                                         initial_state=state, seq_lens=_opt(args, 8),
                                         **_ssd_sizes(op))  # type: ignore[arg-type]
    return y, final.to(state.dtype)


def ssd_state_update(kernels: TritonKernels, names: Sequence[str], op: Op, args: Args) -> tuple[torch.Tensor, ...]:
    state = _t(op, args, 7)
    y, new_state = triton_ops.ssd_state_update(kernels, names[0], *(_t(op, args, i) for i in range(7)), state=state,
                                               seq_lens=_opt(args, 8), **_ssd_sizes(op))  # type: ignore[arg-type]
    return y, new_state.to(state.dtype)


def attention_gqa(kernels: TritonKernels, names: Sequence[str], op: Op, args: Args) -> tuple[torch.Tensor, ...]:
    at = op.attrs
    return triton_ops.attention_gqa_cached(
        kernels, names[0], names[1], *(_t(op, args, i) for i in range(6)), num_heads=at.int("num_heads"),
        num_kv_heads=at.int("num_kv_heads"), head_dim=at.int("head_dim"), scale=at.float("scale"),
        k_scale=_opt(args, 6), v_scale=_opt(args, 7))


def moe_route(kernels: TritonKernels, names: Sequence[str], op: Op, args: Args) -> tuple[torch.Tensor, ...]:
    x = _t(op, args, 0)
    weights, ids, offsets, order = triton_ops.moe_route(
        kernels, names[0], names[1], x, _t(op, args, 1), _opt(args, 2),
        routed_scaling_factor=op.attrs.float("routed_scaling_factor"))
    shape = (*x.shape[:-1], weights.shape[-1])
    return weights.view(shape), ids.view(shape), offsets, order


OP_LAUNCHERS: dict[str, Launcher] = {
    "triton_rms_norm": rms_norm,
    "triton_add_rms_norm": add_rms_norm,
    "triton_gated_rms_norm": gated_rms_norm,
    "triton_causal_conv1d": causal_conv1d,
    "triton_ssd_chunk_scan": ssd_chunk_scan,
    "triton_ssd_state_update": ssd_state_update,
    "triton_attention_gqa": attention_gqa,
    "triton_moe_route": moe_route,
}
