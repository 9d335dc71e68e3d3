"""Depthwise causal 1-D convolution of Mamba2, for prefill and for one-token decode alike."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str | None,
    state: torch.Tensor | None,
    seq_lens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel causal convolution over time, optionally followed by SiLU.

    x is [B, T, C] (channels last); weight is [C, 1, K] as checkpoints store it, or [C, K];
    bias is [C] or None; state is None (a fresh sequence: the K-1 inputs before x are zeros)
    or [B, C, K-1], the previous K-1 inputs. Output t is
    ``act(bias + sum_k weight[:, k] * u[t + k])`` with u = state ++ x along time.

    Returns y [B, T, C] in x's dtype and new_state [B, C, K-1], the last K-1 columns of
    state ++ x, in the state's dtype (x's when state is None). The arithmetic runs in the
    weight's dtype, as in transformers' causal_conv1d_fn / causal_conv1d_update; its cache
    keeps K columns rather than K-1, the oldest of which no output reads.

    seq_lens (int [B], optional) says sequence b's first seq_lens[b] tokens are real and the rest
    right padding: its new state is the K-1 inputs ending at its last real token (its old state
    when seq_lens[b] = 0), as if the padding had not been there. Outputs of real tokens never read
    padding (the convolution is causal).
    """
    if activation not in (None, "silu"):
        raise ValueError(f"causal_conv1d: activation must be 'silu' or None, got {activation!r}.")
    taps = weight if weight.dim() == 2 else weight.squeeze(1)
    channels, kernel_size = taps.shape
    batch, _, x_channels = x.shape
    if x_channels != channels:
        raise ValueError(f"causal_conv1d: x has {x_channels} channels but the weight has {channels}.")
    x_cf = x.transpose(1, 2)
    if state is None:
        state = x_cf.new_zeros(batch, channels, kernel_size - 1)
    # torch.cat promotes mixed dtypes, as transformers' update path does before casting to the weight dtype.
    history = torch.cat([state, x_cf], dim=-1)
    window = kernel_size - 1
    if seq_lens is None:
        new_state = history[:, :, history.shape[-1] - window :].to(state.dtype).contiguous()
    elif history.shape[-1] == kernel_size:  # one token: the shifted window, or the old state (seq_lens 0)
        idle = (seq_lens.to(x.device) == 0)[:, None, None]
        new_state = torch.where(idle, state, history[:, :, 1:].to(state.dtype))
    else:
        # Columns seq_lens[b] .. seq_lens[b]+K-2 of state ++ x are the K-1 inputs ending at token seq_lens[b]-1.
        columns = seq_lens.to(device=x.device, dtype=torch.int64)[:, None] + torch.arange(window, device=x.device)
        new_state = history.gather(2, columns[:, None, :].expand(batch, channels, window)).to(state.dtype)
    if history.shape[-1] == kernel_size:  # one token (decode): one window per channel, summed in
        # float32 and rounded once, as the convolution accumulates
        y32 = (history.to(taps.dtype).float() * taps.float()).sum(-1, keepdim=True)
        y = (y32 if bias is None else y32 + bias.float()[:, None]).to(taps.dtype)
    else:
        y = F.conv1d(history.to(taps.dtype), taps.unsqueeze(1), bias, padding=0, groups=channels)
    if activation == "silu":
        y = F.silu(y)
    return y.transpose(1, 2).to(x.dtype), new_state
