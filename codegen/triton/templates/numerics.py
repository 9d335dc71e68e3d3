"""Rounding and dot helpers for the norm, conv, SSD, attention and router templates, exact in Triton's
interpreter too (INTERPRET true only there), and the tile helpers the GEMM templates share.

The interpreter truncates fp32 -> bf16 and multiplies raw bits in a bf16 tl.dot (Triton issue
11584); compiled code rounds to nearest even and uses the tensor cores. Under INTERPRET, cast_rne
rounds on the bits first (the final cast of an exactly representable value is then right) and
dot_f32 upcasts 16-bit operands to fp32 (products of bf16 values are exact in fp32)."""

import triton
import triton.language as tl


@triton.jit
def round_to_bf16_grid(x):
    """fp32 x rounded to the nearest bf16 (ties to even), still held in fp32."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def cast_rne(x, dtype: tl.constexpr, INTERPRET: tl.constexpr):
    """fp32 x -> dtype, rounding to nearest even in both modes."""
    if INTERPRET and dtype == tl.bfloat16:
        return round_to_bf16_grid(x).to(dtype)
    else:
        return x.to(dtype)


@triton.jit
def rounded(x, dtype: tl.constexpr, INTERPRET: tl.constexpr):
    """fp32 x rounded as if stored in dtype, held in fp32 (to follow a reference computed in dtype)."""
    return cast_rne(x, dtype, INTERPRET).to(tl.float32)


@triton.jit
def dot_f32(a, b, INTERPRET: tl.constexpr):
    """a @ b accumulated in fp32: fp32 operands exactly ("ieee", not tf32), as the fp32 references
    compute; 16-bit operands on the tensor cores, upcast to fp32 under the interpreter."""
    if INTERPRET or a.dtype == tl.float32 or b.dtype == tl.float32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def zero_accumulator(BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SWAP_AB: tl.constexpr):
    """The fp32 accumulator of a GEMM tile: [BLOCK_M, BLOCK_N], or its transpose when SWAP_AB makes
    the weight tile the MMA's M side."""
    if SWAP_AB:
        return tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    else:
        return tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)


@triton.jit
def split_k_slice(K: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    """The K range [begin, end) that split-K program tl.program_id(2) sums: slices of whole BLOCK_K
    steps, so only the last slice holds the masked step past K."""
    SLICE: tl.constexpr = ((K + BLOCK_K - 1) // BLOCK_K + SPLIT_K - 1) // SPLIT_K * BLOCK_K
    begin = tl.program_id(2) * SLICE
    return begin, tl.minimum(begin + SLICE, K)


@triton.jit
def store_split_k_partial(workspace_ptr, acc, row_ids, col_ids, mask, N: tl.constexpr, SPLIT_K: tl.constexpr):
    """Split-K program tl.program_id(2)'s unscaled fp32 tile at workspace[row, slice, :] (workspace
    fp32 [rows, SPLIT_K, N])."""
    partial = workspace_ptr + (row_ids.to(tl.int64)[:, None] * SPLIT_K + tl.program_id(2)) * N + col_ids[None, :]
    tl.store(partial, acc, mask=mask)


@triton.jit
def sum_split_k_partials(workspace_ptr, row_ids, col_ids, mask, N: tl.constexpr, SPLIT_K: tl.constexpr):
    """The SPLIT_K partial tiles of workspace [rows, SPLIT_K, N] added in slice order (no atomics: the
    sum does not depend on timing)."""
    partial = workspace_ptr + row_ids.to(tl.int64)[:, None] * (SPLIT_K * N) + col_ids[None, :]
    acc = tl.load(partial, mask=mask, other=0.0)
    for s in tl.static_range(1, SPLIT_K):
        acc += tl.load(partial + s * N, mask=mask, other=0.0)
    return acc
