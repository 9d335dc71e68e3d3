"""Causal grouped-query attention against the per-sequence KV cache (runtime/cache.py layout
[B, Hkv, capacity, Dh], cache_lens [B]), for prefill (T new tokens) and decode (T = 1) alike.

Meaning: runtime/reference/attention.attention_gqa_cached. Sequence b's T new keys/values go to
positions cache_lens[b] .. cache_lens[b]+T-1 (written in place), and its query t attends to
positions 0 .. cache_lens[b]+t. One program serves one KV head of one sequence and a block of
(token, query head) rows, so the group's query heads share every key and value load (GQA).

Two softmax forms (constexpr EXACT):
- EXACT (the default): two passes over the keys. The first finds each row's maximum and the sum of
  exp(score - max) in fp32; the second forms the normalised probabilities, rounds them to the
  query dtype and multiplies V, as the reference does. The scores are rounded as the reference
  rounds them too (q k^T, then times scale, each in the query dtype). With 16-bit inputs this
  matches the reference to accumulation order, where the flash form drifts by bf16 ulps of the
  probabilities; an engine's greedy tokens then follow the reference's.
- otherwise the one-pass online (flash) softmax in fp32 with exp2: half the K reads, the
  unnormalised probabilities rounded to the query dtype for the P V product.

An FP8 cache (the cache pointers' element type float8e4nv) holds E4M3 codes under the per-tensor
fp32 scales k_scale and v_scale: a new key is stored as E4M3(clamp(k / k_scale, +-448)), rounded to
nearest even in fp32 arithmetic (quant_math: the interpreter's fp32 -> fp8 cast is wrong near powers
of two), and every key attention reads, the new ones included, is its code times k_scale rounded to
the query dtype, as the reference does. The cache read is then 1 byte per element. With a float
cache the scale pointers are not read.
"""

import triton
import triton.language as tl

from .numerics import cast_rne, dot_f32, rounded
from .quant_math import round_to_e4m3_signed


@triton.jit
def _to_cache(x, cache_ptr, scale_ptr, INTERPRET: tl.constexpr):
    """fp32 keys or values as the cache stores them: cast to its float dtype, or E4M3 codes of x / scale."""
    if cache_ptr.dtype.element_ty == tl.float8e4nv:
        return round_to_e4m3_signed(tl.math.div_rn(x, tl.load(scale_ptr))).to(tl.float8e4nv)  # exact cast
    else:
        return cast_rne(x, cache_ptr.dtype.element_ty, INTERPRET)


@triton.jit
def _from_cache(cache_ptr, offsets, mask, scale_ptr, q_dtype: tl.constexpr, INTERPRET: tl.constexpr):
    """Cached keys or values in the query dtype: an FP8 code times its scale, rounded to q_dtype."""
    stored = tl.load(cache_ptr + offsets, mask=mask, other=0.0)
    if cache_ptr.dtype.element_ty == tl.float8e4nv:
        return cast_rne(stored.to(tl.float32) * tl.load(scale_ptr), q_dtype, INTERPRET)
    else:
        return stored.to(q_dtype)


@triton.jit
def kv_cache_write(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, lens_ptr, k_scale_ptr, v_scale_ptr,
    length, num_kv_heads, head_dim, capacity, BLOCK_D: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1)
    head = tl.program_id(2)
    ds = tl.arange(0, BLOCK_D)
    ok = ds < head_dim
    source = ((seq * length + t) * num_kv_heads + head) * head_dim + ds
    target = ((seq * num_kv_heads + head) * capacity + tl.load(lens_ptr + seq) + t) * head_dim + ds
    k = tl.load(k_ptr + source, mask=ok).to(tl.float32)
    v = tl.load(v_ptr + source, mask=ok).to(tl.float32)
    tl.store(k_cache_ptr + target, _to_cache(k, k_cache_ptr, k_scale_ptr, INTERPRET), mask=ok)
    tl.store(v_cache_ptr + target, _to_cache(v, v_cache_ptr, v_scale_ptr, INTERPRET), mask=ok)


@triton.jit
def _key_block(start, cache_base, head_dim, ds, d_ok, valid_end, BLOCK_N: tl.constexpr):
    """Key positions start..start+BLOCK_N-1 of one sequence's KV head (its cache rows begin at
    cache_base), their element offsets [BLOCK_N, BLOCK_D] and the mask of the keys written so far."""
    keys = start + tl.arange(0, BLOCK_N)
    kv_offsets = (cache_base + keys[:, None]) * head_dim + ds[None, :]
    kv_mask = (keys < valid_end)[:, None] & d_ok[None, :]
    return keys, kv_offsets, kv_mask


