"""Mamba2 selective state space, by state-space duality (chunked prefill) and by recurrence (decode).

Per head h, with step size ``dt = clamp(softplus(dt_raw + dt_bias), dt_min, dt_max)`` and
``A = -exp(A_log)``, the recurrence is::

    state_t = exp(dt_t * A) * state_{t-1} + dt_t * outer(x_t, B_t)     # [P, N]
    y_t     = state_t @ C_t + D * x_t                                   # [P]

where head h reads group ``h // (num_heads // n_groups)`` of B and C.

transformers quirk: NemotronHMamba2Mixer clamps dt at ``config.time_step_min`` in its prefill
(chunk scan) path but applies no clamp in its one-token decode path (and ignores
``config.time_step_limit``). To reproduce it, call ``ssd_chunk_scan`` with
``dt_min=config.time_step_min, dt_max=inf`` and ``ssd_state_update`` with ``dt_min=0,
dt_max=inf``; the two then disagree whenever softplus(dt) < time_step_min.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _step_size(dt: torch.Tensor, dt_bias: torch.Tensor, dt_min: float, dt_max: float) -> torch.Tensor:
    """softplus(dt + dt_bias) clamped to [dt_min, dt_max], in dt's dtype as transformers computes it."""
    return torch.clamp(F.softplus(dt + dt_bias.to(dt.dtype)), min=dt_min, max=dt_max)


def _check_sizes(
    x: torch.Tensor, B: torch.Tensor, num_heads: int, head_dim: int, n_groups: int, state_size: int
) -> None:
    if num_heads % n_groups != 0:
        raise ValueError(f"ssd: num_heads {num_heads} is not a multiple of n_groups {n_groups}.")
    if x.shape[-1] != num_heads * head_dim:
        raise ValueError(
            f"ssd: x has width {x.shape[-1]}, expected num_heads*head_dim = {num_heads * head_dim}."
        )
    if B.shape[-1] != n_groups * state_size:
        raise ValueError(
            f"ssd: B/C have width {B.shape[-1]}, expected n_groups*state_size = {n_groups * state_size}."
        )


def _segment_sum(log_decay: torch.Tensor) -> torch.Tensor:
    """[..., L] -> [..., L, L] with out[..., i, j] = log_decay[..., j+1 : i+1].sum() for j <= i, -inf above.

    Summing masked copies, rather than subtracting two prefix sums, keeps the small
    differences between large cumulative sums exact enough in float32.
    """
    length = log_decay.shape[-1]
    ones = torch.ones(length, length, dtype=torch.bool, device=log_decay.device)
    strictly_below = ones.tril(-1)
    terms = log_decay.unsqueeze(-1).expand(*log_decay.shape, length).masked_fill(~strictly_below, 0.0)
    return terms.cumsum(dim=-2).masked_fill(~ones.tril(0), float("-inf"))


