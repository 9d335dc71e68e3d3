"""Reference implementations of the IR's core ops: plain torch functions that define what each op means.

Numerics follow transformers' Nemotron-H modelling code (float32 where it computes in float32,
casts where it casts), so that a model assembled from these ops matches it.
"""

from __future__ import annotations

from nemocompile.runtime.reference.attention import attention_gqa, attention_gqa_cached
from nemocompile.runtime.reference.conv import causal_conv1d
from nemocompile.runtime.reference.elementwise import add, linear, relu2, silu
from nemocompile.runtime.reference.moe import grouped_gemm, moe_combine, moe_dispatch, moe_router
from nemocompile.runtime.reference.norms import gated_rms_norm, rms_norm
from nemocompile.runtime.reference.ssd import ssd_chunk_scan, ssd_state_update

__all__ = [
    "add",
    "attention_gqa",
    "attention_gqa_cached",
    "causal_conv1d",
    "gated_rms_norm",
    "grouped_gemm",
    "linear",
    "moe_combine",
    "moe_dispatch",
    "moe_router",
    "relu2",
    "rms_norm",
    "silu",
    "ssd_chunk_scan",
    "ssd_state_update",
]
