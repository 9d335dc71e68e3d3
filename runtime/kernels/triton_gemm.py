"""Launch wrappers of the GEMM kernels: they allocate outputs, build the tile schedule and grids,
and pass the kernel's arguments by name. The meaning of each is a composition of reference ops
(runtime/quantized_ops.py, runtime/reference/moe.py), which tests/test_triton_gemm.py checks.

The expert schedule is computed on the device without a host sync: tile_starts[e] is the number
of BLOCK_M tiles of experts before e, and the grid has cdiv(rows, BLOCK_M) + E programs (an upper
bound on the tiles), the extra ones exiting at once.

A kernel with SPLIT_K > 1 writes fp32 partial sums of its K slices to a workspace [rows, SPLIT_K, N]
(allocated here, through `alloc`, which tests replace with a NaN-poisoning one) over a third grid
axis, and its reduce kernel (`reduce_name`, the next kernel of the op: codegen's
split_k_reduce) sums them over the same tiles and applies the epilogue."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..formats import FP8Tensor, NVFP4Tensor
from .triton_loader import TritonKernels
from .triton_ops import Alloc, empty


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def tile_starts(offsets: torch.Tensor, block_m: int) -> torch.Tensor:
    """int32 [E+1]: cumulative count of BLOCK_M-row tiles per expert segment."""
    counts = offsets[1:] - offsets[:-1]
    return F.pad(torch.cumsum((counts + block_m - 1) // block_m, 0), (1, 0)).to(torch.int32)


POINTER_ALIGNMENT = 16  # bytes: what the compiled kernels' divisibility hints promise


def aligned(t: torch.Tensor) -> torch.Tensor:
    """t contiguous, and on a GPU 16-byte aligned (the compiled kernels assume their tensor pointers
    are; a view into a larger buffer may not be): copied when it is not."""
    t = t.contiguous()
    if t.is_cuda and t.data_ptr() % POINTER_ALIGNMENT:
        return t.clone()
    return t


def _one(device: torch.device) -> torch.Tensor:
    """A placeholder for pointer arguments a specialisation does not read."""
    return torch.ones(1, dtype=torch.float32, device=device)


def _per_expert(scale: torch.Tensor, experts: int) -> torch.Tensor:
    return torch.broadcast_to(scale.to(torch.float32).reshape(-1), (experts,)).contiguous()


def split_k(kernels: TritonKernels, name: str, reduce_name: str | None) -> int:
    """The kernel's SPLIT_K; a split kernel must come with its reduce kernel."""
    split = int(kernels.constexpr(name, "SPLIT_K"))
    if split > 1 and reduce_name is None:
        raise ValueError(f"kernel {name} splits K in {split} and needs its reduce kernel, which was not given")
    return split


def _workspace(split: int, rows: int, n: int, device: torch.device, alloc: Alloc) -> torch.Tensor:
    """fp32 [rows, SPLIT_K, N] for a split kernel; a placeholder the unsplit kernel does not touch."""
    return alloc((rows, split, n), torch.float32, device) if split > 1 else _one(device)


