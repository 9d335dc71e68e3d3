"""Mamba2 in standard ONNX: the causal depthwise convolution (a grouped Conv over the conv window
followed by the new tokens), the SSD chunked scan written out as runtime/reference/ssd.py computes
it (chunks, segment sums, einsums, the carry across chunks) and the one-token recurrence with the
decode path's dtype steps."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from nemocompile.graph.ir import Op
from nemocompile.graph.opdef import operand
from nemocompile.graph.types import F32, DType

from .context import Lowering

INT64_MAX = int(np.iinfo(np.int64).max)


def _req(op: Op, name: str) -> str:
    found = operand(op, name)
    assert found is not None, f"{op.opname} without {name}"
    return found


def _promote(a: DType, b: DType) -> DType:
    """torch's promotion between two float dtypes (only bf16/f16/f32 occur here)."""
    return a if a == b else F32


def causal_conv1d(low: Lowering, op: Op) -> None:
    b = low.b
    x, weight, bias, state = _req(op, "x"), _req(op, "weight"), operand(op, "bias"), _req(op, "conv_state")
    kernel = low.static(weight, -1)
    channels = low.static(weight, 0)
    x_type, state_type, weight_type = low.type_of(x).dtype, low.type_of(state).dtype, low.type_of(weight).dtype
    history_dtype = _promote(x_type, state_type)
    x_cf = b.one("Transpose", [low.value(x)], perm=[0, 2, 1])
    history = b.one("Concat", [b.round_to(low.value(state), history_dtype), b.round_to(x_cf, history_dtype)], axis=2)
    new_state = b.one("Slice", [history, b.ints([-(kernel - 1)]), b.ints([INT64_MAX]), b.ints([2])])
    taps = b.one("Reshape", [low.value(weight), b.ints([channels, 1, kernel])])
    inputs = [b.round_to(history, weight_type), taps]
    if bias is not None:
        inputs.append(low.value(bias))
    y = b.round_to(b.one("Conv", inputs, group=channels, kernel_shape=[kernel]), weight_type)
    if op.attrs.get("activation") == "silu":
        y = b.round_to(b.one("Mul", [y, b.one("Sigmoid", [y])]), weight_type)
    low.bind(op, [b.one("Transpose", [y], perm=[0, 2, 1]), new_state])


def _step_size(low: Lowering, dt32: str, dt_bias: str, dtype: DType, dt_min: float, dt_max: float) -> str:
    """clamp(softplus(dt + dt_bias), dt_min, dt_max) with each step rounded to dt's dtype."""
    b = low.b
    total = b.round_to(b.one("Add", [dt32, b.round_to(low.value(dt_bias), dtype)]), dtype)
    soft = b.round_to(b.one("Softplus", [total]), dtype)
    clip_min = b.scalar(dt_min)
    clip_max = b.scalar(dt_max) if np.isfinite(dt_max) else ""
    clipped = b.one("Clip", [soft, clip_min, clip_max] if clip_max else [soft, clip_min])
    return b.round_to(clipped, dtype)


def _heads(low: Lowering, bc32: str, leading: list[int], groups: int, heads: int, state_size: int) -> str:
    """B or C [..., G*N] -> [..., H, N], head h reading group h // (H / G)."""
    b = low.b
    per_group = heads // groups
    split = b.one("Reshape", [bc32, b.ints([*leading, groups, 1, state_size])])
    ones = b.const(np.ones((per_group, 1), dtype=np.float32))
    return b.one("Reshape", [b.one("Mul", [split, ones]), b.ints([*leading, heads, state_size])])


def _segment_sum(low: Lowering, log_decay: str, lower_strict: str, lower: str) -> str:
    """[..., L] -> [..., L, L]: out[i, j] = sum log_decay[j+1..i] for j <= i, -inf above."""
    b = low.b
    terms = b.one("Where", [lower_strict, b.one("Unsqueeze", [log_decay, b.ints([-1])]), b.scalar(0.0)])
    summed = b.one("CumSum", [terms, b.i64(-2)])
    return b.one("Where", [lower, summed, b.scalar(-np.inf)])


def _masks(low: Lowering, size: int | str, like: str = "") -> tuple[str, str]:
    """(i > j, i >= j) over [size, size]; a symbolic size is read from `like`'s last dim."""
    b = low.b
    if isinstance(size, int):
        i = np.arange(size)
        return b.const(i[:, None] > i[None, :]), b.const(i[:, None] >= i[None, :])
    count = b.one("Gather", [b.one("Shape", [like]), b.i64(-1)], axis=0)
    index = b.one("Range", [b.i64(0), count, b.i64(1)])
    rows, cols = b.one("Unsqueeze", [index, b.ints([1])]), b.one("Unsqueeze", [index, b.ints([0])])
    return b.one("Greater", [rows, cols]), b.one("GreaterOrEqual", [rows, cols])


