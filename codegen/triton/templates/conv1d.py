"""Depthwise causal conv1d of Mamba2 with its SiLU fused, for prefill and for the one-token decode
step alike (decode is T = 1 with the previous K-1 inputs as state).

Meaning: runtime/reference/conv.causal_conv1d. Output t of channel c is
act(bias[c] + sum_k weight[c, k] * u[t + k]) with u = state ++ x along time; the arithmetic is
rounded to the weight's dtype, as the reference convolves in it. Grid: (batch, channel blocks,
time blocks); the first time block also writes the new state, the last K-1 columns of u, or with
seq_lens (HAS_SEQ_LENS) the K-1 columns ending at sequence b's last real token (the rest of its row
is right padding: its outputs are computed, but the state ignores them).
"""

import triton
import triton.language as tl

from .numerics import cast_rne


@triton.jit
def causal_conv1d(
    x_ptr, weight_ptr, bias_ptr, state_ptr, out_ptr,
    new_state_ptr, seq_lens_ptr, length, channels,
    KERNEL: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_STATE: tl.constexpr, SILU: tl.constexpr,
    HAS_SEQ_LENS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    batch = tl.program_id(0).to(tl.int64)
    chans = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    times = tl.program_id(2) * BLOCK_T + tl.arange(0, BLOCK_T)
    chan_ok = chans < channels
    compute_dtype = weight_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + chans, mask=chan_ok, other=0.0).to(tl.float32)[None, :]
    for k in tl.static_range(KERNEL):
        src = times[:, None] + (k - (KERNEL - 1))  # time index in x; negative reads the state
        ok = chan_ok[None, :] & (src < length)
        u = tl.load(x_ptr + (batch * length + src) * channels + chans[None, :], mask=ok & (src >= 0), other=0.0)
        u = u.to(tl.float32)
        if HAS_STATE:
            from_state = tl.load(state_ptr + (batch * channels + chans[None, :]) * (KERNEL - 1) + src + (KERNEL - 1),
                                 mask=ok & (src < 0), other=0.0)
            u += from_state.to(tl.float32)
        # The reference casts u to the weight's dtype before convolving.
        u = cast_rne(u, compute_dtype, INTERPRET).to(tl.float32)
        tap = tl.load(weight_ptr + chans * KERNEL + k, mask=chan_ok, other=0.0).to(tl.float32)
        acc += tap[None, :] * u
    y = cast_rne(acc, compute_dtype, INTERPRET).to(tl.float32)
    if SILU:
        y = cast_rne(y * tl.sigmoid(y), compute_dtype, INTERPRET).to(tl.float32)
    out_ok = chan_ok[None, :] & (times[:, None] < length)
    tl.store(out_ptr + (batch * length + times[:, None]) * channels + chans[None, :],
             cast_rne(y, out_ptr.dtype.element_ty, INTERPRET), mask=out_ok)
    if tl.program_id(2) == 0:
        end = length
        if HAS_SEQ_LENS:
            end = tl.load(seq_lens_ptr + batch).to(tl.int32)
        for j in tl.static_range(KERNEL - 1):
            # The time index as a vector: the interpreter rejects a scalar mask combined with a vector one.
            tail_src = tl.zeros_like(chans) + end + (j - (KERNEL - 1))
            tail = tl.load(x_ptr + (batch * length + tail_src) * channels + chans,
                           mask=chan_ok & (tail_src >= 0), other=0.0)
            tail = tail.to(tl.float32)
            if HAS_STATE:
                tail += tl.load(state_ptr + (batch * channels + chans) * (KERNEL - 1) + tail_src + (KERNEL - 1),
                                mask=chan_ok & (tail_src < 0), other=0.0).to(tl.float32)
            tl.store(new_state_ptr + (batch * channels + chans) * (KERNEL - 1) + j,
                     cast_rne(tail, new_state_ptr.dtype.element_ty, INTERPRET), mask=chan_ok)
