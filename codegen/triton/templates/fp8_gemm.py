"""FP8 E4M3 GEMM: out = Q(x) @ dequant(W)^T + bias, for the shared experts and the Mamba
in/out projections (W8A8), or with bf16 activations (W8A16, QUANT_ACT false).

W8A8 (QUANT_ACT) reads x in one of two forms, picked by x's element type:
- bf16/fp32 activations, rounded on load: Q rounds x / input_scale to E4M3 (clamped to +-448, ties
  to even) with the static per-tensor scale, as the `quantize` op does; the rounding is done in
  fp32 arithmetic (quant_math) and the exact result cast to float8e4nv;
- float8e4nv codes a fused norm already wrote (add_rms_norm with FP8 output, then quant_linear),
  which mean codes * input_scale: loaded as they are, 1 byte per element.
Either way the dot is fp8 x fp8 -> fp32 (wgmma on sm_90a, tcgen05 kind::f8f6f4 on sm_100a) and
input_scale multiplies the accumulator. The weight scale is per tensor ([1]) or per output row
([N], PER_CHANNEL).

Without QUANT_ACT the activations are bf16 (W8A16).

SPLIT_K > 1: program (m, n, s) sums K slice s (whole BLOCK_K steps; the last slice ends at K) in
fp32 into workspace fp32 [rows, SPLIT_K, N] unscaled, and fp8_linear_reduce sums the SPLIT_K
partials in slice order (no atomics) and applies the epilogue (scales, bias, cast). SPLIT_K 1 is
the single kernel, which applies the epilogue itself.

INTERPRET (true only under TRITON_INTERPRET=1): the interpreter's fp32 -> fp8e4nv cast is wrong and
its bf16 tl.dot multiplies raw bits (Triton issue 11584), so where x is rounded on load or is bf16
the operands are upcast to fp32 there (exact: every E4M3 and bf16 value is an fp32 value) and the dot
runs in fp32 "ieee"; the compiled kernel never takes that path. Codes read as they are run the fp8
dot in the interpreter too: its fp8 x fp8 dot is exact (Triton 3.9, checked over every finite code).
"""

import triton
import triton.language as tl

from .numerics import cast_rne, split_k_slice, store_split_k_partial, sum_split_k_partials, zero_accumulator
from .quant_math import round_to_e4m3_signed


@triton.jit
def _dot(acc, x, w, SWAP_AB: tl.constexpr):
    """acc + x @ w^T, or its transpose (SWAP_AB: the weight tile is the MMA's M side)."""
    if SWAP_AB:
        return tl.dot(w, tl.trans(x), acc, input_precision="ieee")
    else:
        return tl.dot(x, tl.trans(w), acc, input_precision="ieee")


@triton.jit
def fp8_linear(
    x_ptr, input_scale_ptr, weight_ptr, weight_scale_ptr, bias_ptr, out_ptr, workspace_ptr, rows,
    N: tl.constexpr, K: tl.constexpr, QUANT_ACT: tl.constexpr, PER_CHANNEL: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SWAP_AB: tl.constexpr,
    SPLIT_K: tl.constexpr, INTERPRET: tl.constexpr,
):
    """x [rows, K] (bf16/fp32, or float8e4nv codes with QUANT_ACT), weight float8e4nv [N, K], out [rows, N]."""
    row_ids = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    col_ids = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = row_ids < rows
    col_mask = col_ids < N
    x_rows = x_ptr + row_ids.to(tl.int64)[:, None] * K
    weight_rows = weight_ptr + col_ids.to(tl.int64)[:, None] * K
    if QUANT_ACT:
        input_scale = tl.load(input_scale_ptr)
    else:
        input_scale = 1.0
    acc = fp8_k_sum(x_rows, weight_rows, row_mask, col_mask, input_scale, K, QUANT_ACT, BLOCK_M, BLOCK_N, BLOCK_K,
                    SWAP_AB, SPLIT_K, INTERPRET)
    if SPLIT_K == 1:
        _epilogue(acc, row_ids, row_mask, col_ids, col_mask, input_scale_ptr, weight_scale_ptr, bias_ptr, out_ptr,
                  N, QUANT_ACT, PER_CHANNEL, HAS_BIAS, INTERPRET)
    else:
        store_split_k_partial(workspace_ptr, acc, row_ids, col_ids, row_mask[:, None] & col_mask[None, :], N,
                              SPLIT_K)


