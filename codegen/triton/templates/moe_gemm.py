"""Grouped MoE GEMM over ragged expert segments with NVFP4 weights: the fused expert up-GEMM
(gather + GEMM + ReLU-squared) and down-GEMM (GEMM + routing-weight scatter), and the combine.

Rows are (token, slot) pairs sorted by expert (`order`, `offsets` of moe_dispatch). Program
(t, n) owns M-tile t of one expert and an N-tile; the expert of tile t is found by a binary
search over `tile_starts` (the cumulative tile counts per expert, computed on the device), so the
grid has a fixed size cdiv(M, BLOCK_M) + E and no host sync: extra programs exit at once.

ACT_FORMAT selects the activation side:
- "bf16" (W4A16, Hopper): packed E2M1 codes and E4M3 block scales are dequantized in registers
  to bf16 (code value times block scale is exact in bf16), the dot is bf16 x bf16 -> fp32, and the
  per-expert fp32 global scale multiplies the accumulator.
- "nvfp4" (W4A4, Blackwell): the activation tile is quantized on load to NVFP4 (dynamic E4M3 block
  scales, per-expert static input_scale) and multiplied by `tl.dot_scaled` (tcgen05 mxf4nvf4).
  Or, where x is a uint8 pointer (CODES: the `quant_linear` after a fused norm, which reads the
  norm's nvfp4codes), x holds NVFP4 codes already, packed two per byte [rows, K/2], with their E4M3
  block scales at x_scale [rows, K/16] (under input_scale as global scale): both are loaded as they
  are and go to `tl.dot_scaled` unchanged, 0.5 + 1/16 byte per activation, nothing rounded again.

DENSE is the same GEMM for a dense `linear` / `quant_linear` (one weight [1, N, K/2], no experts):
program (m, n) owns rows m * BLOCK_M .. of `rows`, nothing is gathered or combined, and the
epilogue may add a bias (HAS_BIAS). It is a mode of this kernel rather than a template of its own
because everything that matters is shared: the K loop (the NVFP4 dequantization in registers for
W4A16, the quantize-on-load and tl.dot_scaled for W4A4, the interpreter paths, the masked last K
step), split-K with its reduce, and the epilogue; only where a program's rows come from differs,
and a copy of the K loop would be a second place to keep those numerics right. The expert-schedule
pointers (order, tile_starts, offsets, routing) are not read in DENSE mode.

SPLIT_K > 1 splits K over a third grid axis: program (t, n, s) sums K slice s (SLICE_TILES whole
BLOCK_K steps; the last slice ends at K, its last step masked as usual) in fp32 and stores the
partial tile unscaled at workspace[row, s, :] (workspace fp32 [rows, SPLIT_K, N]); then
moe_nvfp4_gemm_reduce, over the same tiles, sums the SPLIT_K partials in slice order (no atomics:
the result does not depend on timing) and applies the epilogue. SPLIT_K 1 is the single kernel,
which applies the epilogue itself and never touches the workspace.

INTERPRET (true only under TRITON_INTERPRET=1): the interpreter's bf16 tl.dot multiplies raw bits
(Triton issue 11584) and its dot_scaled decodes E4M3 scales as E8M0, so in interpreter mode only
both operands are dequantized explicitly to fp32 and multiplied with input_precision="ieee" (codes
read as they are too: E2M1 value times block scale, exact in fp32).
"""

import triton
import triton.language as tl

from .numerics import (
    cast_rne,
    rounded,
    split_k_slice,
    store_split_k_partial,
    sum_split_k_partials,
    zero_accumulator,
)
from .quant_math import (
    e2m1_value,
    expand_block_scales,
    nvfp4_quantize_tile,
    pack_e2m1,
    unpack_e2m1,
)


@triton.jit
def _find_expert(tile_starts_ptr, pid, NUM_EXPERTS: tl.constexpr):
    """The last expert e with tile_starts[e] <= pid (experts without tiles are skipped over)."""
    low = pid * 0
    high = low + (NUM_EXPERTS - 1)
    while low < high:
        middle = (low + high + 1) // 2
        start = tl.load(tile_starts_ptr + middle)
        low = tl.where(start <= pid, middle, low)
        high = tl.where(start <= pid, high, middle - 1)
    return low


