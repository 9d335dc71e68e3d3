"""Causal grouped-query attention against the preallocated KV cache in standard ONNX: the new keys
and values are scattered at positions cache_lens[b].. (ScatterND), and each query attends to the
whole cache under a mask of the positions it may see; masked positions weigh exactly zero, so this
is runtime/reference/attention.py's arithmetic over the cache's first cache_lens[b] + t + 1 keys."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from nemocompile.graph.ir import Op
from nemocompile.graph.opdef import operand

from .context import Lowering


def _req(op: Op, name: str) -> str:
    found = operand(op, name)
    assert found is not None
    return found


def attention_gqa(low: Lowering, op: Op) -> None:
    b = low.b
    at = op.attrs
    heads, kv_heads, head_dim = at.int("num_heads"), at.int("num_kv_heads"), at.int("head_dim")
    group = heads // kv_heads
    q, k, v, k_cache, v_cache, lens = (_req(op, n) for n in ("q", "k", "v", "k_cache", "v_cache", "cache_lens"))
    q_dtype = low.type_of(q).dtype

    shape_q = b.one("Shape", [low.value(q)])
    batch = b.one("Gather", [shape_q, b.i64(0)], axis=0)
    length = b.one("Gather", [shape_q, b.i64(1)], axis=0)
    steps = b.one("Range", [b.i64(0), length, b.i64(1)])
    lens64 = b.one("Cast", [low.value(lens)], to=TensorProto.INT64)
    positions = b.one("Add", [b.one("Unsqueeze", [lens64, b.ints([1])]), b.one("Unsqueeze", [steps, b.ints([0])])])
    rows = b.one("Range", [b.i64(0), batch, b.i64(1)])
    rows = b.one("Mul", [b.one("Unsqueeze", [rows, b.ints([1])]), b.one("ConstantOfShape", [b.one("Shape", [positions])],
                                                                     value=_int64_one())])
    indices = b.one("Concat", [b.one("Unsqueeze", [rows, b.ints([2])]), b.one("Unsqueeze", [positions, b.ints([2])])],
                    axis=2)  # [B, T, 2]: (sequence, position)

    def written(cache: str, new: str) -> str:
        cache_dtype = low.type_of(cache).dtype
        by_position = b.one("Transpose", [low.value(cache)], perm=[0, 2, 1, 3])  # [B, C, Hkv, Dh]
        update = b.round_to(b.one("Reshape", [low.value(new), b.ints([0, 0, kv_heads, head_dim])]), cache_dtype)
        return b.one("Transpose", [b.one("ScatterND", [by_position, indices, update])], perm=[0, 2, 1, 3])

    k_all, v_all = written(k_cache, k), written(v_cache, v)

    q_heads = b.one("Transpose", [b.one("Reshape", [low.value(q), b.ints([0, 0, heads, head_dim])])], perm=[0, 2, 1, 3])
    q_groups = b.one("Reshape", [q_heads, b.ints([0, kv_heads, group, -1, head_dim])])  # [B, Hkv, g, T, Dh]
    k_groups = b.one("Unsqueeze", [b.round_to(k_all, q_dtype), b.ints([2])])  # [B, Hkv, 1, C, Dh]
    v_groups = b.one("Unsqueeze", [b.round_to(v_all, q_dtype), b.ints([2])])
    scores = b.round_to(b.one("MatMul", [q_groups, b.one("Transpose", [k_groups], perm=[0, 1, 2, 4, 3])]), q_dtype)
    scores = b.round_to(b.one("Mul", [scores, b.scalar(at.float("scale"))]), q_dtype)  # [B, Hkv, g, T, C]

    capacity = b.one("Gather", [b.one("Shape", [k_all]), b.i64(2)], axis=0)
    key_pos = b.one("Range", [b.i64(0), capacity, b.i64(1)])
    hidden = b.one("Greater", [key_pos, b.one("Unsqueeze", [positions, b.ints([1, 2, 4])])])  # [B, 1, 1, T, C]
    scores = b.one("Where", [hidden, b.scalar(-np.inf), scores])
    probs = b.round_to(b.one("Softmax", [scores], axis=-1), q_dtype)
    out = b.round_to(b.one("MatMul", [probs, v_groups]), q_dtype)  # [B, Hkv, g, T, Dh]
    out = b.one("Reshape", [out, b.ints([0, heads, -1, head_dim])])
    out = b.one("Reshape", [b.one("Transpose", [out], perm=[0, 2, 1, 3]), b.ints([0, 0, heads * head_dim])])
    low.bind(op, [out, k_all, v_all])


def _int64_one() -> object:
    from onnx import numpy_helper

    return numpy_helper.from_array(np.ones(1, dtype=np.int64))