@triton.jit
def fp8_k_sum(x_rows, weight_rows, row_mask, col_mask, input_scale, K: tl.constexpr, QUANT_ACT: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SWAP_AB: tl.constexpr,
              SPLIT_K: tl.constexpr, INTERPRET: tl.constexpr):
    """sum over K (over K slice program_id(2) when SPLIT_K > 1) of Q(x) times the FP8 weight's codes,
    unscaled, fp32 [BLOCK_M, BLOCK_N]: x_rows [BLOCK_M, 1] and weight_rows [BLOCK_N, 1] point at the
    rows' first elements (K contiguous), the masks say which rows exist. Q rounds x / input_scale to
    E4M3 (QUANT_ACT, bf16/fp32 x), or x holds E4M3 codes already (read as they are), or x is bf16
    and the weight is upcast (W8A16). Shared by fp8_linear and the grouped FP8 GEMM (moe_fp8_gemm)."""
    # x holds E4M3 codes already (a fused norm's output): nothing to round on load.
    CODES: tl.constexpr = x_rows.dtype.element_ty == tl.float8e4nv
    acc = zero_accumulator(BLOCK_M, BLOCK_N, SWAP_AB)
    # BLOCK_K need not divide K: the last step's elements beyond K load as 0 and add nothing.
    EVEN_K: tl.constexpr = K % BLOCK_K == 0
    if SPLIT_K == 1:  # constexpr bounds: the loop of the single kernel
        k_begin: tl.constexpr = 0
        k_end: tl.constexpr = K
    else:
        k_begin, k_end = split_k_slice(K, BLOCK_K, SPLIT_K)
    for k0 in range(k_begin, k_end, BLOCK_K):
        k_ids = k0 + tl.arange(0, BLOCK_K)
        if EVEN_K:
            x = tl.load(x_rows + k_ids[None, :], mask=row_mask[:, None], other=0.0)
            w = tl.load(weight_rows + k_ids[None, :], mask=col_mask[:, None], other=0.0)
        else:
            k_mask = (k_ids < K)[None, :]
            x = tl.load(x_rows + k_ids[None, :], mask=row_mask[:, None] & k_mask, other=0.0)
            w = tl.load(weight_rows + k_ids[None, :], mask=col_mask[:, None] & k_mask, other=0.0)
        if CODES:
            # fp8 x fp8 in both modes: the interpreter's fp8 dot equals an fp32 matmul of the decoded
            # values (measured with Triton 3.9 over every finite E4M3 code; the norm writes no NaN).
            x_operand = x
            w_operand = w
        elif INTERPRET:
            x_operand = x.to(tl.float32)
            if QUANT_ACT:
                x_operand = round_to_e4m3_signed(tl.math.div_rn(x_operand, input_scale))
            w_operand = w.to(tl.float32)
        elif QUANT_ACT:
            x_operand = round_to_e4m3_signed(tl.math.div_rn(x.to(tl.float32), input_scale)).to(tl.float8e4nv)
            w_operand = w  # the cast above is exact: the value is an E4M3 value
        else:
            x_operand = x.to(tl.bfloat16)
            w_operand = w.to(tl.bfloat16)  # exact: every E4M3 value is a bf16 value
        acc = _dot(acc, x_operand, w_operand, SWAP_AB)
    if SWAP_AB:
        acc = tl.trans(acc)
    return acc


@triton.jit
def fp8_linear_reduce(
    workspace_ptr, input_scale_ptr, weight_scale_ptr, bias_ptr, out_ptr, rows,
    N: tl.constexpr, QUANT_ACT: tl.constexpr, PER_CHANNEL: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr, INTERPRET: tl.constexpr,
):
    """The second launch of a split-K fp8_linear: the SPLIT_K partial sums of workspace
    [rows, SPLIT_K, N] added in slice order, then the GEMM's epilogue."""
    row_ids = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    col_ids = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = row_ids < rows
    col_mask = col_ids < N
    mask = row_mask[:, None] & col_mask[None, :]
    acc = sum_split_k_partials(workspace_ptr, row_ids, col_ids, mask, N, SPLIT_K)
    _epilogue(acc, row_ids, row_mask, col_ids, col_mask, input_scale_ptr, weight_scale_ptr, bias_ptr, out_ptr,
              N, QUANT_ACT, PER_CHANNEL, HAS_BIAS, INTERPRET)


@triton.jit
def _epilogue(acc, row_ids, row_mask, col_ids, col_mask, input_scale_ptr, weight_scale_ptr, bias_ptr, out_ptr,
              N: tl.constexpr, QUANT_ACT: tl.constexpr, PER_CHANNEL: tl.constexpr, HAS_BIAS: tl.constexpr,
              INTERPRET: tl.constexpr):
    """The finished K sum (fp32 [BLOCK_M, BLOCK_N]) scaled, biased, rounded and stored."""
    if PER_CHANNEL:
        acc = acc * tl.load(weight_scale_ptr + col_ids, mask=col_mask, other=0.0)[None, :]
    else:
        acc = acc * tl.load(weight_scale_ptr)
    if QUANT_ACT:
        acc = acc * tl.load(input_scale_ptr)
    if HAS_BIAS:
        acc = acc + tl.load(bias_ptr + col_ids, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    mask = row_mask[:, None] & col_mask[None, :]
    tl.store(out_ptr + row_ids.to(tl.int64)[:, None] * N + col_ids[None, :], cast_rne(acc, out_ptr.dtype.element_ty, INTERPRET),
             mask=mask)
