"""Causal grouped-query attention with a key/value cache (Nemotron-H attention has no rotary embedding)."""

from __future__ import annotations

import torch


def attention_gqa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    scale: float,
    past_k: torch.Tensor | None,
    past_v: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Softmax attention of T new queries over S cached plus T new keys, causally masked.

    q [B, T, Hq*Dh]; k and v [B, T, Hkv*Dh]; past_k and past_v None or [B, Hkv, S, Dh].
    Query head h reads key/value head ``h // (Hq // Hkv)``; query t sits at absolute
    position S+t and sees keys 0..S+t. Scores are ``(q @ k^T) * scale`` in q's dtype, the
    softmax runs in float32 and is cast back to q's dtype before multiplying by v, as in
    transformers' eager_attention_forward. Returns out [B, T, Hq*Dh] and the grown caches
    k_all, v_all [B, Hkv, S+T, Dh].
    """
    if num_heads % num_kv_heads != 0:
        raise ValueError(
            f"attention_gqa: num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}."
        )
    if (past_k is None) != (past_v is None):
        raise ValueError("attention_gqa: past_k and past_v must be given together.")
    batch, length, _ = q.shape
    q_heads = q.reshape(batch, length, num_heads, head_dim).transpose(1, 2)  # [B, Hq, T, Dh]
    k_all = k.reshape(batch, length, num_kv_heads, head_dim).transpose(1, 2)
    v_all = v.reshape(batch, length, num_kv_heads, head_dim).transpose(1, 2)
    if past_k is not None and past_v is not None:
        k_all = torch.cat([past_k, k_all], dim=2)
        v_all = torch.cat([past_v, v_all], dim=2)
    past_length = k_all.shape[2] - length

    group = num_heads // num_kv_heads
    k_heads = k_all.repeat_interleave(group, dim=1)  # [B, Hq, S+T, Dh]
    v_heads = v_all.repeat_interleave(group, dim=1)

    scores = torch.matmul(q_heads, k_heads.transpose(2, 3)) * scale  # [B, Hq, T, S+T]
    query_pos = torch.arange(length, device=q.device)[:, None] + past_length
    key_pos = torch.arange(k_all.shape[2], device=q.device)[None, :]
    scores = scores.masked_fill(key_pos > query_pos, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    out = torch.matmul(probs, v_heads).transpose(1, 2).reshape(batch, length, num_heads * head_dim)
    return out, k_all, v_all