def ssd_chunk_scan(low: Lowering, op: Op) -> None:
    b = low.b
    at = op.attrs
    heads, head_dim, groups, n = (at.int(k) for k in ("num_heads", "head_dim", "n_groups", "state_size"))
    chunk = at.int("chunk_size")
    x, dt, a_log, big_b, big_c, d, dt_bias, state = (
        _req(op, k) for k in ("x", "dt", "A_log", "B", "C", "D", "dt_bias", "ssm_state"))
    step = _step_size(low, low.value(dt), dt_bias, low.type_of(dt).dtype, at.float("dt_min"), at.float("dt_max"))
    a = b.one("Neg", [b.one("Exp", [low.value(a_log)])])  # [H]
    xs = b.one("Reshape", [low.value(x), b.ints([0, 0, heads, head_dim])])  # [b, T, H, P]
    bh = _heads(low, low.value(big_b), [0, 0], groups, heads, n)  # [b, T, H, N]
    ch = _heads(low, low.value(big_c), [0, 0], groups, heads, n)
    skip = b.one("Mul", [b.one("Unsqueeze", [low.value(d), b.ints([1])]), xs])

    # pad time to a multiple of the chunk size (padded steps have dt = 0: no decay, no input)
    length = b.one("Gather", [b.one("Shape", [xs]), b.i64(1)], axis=0)
    chunk_c = b.i64(chunk)
    pad = b.one("Mod", [b.one("Sub", [chunk_c, b.one("Mod", [length, chunk_c])]), chunk_c])
    pad = b.one("Unsqueeze", [pad, b.ints([0])])

    def chunks(value: str, rank: int, tail: list[int]) -> str:
        # pads: begin of every axis, then end of every axis; only time (axis 1) is padded at its end
        pads = b.one("Concat", [b.ints([0] * (rank + 1)), pad, b.ints([0] * (rank - 2))], axis=0)
        padded = b.one("Pad", [value, pads])
        return b.one("Reshape", [padded, b.ints([0, -1, chunk, *tail])])

    x_chunks = chunks(b.one("Mul", [xs, b.one("Unsqueeze", [step, b.ints([-1])])]), 4, [heads, head_dim])
    b_chunks = chunks(bh, 4, [heads, n])
    c_chunks = chunks(ch, 4, [heads, n])
    log_decay = b.one("Transpose", [chunks(b.one("Mul", [a, step]), 3, [heads])], perm=[0, 3, 1, 2])  # [b,h,c,l]
    log_decay_cum = b.one("CumSum", [log_decay, b.i64(-1)])

    strict, lower = _masks(low, chunk)
    within = b.one("Exp", [_segment_sum(low, log_decay, strict, lower)])  # [b, h, c, l, s]
    scores = b.one("Mul", [b.one("Einsum", [c_chunks, b_chunks], equation="bclhn,bcshn->bhcls"), within])
    y_within = b.one("Einsum", [scores, x_chunks], equation="bhcls,bcshp->bclhp")

    last = b.one("Slice", [log_decay_cum, b.ints([-1]), b.ints([INT64_MAX]), b.ints([-1])])  # [b, h, c, 1]
    to_end = b.one("Exp", [b.one("Sub", [last, log_decay_cum])])
    b_to_end = b.one("Mul", [b_chunks, b.one("Unsqueeze", [b.one("Transpose", [to_end], perm=[0, 2, 3, 1]),
                                                          b.ints([-1])])])
    chunk_states = b.one("Einsum", [b_to_end, x_chunks], equation="bclhn,bclhp->bchpn")  # [b, c, h, p, n]

    start = b.one("Unsqueeze", [low.value(state), b.ints([1])])
    states = b.one("Concat", [start, chunk_states], axis=1)  # [b, c+1, h, p, n]
    chunk_decay = b.one("Pad", [b.one("Squeeze", [last, b.ints([-1])]), b.ints([0, 0, 1, 0, 0, 0])])  # [b, h, c+1]
    strict_c, lower_c = _masks(low, "c", chunk_decay)
    carry = b.one("Exp", [_segment_sum(low, chunk_decay, strict_c, lower_c)])  # [b, h, c+1, c+1]
    boundary = b.one("Einsum", [carry, states], equation="bhzs,bshpn->bzhpn")
    n_chunks = b.one("Gather", [b.one("Shape", [x_chunks]), b.i64(1)], axis=0)
    chunk_start = b.one("Slice", [boundary, b.ints([0]), b.one("Unsqueeze", [n_chunks, b.ints([0])]), b.ints([1])])
    final = b.one("Gather", [boundary, n_chunks], axis=1)

    from_start = b.one("Unsqueeze", [b.one("Transpose", [b.one("Exp", [log_decay_cum])], perm=[0, 2, 3, 1]),
                                     b.ints([-1])])
    y_carried = b.one("Mul", [b.one("Einsum", [c_chunks, chunk_start], equation="bclhn,bchpn->bclhp"), from_start])
    y = b.one("Reshape", [b.one("Add", [y_within, y_carried]), b.ints([0, -1, heads, head_dim])])
    y = b.one("Slice", [y, b.ints([0]), b.one("Unsqueeze", [length, b.ints([0])]), b.ints([1])])
    y = b.one("Reshape", [b.one("Add", [y, skip]), b.ints([0, 0, heads * head_dim])])
    low.bind(op, [y, final])