@triton.jit
def moe_nvfp4_gemm(
    x_ptr, order_ptr, tile_starts_ptr, offsets_ptr, weight_ptr, block_scale_ptr, global_scale_ptr,
    input_scale_ptr, routing_ptr, out_ptr, workspace_ptr, bias_ptr, x_scale_ptr, rows,
    N: tl.constexpr, K: tl.constexpr, NUM_EXPERTS: tl.constexpr, TOP_K: tl.constexpr,
    GATHER: tl.constexpr, ACTIVATION: tl.constexpr, COMBINE: tl.constexpr, ACT_FORMAT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SWAP_AB: tl.constexpr,
    SPLIT_K: tl.constexpr, DENSE: tl.constexpr, HAS_BIAS: tl.constexpr, INTERPRET: tl.constexpr,
):
    """out[r] = epilogue(x[src(r)] @ W[e]^T) for the rows r of expert e.

    x: [*, K] (GATHER: row order[r] // TOP_K; else row r). weight uint8 [E, N, K/2], block_scale
    float8e4nv [E, N, K/16], global_scale fp32 [E], input_scale fp32 [E] (nvfp4 only).
    ACTIVATION "relu2" squares the positive part. COMBINE: the row is multiplied by its routing
    weight routing[order[r]] (routing: [tokens * TOP_K] fp32) and stored as fp32 at row order[r]
    of out [tokens * TOP_K, N] (moe_combine_rows then sums each token's TOP_K rows); else stored
    at row r in out's dtype. DENSE: rows 0..rows-1 of x [rows, K] and out [rows, N], weight [1, N, K/2],
    plus bias [N] (out's dtype) with HAS_BIAS. CODES (x uint8): x [*, K/2] packed NVFP4 codes and
    x_scale float8e4nv [*, K/16] their block scales (ACT_FORMAT nvfp4; x_scale is not read otherwise).
    """
    # x holds NVFP4 codes a fused norm wrote (packed E2M1, block scales at x_scale_ptr)
    CODES: tl.constexpr = x_ptr.dtype.element_ty == tl.uint8
    tl.static_assert(not CODES or ACT_FORMAT == "nvfp4", "NVFP4 codes are read by the W4A4 GEMM")
    tl.static_assert(not (SWAP_AB and ACT_FORMAT == "nvfp4"), "SWAP_AB is a W4A16 option")
    tl.static_assert(not (DENSE and (GATHER or COMBINE or NUM_EXPERTS != 1)), "DENSE has one weight, no routing")
    tl.static_assert(not (HAS_BIAS and not DENSE), "a bias is a DENSE option")
    pid = tl.program_id(0)
    if not DENSE:
        if pid >= tl.load(tile_starts_ptr + NUM_EXPERTS):
            return
    expert, row_ids, row_mask = _program_rows(tile_starts_ptr, offsets_ptr, rows, pid, NUM_EXPERTS, BLOCK_M, DENSE)
    if GATHER:
        source_rows = tl.load(order_ptr + row_ids, mask=row_mask, other=0) // TOP_K
    else:
        source_rows = row_ids
    col_ids = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = col_ids < N
    expert64 = expert.to(tl.int64)
    weight_rows = weight_ptr + expert64 * (N * K // 2) + col_ids[:, None] * (K // 2)
    scale_rows = block_scale_ptr + expert64 * (N * K // 16) + col_ids[:, None] * (K // 16)
    if CODES:
        x_rows = x_ptr + source_rows.to(tl.int64)[:, None] * (K // 2)
        x_scale_rows = x_scale_ptr + source_rows.to(tl.int64)[:, None] * (K // 16)
    else:
        x_rows = x_ptr + source_rows.to(tl.int64)[:, None] * K
    if ACT_FORMAT == "nvfp4":
        input_scale = tl.load(input_scale_ptr + expert)
    acc = zero_accumulator(BLOCK_M, BLOCK_N, SWAP_AB)
    # K is a multiple of 16 (the NVFP4 block), BLOCK_K need not divide it: the last step's elements
    # beyond K load as code 0 with block scale 0 (and activation 0), which adds nothing to the dot.
    EVEN_K: tl.constexpr = K % BLOCK_K == 0
    if SPLIT_K == 1:  # constexpr bounds: the loop of the single kernel
        k_begin: tl.constexpr = 0
        k_end: tl.constexpr = K
    else:
        k_begin, k_end = split_k_slice(K, BLOCK_K, SPLIT_K)
    for k0 in range(k_begin, k_end, BLOCK_K):
        k_ids = k0 + tl.arange(0, BLOCK_K)
        byte_ids = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        block_ids = k0 // 16 + tl.arange(0, BLOCK_K // 16)
        if EVEN_K:
            if CODES:
                x_packed = tl.load(x_rows + byte_ids[None, :], mask=row_mask[:, None], other=0)
                x_scales = tl.load(x_scale_rows + block_ids[None, :], mask=row_mask[:, None], other=0.0)
            else:
                x = tl.load(x_rows + k_ids[None, :], mask=row_mask[:, None], other=0.0)
            packed = tl.load(weight_rows + byte_ids[None, :], mask=col_mask[:, None], other=0)
            scales = tl.load(scale_rows + block_ids[None, :], mask=col_mask[:, None], other=0.0).to(tl.float32)
        else:
            if CODES:
                x_packed = tl.load(x_rows + byte_ids[None, :], mask=row_mask[:, None] & (byte_ids < K // 2)[None, :],
                                   other=0)
                x_scales = tl.load(x_scale_rows + block_ids[None, :],
                                   mask=row_mask[:, None] & (block_ids < K // 16)[None, :], other=0.0)
            else:
                x = tl.load(x_rows + k_ids[None, :], mask=row_mask[:, None] & (k_ids < K)[None, :], other=0.0)
            packed = tl.load(weight_rows + byte_ids[None, :], mask=col_mask[:, None] & (byte_ids < K // 2)[None, :],
                             other=0)
            scales = tl.load(scale_rows + block_ids[None, :], mask=col_mask[:, None] & (block_ids < K // 16)[None, :],
                             other=0.0).to(tl.float32)
        if CODES:
            # the norm's codes and block scales as they are (masked rows and K beyond load code 0)
            if INTERPRET:
                x_values = unpack_e2m1(x_packed) * expand_block_scales(x_scales.to(tl.float32), BLOCK_K)
                w_values = unpack_e2m1(packed) * expand_block_scales(scales, BLOCK_K)
                acc = tl.dot(x_values, tl.trans(w_values), acc, input_precision="ieee")
            else:
                acc = tl.dot_scaled(x_packed, x_scales, "e2m1", tl.trans(packed), scales.to(tl.float8e4nv), "e2m1",
                                    acc)
        elif ACT_FORMAT == "nvfp4":
            codes, x_scales = nvfp4_quantize_tile(x.to(tl.float32), input_scale)
            if INTERPRET:
                x_values = e2m1_value(codes) * expand_block_scales(x_scales, BLOCK_K)
                w_values = unpack_e2m1(packed) * expand_block_scales(scales, BLOCK_K)
                acc = tl.dot(x_values, tl.trans(w_values), acc, input_precision="ieee")
            else:
                acc = tl.dot_scaled(pack_e2m1(codes), x_scales.to(tl.float8e4nv), "e2m1",
                                    tl.trans(packed), scales.to(tl.float8e4nv), "e2m1", acc)
        else:
            w_values = unpack_e2m1(packed) * expand_block_scales(scales, BLOCK_K)
            if INTERPRET or x_ptr.dtype.element_ty == tl.float32:
                # fp32 activations keep an exact fp32 dot when compiled too (no tensor cores: the
                # reference multiplies in fp32, and bf16 operands would round x)
                x_operand = x.to(tl.float32)
            else:
                x_operand = x.to(tl.bfloat16)
                w_values = w_values.to(tl.bfloat16)  # exact: an E2M1 value times an E4M3 scale
            if SWAP_AB:
                acc = tl.dot(w_values, tl.trans(x_operand), acc, input_precision="ieee")
            else:
                acc = tl.dot(x_operand, tl.trans(w_values), acc, input_precision="ieee")
    if SWAP_AB:
        acc = tl.trans(acc)
    if SPLIT_K == 1:
        _moe_epilogue(acc, expert, row_ids, row_mask, col_ids, col_mask, x_ptr, order_ptr, global_scale_ptr,
                      input_scale_ptr, routing_ptr, out_ptr, bias_ptr, N, ACTIVATION, COMBINE, ACT_FORMAT, HAS_BIAS,
                      INTERPRET)
    else:
        store_split_k_partial(workspace_ptr, acc, row_ids, col_ids, row_mask[:, None] & col_mask[None, :], N,
                              SPLIT_K)


@triton.jit
def moe_nvfp4_gemm_reduce(
    workspace_ptr, x_ptr, order_ptr, tile_starts_ptr, offsets_ptr, global_scale_ptr, input_scale_ptr, routing_ptr,
    out_ptr, bias_ptr, rows,
    N: tl.constexpr, NUM_EXPERTS: tl.constexpr, ACTIVATION: tl.constexpr, COMBINE: tl.constexpr,
    ACT_FORMAT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr,
    DENSE: tl.constexpr, HAS_BIAS: tl.constexpr, INTERPRET: tl.constexpr,
):
    """The second launch of a split-K moe_nvfp4_gemm: over the GEMM's tiles (the same tile_starts,
    BLOCK_M and BLOCK_N), the SPLIT_K partial sums of workspace [rows, SPLIT_K, N] added in slice
    order, then the GEMM's epilogue. x_ptr is read for its dtype only (the down-GEMM's rounding)."""
    pid = tl.program_id(0)
    if not DENSE:
        if pid >= tl.load(tile_starts_ptr + NUM_EXPERTS):
            return
    expert, row_ids, row_mask = _program_rows(tile_starts_ptr, offsets_ptr, rows, pid, NUM_EXPERTS, BLOCK_M, DENSE)
    col_ids = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = col_ids < N
    mask = row_mask[:, None] & col_mask[None, :]
    acc = sum_split_k_partials(workspace_ptr, row_ids, col_ids, mask, N, SPLIT_K)
    _moe_epilogue(acc, expert, row_ids, row_mask, col_ids, col_mask, x_ptr, order_ptr, global_scale_ptr,
                  input_scale_ptr, routing_ptr, out_ptr, bias_ptr, N, ACTIVATION, COMBINE, ACT_FORMAT, HAS_BIAS,
                  INTERPRET)


@triton.jit
def _tile_rows(tile_starts_ptr, offsets_ptr, pid, NUM_EXPERTS: tl.constexpr, BLOCK_M: tl.constexpr):
    """The expert of M-tile `pid`, the tile's row ids and which of them belong to the expert."""
    expert = _find_expert(tile_starts_ptr, pid, NUM_EXPERTS)
    row_start = tl.load(offsets_ptr + expert) + (pid - tl.load(tile_starts_ptr + expert)) * BLOCK_M
    row_end = tl.load(offsets_ptr + expert + 1)
    row_ids = row_start + tl.arange(0, BLOCK_M)
    return expert, row_ids, row_ids < row_end


@triton.jit
def _program_rows(tile_starts_ptr, offsets_ptr, rows, pid, NUM_EXPERTS: tl.constexpr, BLOCK_M: tl.constexpr,
                  DENSE: tl.constexpr):
    """(expert, row ids, row mask) of program `pid`: an expert's M-tile, or (DENSE) rows pid * BLOCK_M
    onwards of `rows`, all of expert 0."""
    if DENSE:
        row_ids = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        expert = pid * 0
        row_mask = row_ids < rows
    else:
        expert, row_ids, row_mask = _tile_rows(tile_starts_ptr, offsets_ptr, pid, NUM_EXPERTS, BLOCK_M)
    return expert, row_ids, row_mask


@triton.jit
def _moe_epilogue(acc, expert, row_ids, row_mask, col_ids, col_mask, x_ptr, order_ptr, global_scale_ptr,
                  input_scale_ptr, routing_ptr, out_ptr, bias_ptr, N: tl.constexpr, ACTIVATION: tl.constexpr,
                  COMBINE: tl.constexpr, ACT_FORMAT: tl.constexpr, HAS_BIAS: tl.constexpr, INTERPRET: tl.constexpr):
    """The finished K sum (fp32 [BLOCK_M, BLOCK_N]) scaled, biased, activated and stored (see moe_nvfp4_gemm)."""
    scale = tl.load(global_scale_ptr + expert)
    if ACT_FORMAT == "nvfp4":
        scale = scale * tl.load(input_scale_ptr + expert)
    acc = acc * scale
    if HAS_BIAS:  # the reference adds the bias in fp32 to the scaled sum, then rounds once
        acc = acc + tl.load(bias_ptr + col_ids, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if ACTIVATION == "relu2":
        # The GEMM result rounded to the output dtype first, then relu² rounded again: the reference
        # returns grouped_gemm in the op's dtype and squares that.
        acc = tl.maximum(rounded(acc, out_ptr.dtype.element_ty, INTERPRET), 0.0)
        acc = acc * acc
    mask = row_mask[:, None] & col_mask[None, :]
    if COMBINE:
        # Each expert row rounded to the activation dtype (the reference's grouped_gemm output, in the
        # op's dtype, which codegen/triton/plan.py requires to be the input's), then weighted in fp32.
        acc = rounded(acc, x_ptr.dtype.element_ty, INTERPRET)
        pairs = tl.load(order_ptr + row_ids, mask=row_mask, other=0)
        acc = acc * tl.load(routing_ptr + pairs, mask=row_mask, other=0.0)[:, None]
        tl.store(out_ptr + pairs[:, None] * N + col_ids[None, :], acc, mask=mask)
    else:
        tl.store(out_ptr + row_ids.to(tl.int64)[:, None] * N + col_ids[None, :],
                 cast_rne(acc, out_ptr.dtype.element_ty, INTERPRET), mask=mask)


@triton.jit
def moe_combine_rows(pairs_ptr, out_ptr, N: tl.constexpr, TOP_K: tl.constexpr, BLOCK_N: tl.constexpr,
                     INTERPRET: tl.constexpr):
    """out[t] = sum over slots j of pairs[t * TOP_K + j] (fp32, in slot order), cast to out's dtype."""
    token = tl.program_id(0).to(tl.int64)
    col_ids = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = col_ids < N
    total = tl.zeros([BLOCK_N], dtype=tl.float32)
    for slot in tl.static_range(TOP_K):
        total += tl.load(pairs_ptr + (token * TOP_K + slot) * N + col_ids, mask=col_mask, other=0.0)
    tl.store(out_ptr + token * N + col_ids, cast_rne(total, out_ptr.dtype.element_ty, INTERPRET), mask=col_mask)