def moe_nvfp4_gemm(kernels: TritonKernels, name: str, x: torch.Tensor, order: torch.Tensor | None,
                   offsets: torch.Tensor, weight: NVFP4Tensor, input_scale: torch.Tensor | None,
                   routing: torch.Tensor | None, out: torch.Tensor, rows: int, reduce_name: str | None = None,
                   alloc: Alloc = empty, bias: torch.Tensor | None = None,
                   x_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Run kernel `name` (a moe_nvfp4_gemm specialisation) over rows offsets[0]:offsets[E] of `rows`;
    `order` is read only by specialisations that gather or combine; `reduce_name`: the reduce
    kernel of a split-K specialisation. A DENSE specialisation (one weight) runs rows 0..rows-1 and
    reads neither `offsets` nor `order`; `bias` only there (HAS_BIAS). x uint8: NVFP4 codes [rows, K/2]
    with their block scales `x_scale` [rows, K/16] (the kernel's CODES mode)."""
    dense = bool(kernels.constexpr(name, "DENSE"))
    experts = 1 if dense else offsets.numel() - 1
    block_m = int(kernels.constexpr(name, "BLOCK_M"))
    block_n = int(kernels.constexpr(name, "BLOCK_N"))
    n = int(kernels.constexpr(name, "N"))
    split = split_k(kernels, name, reduce_name)
    one = _one(x.device)
    # a dense GEMM has no expert schedule: one program per BLOCK_M rows
    grid = (_cdiv(rows, block_m) + (0 if dense else experts), _cdiv(n, block_n))
    starts = one if dense else tile_starts(offsets, block_m)
    offsets_arg = one if dense else offsets.contiguous()
    order_arg = offsets_arg if order is None or dense else order.contiguous()
    global_scale = _per_expert(weight.global_scale, experts)
    input_scales = one if input_scale is None else _per_expert(input_scale, experts)
    routing_arg = one if routing is None else routing.to(torch.float32).contiguous()
    bias_arg = out if bias is None else bias.to(out.dtype).contiguous()
    workspace = _workspace(split, rows, n, x.device, alloc)
    x = aligned(x)
    kernels.launch(
        name, (*grid, split),
        x_ptr=x, order_ptr=order_arg, tile_starts_ptr=starts,
        offsets_ptr=offsets_arg, weight_ptr=aligned(weight.packed),
        block_scale_ptr=aligned(weight.block_scale), global_scale_ptr=global_scale,
        input_scale_ptr=input_scales, routing_ptr=routing_arg, out_ptr=out, workspace_ptr=workspace,
        bias_ptr=bias_arg, x_scale_ptr=weight.block_scale if x_scale is None else aligned(x_scale), rows=rows)
    if split > 1:
        assert reduce_name is not None
        kernels.launch(reduce_name, grid, workspace_ptr=workspace, x_ptr=x, order_ptr=order_arg,
                       tile_starts_ptr=starts, offsets_ptr=offsets_arg, global_scale_ptr=global_scale,
                       input_scale_ptr=input_scales, routing_ptr=routing_arg, out_ptr=out, bias_ptr=bias_arg,
                       rows=rows)
    return out


def moe_fp8_gemm(kernels: TritonKernels, name: str, x: torch.Tensor, order: torch.Tensor | None,
                 offsets: torch.Tensor, weight: FP8Tensor, input_scale: torch.Tensor | None,
                 routing: torch.Tensor | None, out: torch.Tensor, rows: int) -> torch.Tensor:
    """Run kernel `name` (a moe_fp8_gemm specialisation) over rows offsets[0]:offsets[E] of `rows`:
    weight FP8 [E, N, K] with a per-tensor [], per-expert [E] or per-channel [E, N] scale (read in
    place through its strides); input_scale [E] or [] (W8A8) or None (W8A16: ones)."""
    experts = offsets.numel() - 1
    block_m = int(kernels.constexpr(name, "BLOCK_M"))
    n = int(kernels.constexpr(name, "N"))
    grid = (_cdiv(rows, block_m) + experts, _cdiv(n, int(kernels.constexpr(name, "BLOCK_N"))))
    scale = weight.scale.to(torch.float32).contiguous()
    strides = {0: (0, 0), 1: (1, 0), 2: (n, 1)}[scale.ndim]  # (per expert, per output column)
    input_scales = (torch.ones(experts, dtype=torch.float32, device=x.device) if input_scale is None
                    else _per_expert(input_scale, experts))
    kernels.launch(
        name, grid, x_ptr=aligned(x), order_ptr=offsets if order is None else order.contiguous(),
        tile_starts_ptr=tile_starts(offsets, block_m), offsets_ptr=offsets.contiguous(),
        weight_ptr=aligned(weight.data), weight_scale_ptr=scale, input_scale_ptr=input_scales,
        routing_ptr=_one(x.device) if routing is None else routing.to(torch.float32).contiguous(), out_ptr=out,
        scale_expert_stride=strides[0], scale_column_stride=strides[1])
    return out


def _expert_gemm(kernels: TritonKernels, name: str, x: torch.Tensor, order: torch.Tensor, offsets: torch.Tensor,
                 weight: NVFP4Tensor | FP8Tensor, input_scale: torch.Tensor | None, routing: torch.Tensor | None,
                 out: torch.Tensor, reduce_name: str | None, alloc: Alloc) -> torch.Tensor:
    """The grouped GEMM of an expert op, by the weight's format (the FP8 kernel has no split-K)."""
    if isinstance(weight, FP8Tensor):
        return moe_fp8_gemm(kernels, name, x, order, offsets, weight, input_scale, routing, out, order.numel())
    return moe_nvfp4_gemm(kernels, name, x, order, offsets, weight, input_scale, routing, out, order.numel(),
                          reduce_name, alloc)


def nvfp4_linear(kernels: TritonKernels, name: str, x: torch.Tensor | NVFP4Tensor, weight: NVFP4Tensor,
                 input_scale: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                 out: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16,
                 reduce_name: str | None = None, alloc: Alloc = empty) -> torch.Tensor:
    """out [..., N] = x @ dequant(weight)^T + bias with an NVFP4 weight [N, K]: W4A16, or W4A4 (the
    kernel's ACT_FORMAT nvfp4: x quantized on load as `quantize(x, "nvfp4", input_scale)`, or x the
    NVFP4 codes a fused norm wrote, an NVFP4Tensor under input_scale, read as they are)."""
    # (codegen/triton/plan.py specialises a uint8 x pointer for an nvfp4codes input: CODES mode)
    data = x.packed if isinstance(x, NVFP4Tensor) else x
    rows = data.reshape(-1, data.shape[-1])
    x_scale = x.block_scale.reshape(rows.shape[0], -1) if isinstance(x, NVFP4Tensor) else None
    n = weight.shape[0]
    if out is None:
        out = torch.empty(rows.shape[0], n, dtype=out_dtype, device=data.device)
    if kernels.constexpr(name, "ACT_FORMAT") == "nvfp4" and input_scale is None:
        raise ValueError(f"kernel {name} quantizes its input to NVFP4 and needs the input_scale")
    # the [N, K/2] weight is the kernel's one weight [1, N, K/2]: the same bytes
    moe_nvfp4_gemm(kernels, name, rows, None, _one(data.device), weight, input_scale, None, out, rows.shape[0],
                   reduce_name, alloc, bias, x_scale)
    return out.view(*data.shape[:-1], n)


def moe_expert_up(kernels: TritonKernels, name: str, x: torch.Tensor, order: torch.Tensor, offsets: torch.Tensor,
                  weight: NVFP4Tensor | FP8Tensor, input_scale: torch.Tensor | None = None, out: torch.Tensor | None = None,
                  out_dtype: torch.dtype = torch.bfloat16, reduce_name: str | None = None,
                  alloc: Alloc = empty) -> torch.Tensor:
    """hidden [N*k, I] = act(grouped_gemm(Q(x[order // k]), offsets, weight)): gather, GEMM, ReLU²."""
    if out is None:
        out = torch.empty(order.numel(), weight.shape[1], dtype=out_dtype, device=x.device)
    return _expert_gemm(kernels, name, x, order, offsets, weight, input_scale, None, out, reduce_name, alloc)


def moe_expert_down(kernels: TritonKernels, name: str, combine_name: str, hidden: torch.Tensor, order: torch.Tensor,
                    offsets: torch.Tensor, weight: NVFP4Tensor | FP8Tensor, routing: torch.Tensor,
                    input_scale: torch.Tensor | None = None, out: torch.Tensor | None = None,
                    pairs: torch.Tensor | None = None, reduce_name: str | None = None,
                    alloc: Alloc = empty) -> torch.Tensor:
    """out [N, D] = moe_combine(grouped_gemm(Q(hidden), offsets, weight), order, routing, N): the GEMM
    writes each pair's weighted row (fp32, `pairs` [N*k, D]), then moe_combine_rows sums each token's."""
    tokens, top_k = routing.shape
    d = weight.shape[1]
    if pairs is None:
        pairs = torch.empty(tokens * top_k, d, dtype=torch.float32, device=hidden.device)
    if out is None:
        out = torch.empty(tokens, d, dtype=hidden.dtype, device=hidden.device)
    _expert_gemm(kernels, name, hidden, order, offsets, weight, input_scale, routing.reshape(-1), pairs, reduce_name,
                 alloc)
    block_n = int(kernels.constexpr(combine_name, "BLOCK_N"))
    kernels.launch(combine_name, (tokens, _cdiv(d, block_n)), pairs_ptr=pairs, out_ptr=out)
    return out


def grouped_gemm_w4a16(kernels: TritonKernels, name: str, x_sorted: torch.Tensor, offsets: torch.Tensor,
                      weight: NVFP4Tensor, out_dtype: torch.dtype, reduce_name: str | None = None) -> torch.Tensor:
    """The `grouped_gemm` op with an NVFP4 weight and float rows already sorted by expert."""
    out = torch.empty(x_sorted.shape[0], weight.shape[1], dtype=out_dtype, device=x_sorted.device)
    return moe_nvfp4_gemm(kernels, name, x_sorted, None, offsets, weight, None, None, out, x_sorted.shape[0],
                          reduce_name)


def fp8_linear(kernels: TritonKernels, name: str, x: torch.Tensor, weight: FP8Tensor,
               input_scale: torch.Tensor | None, bias: torch.Tensor | None = None, out: torch.Tensor | None = None,
               out_dtype: torch.dtype = torch.bfloat16, reduce_name: str | None = None,
               alloc: Alloc = empty) -> torch.Tensor:
    """out [M, N] = Q(x) @ dequant(weight)^T + bias (Q: FP8 with the static input_scale, when given)."""
    rows = x.reshape(-1, x.shape[-1])
    n = weight.shape[0]
    if out is None:
        out = torch.empty(rows.shape[0], n, dtype=out_dtype, device=x.device)
    block_m = int(kernels.constexpr(name, "BLOCK_M"))
    block_n = int(kernels.constexpr(name, "BLOCK_N"))
    split = split_k(kernels, name, reduce_name)
    one = _one(x.device)
    grid = (_cdiv(rows.shape[0], block_m), _cdiv(n, block_n))
    scale = one if input_scale is None else input_scale.float().reshape(1)
    weight_scale = weight.scale.float().reshape(-1).contiguous()
    bias_arg = out if bias is None else bias.to(out.dtype).contiguous()
    workspace = _workspace(split, rows.shape[0], n, x.device, alloc)
    kernels.launch(name, (*grid, split),
                   x_ptr=aligned(rows), input_scale_ptr=scale, weight_ptr=aligned(weight.data),
                   weight_scale_ptr=weight_scale, bias_ptr=bias_arg, out_ptr=out, workspace_ptr=workspace,
                   rows=rows.shape[0])
    if split > 1:
        assert reduce_name is not None
        kernels.launch(reduce_name, grid, workspace_ptr=workspace, input_scale_ptr=scale,
                       weight_scale_ptr=weight_scale, bias_ptr=bias_arg, out_ptr=out, rows=rows.shape[0])
    return out.view(*x.shape[:-1], n)
