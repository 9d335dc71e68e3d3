"""Runs each core op by its reference implementation (`runtime/reference`), the executable
meaning of the op. Adapts IR operands/attributes/state slots to the plain torch functions."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from nemocompile.base.errors import IRError
from nemocompile.graph.ir import Op

from . import reference as ref
from .dtypes import torch_dtype
from .formats import NVFP4Tensor
from .quantized_ops import quantize, quantize_dynamic
from .reference import comm, fused
from .weights import WeightValue

Args = Sequence[WeightValue | None]
# An implementation takes the op and its operand values and returns its results; an op with state
# operands returns their new content among its results (the executor binds it back to the cache).
# Results are tensors, but for NVFP4 codes a fused norm hands its GEMM (IR `nvfp4codes`): an
# NVFP4Tensor, as NVFP4 weights are held.
Result = torch.Tensor | NVFP4Tensor
OpImpl = Callable[[Op, Args], tuple[Result, ...]]


def _t(value: WeightValue | None) -> torch.Tensor:
    assert isinstance(value, torch.Tensor)
    return value


def _opt(value: WeightValue | None) -> torch.Tensor | None:
    """An optional plain-tensor operand (bias, input_scale)."""
    assert value is None or isinstance(value, torch.Tensor)
    return value


def _w(value: WeightValue | None) -> WeightValue:
    assert value is not None
    return value


def _embedding(op: Op, a: Args) -> tuple[torch.Tensor, ...]:
    return (F.embedding(_t(a[0]), _t(a[1])),)


def _rms_norm(op: Op, a: Args) -> tuple[torch.Tensor, ...]:
    return (ref.rms_norm(_t(a[0]), _t(a[1]), op.attrs.float("eps")),)


def _result_dtype(op: Op) -> torch.dtype:
    return torch_dtype(op.results[0].type.dtype)


def _linear(op: Op, a: Args) -> tuple[torch.Tensor, ...]:
    return (fused.linear_any(_t(a[0]), _w(a[1]), _opt(a[2]), _result_dtype(op)),)


def _quantize_dynamic(op: Op, a: Args) -> tuple[torch.Tensor, ...]:
    return (quantize_dynamic(_t(a[0]), op.attrs.str("format"), _opt(a[1])),)


def _quantize(op: Op, a: Args) -> tuple[torch.Tensor, ...]:
    return (quantize(_t(a[0]), op.attrs.str("format"), _t(a[1]), _opt(a[2])),)


def _add(op: Op, a: Args) -> tuple[torch.Tensor, ...]:
    return (ref.add(_t(a[0]), _t(a[1])),)


def _cast(op: Op, a: Args) -> tuple[torch.Tensor, ...]:
    return (_t(a[0]).to(torch_dtype(op.attrs.str("dtype"))),)


def _activation(op: Op, a: Args) -> tuple[torch.Tensor, ...]:
    kind = op.attrs.str("kind")
    return (ref.relu2(_t(a[0])) if kind == "relu2" else ref.silu(_t(a[0])),)


def _split(op: Op, a: Args) -> tuple[torch.Tensor, ...]:
    return tuple(torch.split(_t(a[0]), list(op.attrs.ints("sizes")), dim=-1))


def _gated_rms_norm(op: Op, a: Args) -> tuple[torch.Tensor, ...]:
    return (ref.gated_rms_norm(_t(a[0]), _t(a[1]), _t(a[2]), op.attrs.int("group_size"), op.attrs.float("eps")),)


def _seq_lens(a: Args, index: int) -> torch.Tensor | None:
    """The optional seq_lens operand (right padding), absent from graphs written before it existed."""
    return _opt(a[index]) if len(a) > index else None


def _causal_conv1d(op: Op, a: Args) -> tuple[torch.Tensor, ...]:
    activation = op.attrs.get("activation")
    state = _t(a[3])
    y, new_state = ref.causal_conv1d(_t(a[0]), _t(a[1]), _opt(a[2]),
                                     activation if isinstance(activation, str) else None, state,
                                     _seq_lens(a, 4))
    return y, new_state.to(state.dtype)


def _ssd_attrs(op: Op) -> dict[str, int | float]:
    at = op.attrs
    return {"num_heads": at.int("num_heads"), "head_dim": at.int("head_dim"), "n_groups": at.int("n_groups"),
            "state_size": at.int("state_size"), "dt_min": at.float("dt_min"), "dt_max": at.float("dt_max")}


def _ssd_chunk_scan(op: Op, a: Args) -> tuple[torch.Tensor, ...]:
    x, dt, a_log, b, c, d, dt_bias, state = (_t(v) for v in a[:8])
    y, new_state = ref.ssd_chunk_scan(x, dt, a_log, b, c, d, dt_bias, chunk_size=op.attrs.int("chunk_size"),
                                      initial_state=state, seq_lens=_seq_lens(a, 8),
                                      **_ssd_attrs(op))  # type: ignore[arg-type]
    return y, new_state.to(state.dtype)


def _ssd_state_update(op: Op, a: Args) -> tuple[torch.Tensor, ...]:
    x, dt, a_log, b, c, d, dt_bias, state = (_t(v) for v in a[:8])
    y, new_state = ref.ssd_state_update(x, dt, a_log, b, c, d, dt_bias, state=state, seq_lens=_seq_lens(a, 8),
                                        **_ssd_attrs(op))  # type: ignore[arg-type]
    return y, new_state.to(state.dtype)


def _attention_gqa(op: Op, a: Args) -> tuple[torch.Tensor, ...]:
    at = op.attrs
    return ref.attention_gqa_cached(
        _t(a[0]), _t(a[1]), _t(a[2]), _t(a[3]), _t(a[4]), _t(a[5]), num_heads=at.int("num_heads"),
        num_kv_heads=at.int("num_kv_heads"), head_dim=at.int("head_dim"), scale=at.float("scale"),
        k_scale=_opt(a[6] if len(a) > 6 else None), v_scale=_opt(a[7] if len(a) > 7 else None))


def _moe_router(op: Op, a: Args) -> tuple[torch.Tensor, ...]:
    x = _t(a[0])
    at = op.attrs
    weights, ids = ref.moe_router(x.reshape(-1, x.shape[-1]), _t(a[1]), _t(a[2]), top_k=at.int("top_k"),
                                  n_group=at.int("n_group"), topk_group=at.int("topk_group"),
                                  norm_topk_prob=at.bool("norm_topk_prob"),
                                  routed_scaling_factor=at.float("routed_scaling_factor"))
    shape = (*x.shape[:-1], weights.shape[-1])
    return weights.reshape(shape), ids.reshape(shape)


def _moe_dispatch(op: Op, a: Args) -> tuple[torch.Tensor, ...]:
    x, ids = _t(a[0]), _t(a[1])
    return ref.moe_dispatch(x.reshape(-1, x.shape[-1]), ids.reshape(-1, ids.shape[-1]),
                            op.attrs.int("num_experts"))


def _grouped_gemm(op: Op, a: Args) -> tuple[torch.Tensor, ...]:
    return (fused.grouped_gemm_any(_t(a[0]), _t(a[1]), _w(a[2]), _result_dtype(op)),)


def _moe_combine(op: Op, a: Args) -> tuple[torch.Tensor, ...]:
    y, order, weights = _t(a[0]), _t(a[1]), _t(a[2])
    flat_weights = weights.reshape(-1, weights.shape[-1])
    out = ref.moe_combine(y, order, flat_weights, flat_weights.shape[0])
    return (out.reshape(*weights.shape[:-1], y.shape[-1]),)


# ---------------------------------------------------------------- fused ops (runtime/reference/fused.py)


def _act_format(op: Op) -> str | None:
    value = op.attrs.get("act_format")
    return value if isinstance(value, str) else None


def _moe_route(op: Op, a: Args) -> tuple[torch.Tensor, ...]:
    at = op.attrs
    return fused.moe_route(_t(a[0]), _t(a[1]), _opt(a[2]), top_k=at.int("top_k"), n_group=at.int("n_group"),
                           topk_group=at.int("topk_group"), norm_topk_prob=at.bool("norm_topk_prob"),
                           routed_scaling_factor=at.float("routed_scaling_factor"),
                           num_experts=at.int("num_experts"))


def _moe_expert_up(op: Op, a: Args) -> tuple[torch.Tensor, ...]:
    return (fused.moe_expert_up(_t(a[0]), _t(a[1]), _t(a[2]), _w(a[3]), _opt(a[4]), top_k=op.attrs.int("top_k"),
                                activation_kind=op.attrs.str("activation"), act_format=_act_format(op),
                                out_dtype=_result_dtype(op)),)


def _moe_expert_down(op: Op, a: Args) -> tuple[torch.Tensor, ...]:
    return (fused.moe_expert_down(_t(a[0]), _t(a[1]), _t(a[2]), _w(a[3]), _t(a[4]), _opt(a[5]),
                                  act_format=_act_format(op), out_dtype=_result_dtype(op)),)


def _activation_or_codes(value: WeightValue | None) -> torch.Tensor | NVFP4Tensor:
    """An activation operand that may be NVFP4 codes (a fused norm's nvfp4codes output)."""
    assert isinstance(value, torch.Tensor | NVFP4Tensor)
    return value


def _quant_linear(op: Op, a: Args) -> tuple[torch.Tensor, ...]:
    return (fused.quant_linear_on_load(_activation_or_codes(a[0]), _w(a[1]), _t(a[2]), _opt(a[3]), act_format=op.attrs.str("act_format"),
                                       out_dtype=_result_dtype(op)),)


def _quant_grouped_gemm(op: Op, a: Args) -> tuple[torch.Tensor, ...]:
    return (fused.quant_grouped_gemm_on_load(_t(a[0]), _t(a[1]), _w(a[2]), _t(a[3]),
                                             act_format=op.attrs.str("act_format"), out_dtype=_result_dtype(op)),)


def _add_rms_norm(op: Op, a: Args) -> tuple[Result, ...]:
    return fused.add_rms_norm(_t(a[0]), _t(a[1]), _t(a[2]), _opt(a[3]), eps=op.attrs.float("eps"),
                              act_format=_act_format(op))


# ---------------------------------------------------------------- communication (runtime/reference/comm.py)


def _mesh(op: Op) -> tuple[str, int]:
    return op.attrs.str("axis"), op.attrs.int("parts")


def _all_reduce(op: Op, a: Args) -> tuple[torch.Tensor, ...]:
    return (comm.all_reduce(_t(a[0]), *_mesh(op)),)


def _all_gather(op: Op, a: Args) -> tuple[torch.Tensor, ...]:
    return (comm.all_gather(_t(a[0]), *_mesh(op), op.attrs.int("dim")),)


def _reduce_scatter(op: Op, a: Args) -> tuple[torch.Tensor, ...]:
    return (comm.reduce_scatter(_t(a[0]), *_mesh(op), op.attrs.int("dim")),)


def _all_to_all(op: Op, a: Args) -> tuple[torch.Tensor, ...]:
    return (comm.all_to_all(_t(a[0]), *_mesh(op), op.attrs.int("dim")),)


def _vocab_embedding(op: Op, a: Args) -> tuple[torch.Tensor, ...]:
    return (comm.vocab_embedding(_t(a[0]), _t(a[1]), *_mesh(op)),)


def _local_experts(op: Op, a: Args) -> tuple[torch.Tensor, ...]:
    return comm.local_experts(_t(a[0]), _t(a[1]), *_mesh(op), op.attrs.int("num_experts"))


REFERENCE: dict[str, OpImpl] = {
    "all_reduce": _all_reduce,
    "all_gather": _all_gather,
    "reduce_scatter": _reduce_scatter,
    "all_to_all": _all_to_all,
    "vocab_embedding": _vocab_embedding,
    "local_experts": _local_experts,
    "embedding": _embedding,
    "rms_norm": _rms_norm,
    "linear": _linear,
    "quantize": _quantize,
    "quantize_dynamic": _quantize_dynamic,
    "add": _add,
    "cast": _cast,
    "activation": _activation,
    "split": _split,
    "gated_rms_norm": _gated_rms_norm,
    "causal_conv1d": _causal_conv1d,
    "ssd_chunk_scan": _ssd_chunk_scan,
    "ssd_state_update": _ssd_state_update,
    "attention_gqa": _attention_gqa,
    "moe_router": _moe_router,
    "moe_dispatch": _moe_dispatch,
    "grouped_gemm": _grouped_gemm,
    "moe_combine": _moe_combine,
    "moe_route": _moe_route,
    "moe_expert_up": _moe_expert_up,
    "moe_expert_down": _moe_expert_down,
    "quant_linear": _quant_linear,
    "quant_grouped_gemm": _quant_grouped_gemm,
    "add_rms_norm": _add_rms_norm,
}


def reference_impl(opname: str) -> OpImpl:
    """The reference implementation of an op: its own for a core op; for a composite op (a block,
    a fused op), the composition of the core references its decomposition names."""
    if opname in REFERENCE:
        return REFERENCE[opname]
    from .composite import composite_impl  # composite runs ops through this module

    found = composite_impl(opname)
    if found is None:
        raise IRError(f"op '{opname}' has no reference implementation and no decomposition")
    return found
