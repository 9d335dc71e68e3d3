"""Mamba2's selective state space: the chunked scan of a prompt (SSD, prefill) and the one-token
state update (decode).

Meaning: runtime/reference/ssd.ssd_chunk_scan and ssd_state_update. Per head h (group
h // (H / G) of B and C), dt = clamp(softplus(dt_raw + dt_bias), dt_min, dt_max), A = -exp(A_log):
state_t = exp(dt_t A) state_{t-1} + dt_t x_t B_t^T and y_t = state_t C_t + D x_t.

The scan runs one program per (sequence, head, block of head_dim), walking the chunks in order with
the [P, N] state in registers: within a chunk, y = ((C B^T) * decay) (dt x) + exp(cum) (C S^T) + D x,
then S = exp(total) S + (dt x * exp(total - cum))^T B. C B^T multiplies the inputs as they are
(exact for 16-bit inputs: numerics.dot_f32, upcast under the interpreter, whose bf16 dot is wrong);
the products with fp32 operands are exact fp32 dots ("ieee"), as the fp32 reference computes them.
The kernel's chunk (CHUNK) need not be the op's chunk_size: the recurrence does not depend on it,
only the rounding does.

With seq_lens (HAS_SEQ_LENS), sequence b's tokens from seq_lens[b] on are right padding: they get step
size 0 (no decay, no input), as in the reference, so the final state is the one after its real tokens;
in the decode step, seq_lens[b] = 0 keeps the state exactly.
"""

import triton
import triton.language as tl

from .numerics import dot_f32, rounded


@triton.jit
def _softplus(v):
    """torch's softplus (threshold 20) in fp32, with log1p computed accurately for small exp(v)."""
    u = tl.exp(tl.minimum(v, 20.0))
    w = 1.0 + u
    log1p = tl.where(w == 1.0, u, tl.log(w) * (u / (w - 1.0)))
    return tl.where(v > 20.0, v, log1p)


