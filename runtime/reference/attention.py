"""Causal grouped-query attention with a key/value cache (Nemotron-H attention has no rotary embedding).

The queries are taken in chunks so that the scores of one chunk ([batch, heads, chunk, keys])
hold at most SCORE_BUDGET elements: prefill memory grows with chunk x context, not with the
prompt squared (a 20k-token prompt would otherwise need 400M scores per head). Each query row
is computed by the same formula whatever the chunk; only the matrix products' blocking changes,
which can move a float32 result by an ulp or so. A prompt whose scores fit the budget (e.g. up to
2,048 tokens with 4 heads) runs as one chunk, exactly as before."""

from __future__ import annotations

import torch

from nemocompile.base.formats import FORMATS

SCORE_BUDGET = 1 << 24  # score elements per query chunk: 64 MiB in float32
E4M3_MAX = FORMATS["fp8e4m3"].max_value  # the largest finite FP8 E4M3 value, 448


def _attend(q_heads: torch.Tensor, k_heads: torch.Tensor, v_heads: torch.Tensor, query_pos: torch.Tensor,
            scale: float) -> torch.Tensor:
    """Softmax attention of q_heads [B, H, T, Dh] over k_heads, v_heads [B, H, S, Dh], where
    query t (absolute position query_pos[b, t]; query_pos [B or 1, T]) sees keys 0..query_pos[b, t].
    Returns [B, H, T, Dh] in q's dtype."""
    batch, heads, length, head_dim = q_heads.shape
    keys = k_heads.shape[2]
    chunk = max(1, SCORE_BUDGET // max(1, batch * heads * keys))
    key_pos = torch.arange(keys, device=q_heads.device)[None, None, :]
    k_transposed = k_heads.transpose(2, 3)
    out = torch.empty(batch, heads, length, head_dim, dtype=q_heads.dtype, device=q_heads.device)
    for start in range(0, length, chunk):
        rows = slice(start, start + chunk)
        scores = torch.matmul(q_heads[:, :, rows], k_transposed) * scale  # [B, Hq, chunk, S]
        scores = scores.masked_fill((key_pos > query_pos[:, rows, None])[:, None], float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q_heads.dtype)
        del scores
        out[:, :, rows] = torch.matmul(probs, v_heads)
    return out


def _attend_grouped(q: torch.Tensor, k_all: torch.Tensor, v_all: torch.Tensor, query_pos: torch.Tensor,
                    num_heads: int, head_dim: int, scale: float) -> torch.Tensor:
    """Query head h of q [B, T, Hq*Dh] reads key/value head h // (Hq // Hkv) of k_all, v_all
    [B, Hkv, S, Dh]. The queries of the heads sharing a key/value head are stacked as rows of one
    product ([B, Hkv, group*T, Dh] against [B, Hkv, S, Dh]), so the cache is read once per kv head
    instead of being copied for every query head. Returns [B, T, Hq*Dh]."""
    batch, length, _ = q.shape
    kv_heads = k_all.shape[1]
    group = num_heads // kv_heads
    # rows of kv head j: (query head j*group + i, position t) at row i*T + t
    q_rows = q.reshape(batch, length, kv_heads, group, head_dim).permute(0, 2, 3, 1, 4)
    q_rows = q_rows.reshape(batch, kv_heads, group * length, head_dim)
    out = _attend(q_rows, k_all, v_all, query_pos.repeat(1, group), scale)  # [B, Hkv, group*T, Dh]
    out = out.reshape(batch, kv_heads, group, length, head_dim).permute(0, 3, 1, 2, 4)
    return out.reshape(batch, length, num_heads * head_dim)


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
    k_all = k.reshape(batch, length, num_kv_heads, head_dim).transpose(1, 2)
    v_all = v.reshape(batch, length, num_kv_heads, head_dim).transpose(1, 2)
    if past_k is not None and past_v is not None:
        k_all = torch.cat([past_k, k_all], dim=2)
        v_all = torch.cat([past_v, v_all], dim=2)
    past_length = k_all.shape[2] - length
    query_pos = torch.arange(length, device=q.device)[None, :] + past_length  # [1, T]
    return _attend_grouped(q, k_all, v_all, query_pos, num_heads, head_dim, scale), k_all, v_all


def _to_cache(x: torch.Tensor, dtype: torch.dtype, scale: torch.Tensor | None) -> torch.Tensor:
    """New keys or values as the cache stores them: cast to its float dtype, or, for an FP8 cache,
    x / scale saturated to E4M3's range and rounded to the nearest code (ties to even)."""
    if scale is None:
        return x.to(dtype)
    return (x.float() / scale.float()).clamp(-E4M3_MAX, E4M3_MAX).to(dtype)


def _from_cache(stored: torch.Tensor, dtype: torch.dtype, scale: torch.Tensor | None) -> torch.Tensor:
    """What the cache's entries stand for, in the queries' dtype: an FP8 code times its scale."""
    if scale is None:
        return stored.to(dtype)
    return (stored.float() * scale.float()).to(dtype)


def attention_gqa_cached(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cache_lens: torch.Tensor,
    *,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    scale: float,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`attention_gqa` over a preallocated cache with a length per sequence.

    k_cache and v_cache [B, Hkv, C, Dh] hold sequence b's first cache_lens[b] positions; its T new
    keys/values are written at positions cache_lens[b]..cache_lens[b]+T-1 (in place: the returned
    caches are the given tensors), and its query t attends to positions 0..cache_lens[b]+t. The
    arithmetic is attention_gqa's: equal lengths give its result exactly. With k_scale and v_scale
    the caches hold FP8 E4M3 codes, and every key and value attention reads, the new ones included,
    is its code times the scale (the deployed numerics of an FP8 KV cache).
    """
    if num_heads % num_kv_heads != 0:
        raise ValueError(f"attention_gqa: num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}.")
    batch, length, _ = q.shape
    lens = cache_lens.to(device=q.device, dtype=torch.int64)
    positions = lens[:, None] + torch.arange(length, device=q.device)[None, :]  # [B, T]
    end = int(positions.max()) + 1
    if end > k_cache.shape[2]:
        raise ValueError(f"attention_gqa: {end} positions do not fit the cache of {k_cache.shape[2]}.")
    new_k = _to_cache(k.reshape(batch, length, num_kv_heads, head_dim), k_cache.dtype, k_scale)
    new_v = _to_cache(v.reshape(batch, length, num_kv_heads, head_dim), v_cache.dtype, v_scale)
    rows = torch.arange(batch, device=q.device)[:, None].expand(batch, length)
    # Advanced indexing on dims 0 and 2 puts the [B, T] index dims first: [B, T, Hkv, Dh].
    k_cache[rows, :, positions] = new_k
    v_cache[rows, :, positions] = new_v

    keys = _from_cache(k_cache[:, :, :end], q.dtype, k_scale)
    values = _from_cache(v_cache[:, :, :end], q.dtype, v_scale)
    return _attend_grouped(q, keys, values, positions, num_heads, head_dim, scale), k_cache, v_cache