def ssd_state_update(low: Lowering, op: Op) -> None:
    b = low.b
    at = op.attrs
    heads, head_dim, groups, n = (at.int(k) for k in ("num_heads", "head_dim", "n_groups", "state_size"))
    x, dt, a_log, big_b, big_c, d, dt_bias, state = (
        _req(op, k) for k in ("x", "dt", "A_log", "B", "C", "D", "dt_bias", "ssm_state"))
    x_dtype, dt_dtype = low.type_of(x).dtype, low.type_of(dt).dtype
    b_dtype, c_dtype, d_dtype = low.type_of(big_b).dtype, low.type_of(big_c).dtype, low.type_of(d).dtype
    xs = b.one("Reshape", [low.value(x), b.ints([-1, heads, head_dim])])  # [b, H, P]
    dt_hp = b.one("Mul", [b.one("Reshape", [low.value(dt), b.ints([-1, heads, 1])]),
                          b.const(np.ones((1, 1, head_dim), dtype=np.float32))])
    bias = b.one("Unsqueeze", [low.value(dt_bias), b.ints([1])])
    total = b.round_to(b.one("Add", [dt_hp, b.round_to(bias, dt_dtype)]), dt_dtype)
    soft = b.round_to(b.one("Softplus", [total]), dt_dtype)
    dt_max = at.float("dt_max")
    clip = [soft, b.scalar(at.float("dt_min"))] + ([b.scalar(dt_max)] if np.isfinite(dt_max) else [])
    step = b.round_to(b.one("Clip", clip), dt_dtype)  # [b, H, P]
    a = b.one("Neg", [b.one("Exp", [low.value(a_log)])])
    decay = b.one("Exp", [b.one("Mul", [b.one("Unsqueeze", [step, b.ints([-1])]),
                                        b.one("Reshape", [a, b.ints([heads, 1, 1])])])])  # [b, H, P, N]
    bh = _heads(low, low.value(big_b), [-1], groups, heads, n)  # [b, H, N]
    ch = _heads(low, low.value(big_c), [-1], groups, heads, n)
    step_b_dtype = _promote(dt_dtype, b_dtype)
    update = b.round_to(b.one("Mul", [b.one("Unsqueeze", [step, b.ints([-1])]), b.one("Unsqueeze", [bh, b.ints([2])])]),
                        step_b_dtype)
    update = b.round_to(b.one("Mul", [update, b.one("Unsqueeze", [xs, b.ints([-1])])]), _promote(step_b_dtype, x_dtype))
    new_state = b.one("Add", [b.one("Mul", [low.value(state), decay]), update])  # float32
    y = b.one("MatMul", [b.round_to(new_state, c_dtype), b.one("Unsqueeze", [ch, b.ints([-1])])])
    y = b.round_to(b.one("Squeeze", [y, b.ints([-1])]), c_dtype)  # [b, H, P]
    skip_dtype = _promote(x_dtype, d_dtype)
    skip = b.round_to(b.one("Mul", [xs, b.one("Unsqueeze", [low.value(d), b.ints([1])])]), skip_dtype)
    y = b.round_to(b.round_to(b.one("Add", [y, skip]), _promote(c_dtype, skip_dtype)), c_dtype)
    out = b.one("Reshape", [y, b.ints([-1, 1, heads * head_dim])])
    low.bind(op, [out, b.one("Cast", [new_state], to=TensorProto.FLOAT)])