@triton.jit
def _scores(q, k_cache_ptr, k_scale_ptr, kv_offsets, kv_mask, keys, positions, row_ok, scale,
            q_dtype: tl.constexpr, EXACT: tl.constexpr, INTERPRET: tl.constexpr):
    """The masked scores of one key block: (q k^T) * scale, rounded in q's dtype as the reference
    computes them when EXACT; -inf where a row may not see a key."""
    k = _from_cache(k_cache_ptr, kv_offsets, kv_mask, k_scale_ptr, q_dtype, INTERPRET)
    if EXACT:
        scores = rounded(rounded(dot_f32(q, tl.trans(k), INTERPRET), q_dtype, INTERPRET) * scale, q_dtype, INTERPRET)
    else:
        scores = dot_f32(q, tl.trans(k), INTERPRET) * (scale * 1.4426950408889634)  # log2 units
    visible = (keys[None, :] <= positions[:, None]) & row_ok[:, None]
    return tl.where(visible, scores, float("-inf"))


@triton.jit
def attention_gqa(
    q_ptr, k_cache_ptr, v_cache_ptr, lens_ptr, out_ptr, k_scale_ptr, v_scale_ptr,
    length, num_heads, num_kv_heads, head_dim, capacity,
    scale, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    EXACT: tl.constexpr, INTERPRET: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    group = num_heads // num_kv_heads
    rows = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)  # row = token * group + head in group
    tokens = rows // group
    heads = kv_head * group + rows % group
    row_ok = tokens < length
    ds = tl.arange(0, BLOCK_D)
    d_ok = ds < head_dim
    past = tl.load(lens_ptr + seq)
    positions = past + tokens  # each row sees keys 0..positions
    q_dtype: tl.constexpr = q_ptr.dtype.element_ty
    q_offsets = ((seq * length + tokens[:, None]) * num_heads + heads[:, None]) * head_dim + ds[None, :]
    q = tl.load(q_ptr + q_offsets, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    valid_end = past + length  # keys written so far; later slots may hold anything
    last_token = tl.minimum(tl.program_id(2) * BLOCK_M + BLOCK_M - 1, length * group - 1) // group
    key_end = past + last_token + 1
    row_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    cache_base = (seq * num_kv_heads + kv_head) * capacity
    for start in range(0, key_end, BLOCK_N):
        keys, kv_offsets, kv_mask = _key_block(start, cache_base, head_dim, ds, d_ok, valid_end, BLOCK_N)
        scores = _scores(q, k_cache_ptr, k_scale_ptr, kv_offsets, kv_mask, keys, positions, row_ok, scale, q_dtype,
                         EXACT, INTERPRET)
        new_max = tl.maximum(row_max, tl.max(scores, axis=1))
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        if EXACT:
            row_sum = row_sum * tl.exp(row_max - safe_max) + tl.sum(tl.exp(scores - safe_max[:, None]), axis=1)
        else:
            probs = tl.exp2(scores - safe_max[:, None])
            correction = tl.exp2(row_max - safe_max)
            row_sum = row_sum * correction + tl.sum(probs, axis=1)
            v = _from_cache(v_cache_ptr, kv_offsets, kv_mask, v_scale_ptr, q_dtype, INTERPRET)
            acc = acc * correction[:, None] + dot_f32(cast_rne(probs, q_dtype, INTERPRET), v, INTERPRET)
        row_max = new_max
    if EXACT:
        # Second pass: the normalised probabilities, rounded to q's dtype, times V (fp32 accumulation).
        safe_max = tl.where(row_max == float("-inf"), 0.0, row_max)
        inverse = 1.0 / tl.where(row_sum == 0.0, 1.0, row_sum)
        for start in range(0, key_end, BLOCK_N):
            keys, kv_offsets, kv_mask = _key_block(start, cache_base, head_dim, ds, d_ok, valid_end, BLOCK_N)
            scores = _scores(q, k_cache_ptr, k_scale_ptr, kv_offsets, kv_mask, keys, positions, row_ok, scale,
                             q_dtype, EXACT, INTERPRET)
            probs = tl.exp(scores - safe_max[:, None]) * inverse[:, None]
            v = _from_cache(v_cache_ptr, kv_offsets, kv_mask, v_scale_ptr, q_dtype, INTERPRET)
            acc += dot_f32(cast_rne(probs, q_dtype, INTERPRET), v, INTERPRET)
        out = acc
    else:
        out = acc / tl.where(row_sum == 0.0, 1.0, row_sum)[:, None]
    tl.store(out_ptr + q_offsets, cast_rne(out, out_ptr.dtype.element_ty, INTERPRET), mask=row_ok[:, None] & d_ok[None, :])