def _split_into_chunks(t: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """[Bt, T, ...] -> [Bt, T_padded / chunk_size, chunk_size, ...], zero-padding time at the end."""
    pad = (-t.shape[1]) % chunk_size
    if pad:
        t = torch.cat([t, t.new_zeros(t.shape[0], pad, *t.shape[2:])], dim=1)
    return t.reshape(t.shape[0], -1, chunk_size, *t.shape[2:])


def ssd_chunk_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A_log: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    dt_bias: torch.Tensor,
    *,
    num_heads: int,
    head_dim: int,
    n_groups: int,
    state_size: int,
    chunk_size: int,
    dt_min: float,
    dt_max: float,
    initial_state: torch.Tensor | None,
    seq_lens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the recurrence over a whole sequence, chunk by chunk (Mamba2's SSD form).

    x [Bt, T, H*P], dt [Bt, T, H] (raw, before bias and softplus), A_log, D, dt_bias [H],
    B and C [Bt, T, G*N], initial_state None (zeros) or [Bt, H, P, N]. Any T >= 1.
    Returns y [Bt, T, H*P] in float32 (transformers' mamba2_chunk_scan returns float32 too;
    the mixer's gated norm then sees float32) and the final state [Bt, H, P, N] in float32.
    Only the step size is computed in dt's dtype; everything after it runs in float32.
    seq_lens (int [Bt], optional): sequence b's tokens from seq_lens[b] on are right padding; they
    get step size 0 (no decay, no input), so the final state is the state after its real tokens.
    """
    _check_sizes(x, B, num_heads, head_dim, n_groups, state_size)
    batch, length, _ = x.shape
    heads_per_group = num_heads // n_groups

    step = _step_size(dt, dt_bias, dt_min, dt_max).float()  # [Bt, T, H]
    if seq_lens is not None:
        real = torch.arange(length, device=x.device)[None, :] < seq_lens.to(x.device)[:, None]  # [Bt, T]
        step = step * real[..., None]
    A = -torch.exp(A_log.float())
    xs = x.float().reshape(batch, length, num_heads, head_dim)
    Bh = B.float().reshape(batch, length, n_groups, state_size).repeat_interleave(heads_per_group, dim=2)
    Ch = C.float().reshape(batch, length, n_groups, state_size).repeat_interleave(heads_per_group, dim=2)
    skip = D[:, None] * xs

    x_chunks = _split_into_chunks(xs * step[..., None], chunk_size)  # [b, c, l, h, p]
    B_chunks = _split_into_chunks(Bh, chunk_size)  # [b, c, l, h, n]
    C_chunks = _split_into_chunks(Ch, chunk_size)
    # Padded steps have dt = 0: no decay and no input, so they leave the final state unchanged.
    log_decay = _split_into_chunks(A * step, chunk_size).permute(0, 3, 1, 2)  # [b, h, c, l]
    log_decay_cum = log_decay.cumsum(dim=-1)
    n_chunks = log_decay.shape[2]

    # 1. Inputs to outputs within a chunk: a masked, decayed attention-like product.
    within = torch.exp(_segment_sum(log_decay))  # [b, h, c, l, s]
    scores = torch.einsum("bclhn,bcshn->bhcls", C_chunks, B_chunks) * within
    y_within = torch.einsum("bhcls,bcshp->bclhp", scores, x_chunks)

    # 2. Each chunk's inputs, decayed to the chunk's end, summed into a state.
    to_chunk_end = torch.exp(log_decay_cum[..., -1:] - log_decay_cum)  # [b, h, c, l]
    B_to_end = B_chunks * to_chunk_end.permute(0, 2, 3, 1)[..., None]
    chunk_states = torch.einsum("bclhn,bclhp->bchpn", B_to_end, x_chunks)  # [b, c, h, p, n]

    # 3. Carry states across chunk boundaries; slot 0 is the state before the sequence.
    if initial_state is None:
        start = chunk_states.new_zeros(batch, 1, num_heads, head_dim, state_size)
    else:
        start = initial_state[:, None].to(torch.float32)
    states = torch.cat([start, chunk_states], dim=1)  # [b, c+1, h, p, n]
    chunk_log_decay = F.pad(log_decay_cum[..., -1], (1, 0))  # [b, h, c+1]
    carry = torch.exp(_segment_sum(chunk_log_decay))  # [b, h, c+1, c+1]
    boundary_states = torch.einsum("bhzs,bshpn->bzhpn", carry, states)
    chunk_start_states, final_state = boundary_states[:, :n_chunks], boundary_states[:, n_chunks]

    # 4. The state entering each chunk, decayed to each position, read out through C.
    from_start = torch.exp(log_decay_cum).permute(0, 2, 3, 1)[..., None]  # [b, c, l, h, 1]
    y_carried = torch.einsum("bclhn,bchpn->bclhp", C_chunks, chunk_start_states) * from_start

    y = (y_within + y_carried).reshape(batch, n_chunks * chunk_size, num_heads, head_dim)[:, :length]
    y = y + skip
    return y.reshape(batch, length, num_heads * head_dim), final_state


def ssd_state_update(
    x: torch.Tensor,
    dt: torch.Tensor,
    A_log: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    dt_bias: torch.Tensor,
    *,
    num_heads: int,
    head_dim: int,
    n_groups: int,
    state_size: int,
    dt_min: float,
    dt_max: float,
    state: torch.Tensor,
    seq_lens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Advance the recurrence by one token (decode).

    x [Bt, 1, H*P], dt [Bt, 1, H], A_log, D, dt_bias [H], B and C [Bt, 1, G*N], state
    [Bt, H, P, N] (read as float32). Returns y [Bt, 1, H*P] in x's dtype and the new state
    [Bt, H, P, N] in float32. Follows transformers' mamba2_selective_state_update as the
    mixer calls it: the step size, dt*B*x and the read-out through C run in the inputs'
    dtype (bfloat16 in a bfloat16 model); only the decay and the state update are float32.
    seq_lens (int [Bt], optional): a sequence with seq_lens[b] = 0 (finished, or idle in this step)
    gets step size 0 and keeps its state exactly.
    """
    _check_sizes(x, B, num_heads, head_dim, n_groups, state_size)
    batch = x.shape[0]
    if x.shape[1] != 1:
        raise ValueError(f"ssd_state_update: x must hold one token, got T = {x.shape[1]}.")
    heads_per_group = num_heads // n_groups

    xs = x.reshape(batch, num_heads, head_dim)
    # dt is per head. The mixer broadcasts it over head_dim first; every value along head_dim is the
    # same, so it is computed once per head ([Bt, H, 1]) and broadcast: the same numbers, P x fewer.
    step = _step_size(dt.reshape(batch, num_heads, 1), dt_bias[:, None], dt_min, dt_max)  # [Bt, H, 1]
    if seq_lens is not None:
        step = step * (seq_lens.to(x.device) > 0).to(step.dtype)[:, None, None]
    A = -torch.exp(A_log.float())
    decay = torch.exp(step.float()[..., None] * A[:, None, None])  # [Bt, H, 1, N]

    def per_head(t: torch.Tensor) -> torch.Tensor:  # [Bt, G*N] -> [Bt, H, N], head h reading its group
        grouped = t.reshape(batch, n_groups, 1, state_size)
        return grouped.expand(batch, n_groups, heads_per_group, state_size).reshape(batch, num_heads, state_size)

    Bh, Ch = per_head(B), per_head(C)
    update = (step[..., None] * Bh[:, :, None, :]) * xs[..., None]  # [Bt, H, P, N]
    new_state = (state * decay + update).to(torch.float32)

    y = torch.matmul(new_state.to(Ch.dtype), Ch[..., None]).squeeze(-1)  # [Bt, H, P]
    y = (y + xs * D[:, None]).to(y.dtype)
    return y.to(x.dtype).reshape(batch, 1, num_heads * head_dim), new_state
