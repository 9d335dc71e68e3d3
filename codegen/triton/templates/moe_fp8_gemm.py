"""Grouped MoE GEMM over ragged expert segments with FP8 E4M3 weights: the fused expert up-GEMM
(gather + GEMM + ReLU-squared) and down-GEMM (GEMM + routing-weight scatter) of an FP8 export
(ModelOpt FP8_DEFAULT_CFG: every routed expert W8A8, a static input_scale per expert).

It is made of the two kernels it shares everything with, not a copy of either: the expert
schedule (`_tile_rows`: the M-tile's expert found by binary search over tile_starts, no host sync,
an expert without rows owns no tile) and the epilogue (`_moe_epilogue`: ReLU², or the routing
weight and the scatter to the pair's row for moe_combine_rows) come from moe_gemm.py; the K loop
(`fp8_k_sum`: activations rounded to E4M3 on load, fp8 x fp8 tensor-core dot, the masked last K
step, the interpreter's fp32 path) from fp8_gemm.py. What is its own: where a tile's rows and
weights live (x[order[r] // TOP_K], the expert's weight [N, K]) and the scales: the weight scale of
the expert's output rows, read at weight_scale[expert * scale_expert_stride + column *
scale_column_stride] (runtime strides: one binary takes a per-tensor [] (0, 0), per-expert [E]
(1, 0) or per-channel [E, N] (N, 1) scale as the importer gives it, without a copy), times the
expert's input scale (W8A8; 1 for W8A16).

QUANT_ACT (W8A8): x (bf16) divided by input_scale[expert] and rounded to E4M3 (clamped to +-448,
ties to even) on load, exactly as the `quantize` op with offsets does; the dot is fp8 x fp8 ->
fp32 (`wgmma ... e4m3.e4m3` on sm_90a, `tcgen05.mma ... kind::f8f6f4` on sm_100a). Without it
(W8A16) the weight codes are upcast to bf16 (exact) for a bf16 dot.

INTERPRET (true only under TRITON_INTERPRET=1): the interpreter's fp32 -> fp8e4nv cast is wrong and
its bf16 dot multiplies raw bits (Triton issue 11584), so in interpreter mode only the operands are
upcast to fp32 (exact: E4M3 and bf16 values are fp32 values) and multiplied with
input_precision="ieee" (fp8_k_sum's INTERPRET branch); the compiled kernel never takes that path.

No split-K: at decode each hit expert already gives N / BLOCK_N programs (Nano's up-GEMM at batch
1: 6 experts x 29 = 174 programs of 64 rows of weights), enough to stream the weights from HBM.
"""

import triton
import triton.language as tl

from .fp8_gemm import fp8_k_sum
from .moe_gemm import _moe_epilogue, _tile_rows


@triton.jit
def moe_fp8_gemm(
    x_ptr, order_ptr, tile_starts_ptr, offsets_ptr, weight_ptr, weight_scale_ptr, input_scale_ptr, routing_ptr,
    out_ptr, scale_expert_stride, scale_column_stride,
    N: tl.constexpr, K: tl.constexpr, NUM_EXPERTS: tl.constexpr, TOP_K: tl.constexpr, GATHER: tl.constexpr,
    ACTIVATION: tl.constexpr, COMBINE: tl.constexpr, QUANT_ACT: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SWAP_AB: tl.constexpr, INTERPRET: tl.constexpr,
):
    """out[r] = epilogue(Q(x[src(r)]) @ W[e]^T * weight_scale[e] * input_scale[e]) for the rows r of expert e.

    x: [*, K] bf16 (GATHER: row order[r] // TOP_K; else row r). weight float8e4nv [E, N, K],
    weight_scale fp32 (its strides per expert and per output column given), input_scale fp32 [E]
    (ones for W8A16). ACTIVATION and COMBINE as in
    moe_nvfp4_gemm: "relu2" squares the positive part; COMBINE multiplies the row by its routing
    weight routing[order[r]] and stores it as fp32 at row order[r] of out [tokens * TOP_K, N].
    """
    pid = tl.program_id(0)
    if pid >= tl.load(tile_starts_ptr + NUM_EXPERTS):
        return  # the grid's upper bound on tiles exceeds this routing's
    expert, row_ids, row_mask = _tile_rows(tile_starts_ptr, offsets_ptr, pid, NUM_EXPERTS, BLOCK_M)
    col_ids = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = col_ids < N
    x_row_ids = row_ids
    if GATHER:  # the pair's token row, read in place (no gathered copy of x)
        x_row_ids = tl.load(order_ptr + row_ids, mask=row_mask, other=0) // TOP_K
    expert_columns = expert.to(tl.int64) * N + col_ids
    acc = fp8_k_sum(x_ptr + x_row_ids.to(tl.int64)[:, None] * K, weight_ptr + expert_columns[:, None] * K,
                    row_mask, col_mask, tl.load(input_scale_ptr + expert), K, QUANT_ACT, BLOCK_M, BLOCK_N, BLOCK_K,
                    SWAP_AB, 1, INTERPRET)
    scale_ids = expert.to(tl.int64) * scale_expert_stride + col_ids * scale_column_stride
    acc = acc * tl.load(weight_scale_ptr + scale_ids, mask=col_mask, other=0.0)[None, :]
    # the expert's input scale is the epilogue's per-expert scale (its "global" one); nothing else is scaled
    # (no bias: out_ptr stands in for the bias pointer the epilogue does not read without HAS_BIAS)
    _moe_epilogue(acc, expert, row_ids, row_mask, col_ids, col_mask, x_ptr, order_ptr, input_scale_ptr,
                  input_scale_ptr, routing_ptr, out_ptr, out_ptr, N, ACTIVATION, COMBINE, "fp8", False, INTERPRET)