@triton.jit
def _step_size(dt_raw, dt_bias, dt_min, dt_max, DT_DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """clamp(softplus(dt + dt_bias), dt_min, dt_max) rounded as computed in dt's dtype, as fp32."""
    s = rounded(dt_raw.to(tl.float32) + rounded(dt_bias.to(tl.float32), DT_DTYPE, INTERPRET), DT_DTYPE, INTERPRET)
    s = rounded(_softplus(s), DT_DTYPE, INTERPRET)
    return tl.minimum(tl.maximum(s, dt_min), dt_max)


@triton.jit
def ssd_chunk_scan(
    x_ptr, dt_ptr, a_log_ptr, b_ptr, c_ptr,
    d_ptr, dt_bias_ptr, init_ptr, y_ptr, final_ptr,
    seq_lens_ptr, length, num_heads, head_dim, n_groups, state_size,
    dt_min, dt_max,
    HAS_INIT: tl.constexpr, HAS_SEQ_LENS: tl.constexpr, CHUNK: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    ps = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
    ns = tl.arange(0, BLOCK_N)
    p_ok = ps < head_dim
    n_ok = ns < state_size
    group = head // (num_heads // n_groups)
    a = -tl.exp(tl.load(a_log_ptr + head).to(tl.float32))
    skip = tl.load(d_ptr + head).to(tl.float32)
    dt_bias = tl.load(dt_bias_ptr + head)
    state_offsets = ((seq * num_heads + head) * head_dim + ps[:, None]) * state_size + ns[None, :]
    state_mask = p_ok[:, None] & n_ok[None, :]
    if HAS_INIT:
        state = tl.load(init_ptr + state_offsets, mask=state_mask, other=0.0).to(tl.float32)
    else:
        state = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    ls = tl.arange(0, CHUNK)
    causal = ls[:, None] >= ls[None, :]
    width_x = num_heads * head_dim
    width_bc = n_groups * state_size
    real_end = length
    if HAS_SEQ_LENS:
        real_end = tl.minimum(tl.load(seq_lens_ptr + seq).to(tl.int32), length)
    for start in range(0, length, CHUNK):
        ts = start + ls
        t_ok = ts < length
        rows = seq * length + ts
        dt_raw = tl.load(dt_ptr + rows * num_heads + head, mask=t_ok, other=0.0)
        step = tl.where(ts < real_end, _step_size(dt_raw, dt_bias, dt_min, dt_max, dt_ptr.dtype.element_ty, INTERPRET), 0.0)
        cum = tl.cumsum(a * step, axis=0)  # [L]
        total = tl.sum(a * step, axis=0)
        xv = tl.load(x_ptr + rows[:, None] * width_x + head * head_dim + ps[None, :],
                     mask=t_ok[:, None] & p_ok[None, :], other=0.0).to(tl.float32)  # [L, P]
        bc_offsets = rows[:, None] * width_bc + group * state_size + ns[None, :]
        bc_mask = t_ok[:, None] & n_ok[None, :]
        b_in = tl.load(b_ptr + bc_offsets, mask=bc_mask, other=0.0)  # [L, N]
        c_in = tl.load(c_ptr + bc_offsets, mask=bc_mask, other=0.0)
        # Products of two bf16 values are exact in fp32: C B^T may use the tensor cores.
        scores = dot_f32(c_in, tl.trans(b_in), INTERPRET)  # [L, L]
        bv = b_in.to(tl.float32)
        cv = c_in.to(tl.float32)
        x_dt = xv * step[:, None]
        decay = tl.where(causal, tl.exp(tl.where(causal, cum[:, None] - cum[None, :], 0.0)), 0.0)
        y = tl.dot(scores * decay, x_dt, input_precision="ieee")  # [L, P]
        y += tl.dot(cv, tl.trans(state), input_precision="ieee") * tl.exp(cum)[:, None]
        y += skip * xv
        tl.store(y_ptr + rows[:, None] * width_x + head * head_dim + ps[None, :], y,
                 mask=t_ok[:, None] & p_ok[None, :])
        to_end = tl.exp(total - cum)  # [L]
        state = state * tl.exp(total) + tl.dot(tl.trans(x_dt * to_end[:, None]), bv, input_precision="ieee")
    tl.store(final_ptr + state_offsets, state, mask=state_mask)


@triton.jit
def ssd_state_update(
    x_ptr, dt_ptr, a_log_ptr, b_ptr, c_ptr,
    d_ptr, dt_bias_ptr, state_ptr, y_ptr, new_state_ptr,
    seq_lens_ptr, num_heads, head_dim, n_groups, state_size,
    dt_min, dt_max,
    HAS_SEQ_LENS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    ps = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
    ns = tl.arange(0, BLOCK_N)
    p_ok = ps < head_dim
    n_ok = ns < state_size
    group = head // (num_heads // n_groups)
    io: tl.constexpr = x_ptr.dtype.element_ty  # dt, B, C share it (checked by the launcher)
    step = _step_size(tl.load(dt_ptr + seq * num_heads + head), tl.load(dt_bias_ptr + head), dt_min, dt_max, io, INTERPRET)
    if HAS_SEQ_LENS:
        step = tl.where(tl.load(seq_lens_ptr + seq) > 0, step, 0.0)  # an idle sequence keeps its state
    decay = tl.exp(step * -tl.exp(tl.load(a_log_ptr + head).to(tl.float32)))
    xv = tl.load(x_ptr + (seq * num_heads + head) * head_dim + ps, mask=p_ok, other=0.0).to(tl.float32)
    bc_offsets = (seq * n_groups + group) * state_size + ns
    bv = tl.load(b_ptr + bc_offsets, mask=n_ok, other=0.0).to(tl.float32)
    cv = tl.load(c_ptr + bc_offsets, mask=n_ok, other=0.0).to(tl.float32)
    state_offsets = ((seq * num_heads + head) * head_dim + ps[:, None]) * state_size + ns[None, :]
    mask = p_ok[:, None] & n_ok[None, :]
    state = tl.load(state_ptr + state_offsets, mask=mask, other=0.0).to(tl.float32)
    # dt * B * x in the inputs' dtype, rounded after each product as the reference computes it.
    update = rounded(rounded(step * bv, io, INTERPRET)[None, :] * xv[:, None], io, INTERPRET)
    state = state * decay + update
    tl.store(new_state_ptr + state_offsets, state, mask=mask)
    y = rounded(tl.sum(rounded(state, io, INTERPRET) * cv[None, :], axis=1), io, INTERPRET)
    skip_dtype: tl.constexpr = d_ptr.dtype.element_ty if d_ptr.dtype.element_ty == tl.float32 else io
    xd = rounded(xv * tl.load(d_ptr + head).to(tl.float32), skip_dtype, INTERPRET)
    y = rounded(rounded(y + xd, skip_dtype, INTERPRET), io, INTERPRET)
    tl.store(y_ptr + (seq * num_heads + head) * head_dim + ps, y.to(y_ptr.dtype.element_ty), mask=p_ok)
