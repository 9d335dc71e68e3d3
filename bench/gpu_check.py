"""The prepared check for a lent GPU (H100/H200: W4A16; B200: W4A4; both: FP8 W8A8 experts), within 10 minutes:

1. compiles the GEMM kernels ahead of time for the GPU's arch and loads the stored binaries
   through the runtime loader (no JIT), as an engine would;
2. checks each kernel against its reference composition on the GPU (fresh random inputs,
   NaN-poisoned outputs, the tolerance of tests/test_triton_gemm.py);
3. times the fused MoE experts (up-GEMM + down-GEMM + combine) at decode batch 1..64 with Nano's
   shapes against the unfused torch reference (quant_grouped_gemm, moe_combine) and against the
   HBM roofline (the bytes of the experts touched, at the target's HBM bandwidth), and prints a table:
   the arch's NVFP4 experts, then the FP8 W8A8 experts of a ModelOpt FP8 export (moe_fp8_gemm);
4. checks the dense NVFP4 GEMMs (`linear` W4A16 on sm_90, `quant_linear` W4A4 on sm_100) at the
   Mamba in_proj and out_proj shapes against their reference ops, and times them at decode batch
   1..64 against the torch reference and the HBM roofline (the weight's codes and block scales, the
   activations in and out; the timed calls cycle through enough weight copies that each reads its
   weight from HBM, not from the L2), unsplit and, where N / BLOCK_N programs leave SMs idle, split-K;
   on sm_100 also the W4A4 GEMM reading a fused norm's NVFP4 codes (`_codes`);
5. checks the norm, Mamba, attention and router kernels (specialised as engines use them: conv1d
   and SSD with seq_lens, attention in its EXACT form) against their reference ops and times two of
   them (bench/ops_check.py).

    python bench/gpu_check.py [--model /work/shared/models/nano.json] [--iters 50]
    python bench/gpu_check.py --dry-run [--arch sm_100] [--compile]   # no GPU: the whole script in
        Triton's interpreter at tiny shapes (timings are CPU time of the interpreter, meaningless)

The kernel set, the checks and the roofline bytes run in the interpreter in tests/test_gpu_check.py,
and the dry run there goes through main() end to end.

Nothing here asserts a speed; failed correctness checks give exit status 1."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import ops_check  # bench/ops_check.py: the norm, Mamba, attention and router kernels
import torch

from nemocompile.base.settings import settings
from nemocompile.codegen.triton import templates_catalog as catalog
from nemocompile.codegen.triton.emit import emit
from nemocompile.runtime.formats import (
    FP8Tensor,
    NVFP4Tensor,
    fp8_codes,
    nvfp4_codes,
    quantize_fp8,
    quantize_fp8_stacked,
    quantize_nvfp4,
    quantize_nvfp4_stacked,
)
from nemocompile.runtime.kernels import triton_gemm
from nemocompile.runtime.kernels.triton_loader import TritonKernels
from nemocompile.runtime.quantized_ops import quant_grouped_gemm, quant_linear, quantize
from nemocompile.runtime.reference.elementwise import relu2
from nemocompile.runtime.reference.fused import linear_any, quant_linear_on_load
from nemocompile.runtime.reference.moe import moe_combine, moe_dispatch
from nemocompile.targets.loader import load_target

BATCHES = (1, 2, 4, 8, 16, 32, 64)
DRY_RUN_BATCHES = (1, 2, 4)
TARGETS = {90: "h200", 100: "b200"}
# The dry run's MoE shapes (bench/ops_check.TINY gives the rest of the config).
DRY_RUN_MOE = {"hidden_size": 64, "moe_intermediate_size": 128, "n_routed_experts": 8, "num_experts_per_tok": 2}


# act_format -> amax / input_scale of the static activation scales the checks use (E2M1 6 x E4M3 448; E4M3 448)
SCALED_MAX = {"nvfp4": 6 * 448, "fp8": 448}
FP8 = "fp8"  # the W8A8 expert GEMMs: kernels "up_fp8" / "down_fp8", FP8 weights


def _block_k(k: int, preferred: int) -> int:
    return next(b for b in (preferred, 128, 64, 32, 16) if k % b == 0)


def kernel_set(d: int, i: int, experts: int, top_k: int, act_format: str) -> list[catalog.KernelInstance]:
    tile = {"block_m": 16} if act_format == "bf16" else {"block_m": 128, "block_n": 128}
    return [
        catalog.moe_gemm("up", "moe_expert_up", n=i, k=d, experts=experts, top_k=top_k, act_format=act_format,
                         activation="relu2", gather=True, block_k=_block_k(d, 128), **tile),
        catalog.moe_gemm("down", "moe_expert_down", n=d, k=i, experts=experts, top_k=top_k, act_format=act_format,
                         combine=True, block_k=_block_k(i, 128), **tile),
        catalog.moe_combine("combine", "moe_expert_down", n=d, top_k=top_k),
        catalog.fp8_linear("fp8", "linear", n=d, k=d, quant_act=True, block_k=_block_k(d, 128)),
        # `quant_linear` after a norm that quantized its output: the E4M3 codes it wrote, with its scale
        catalog.fp8_linear("fp8_qx", "quant_linear", n=d, k=d, quant_act=True, per_channel=True, has_bias=True,
                           x_dtype="fp8e4nv", block_k=_block_k(d, 128)),
        # a ModelOpt FP8 export's routed experts (W8A8, per-expert scales), decode tiles as plan.py builds them
        catalog.moe_fp8_gemm("up_fp8", "moe_expert_up", n=i, k=d, experts=experts, top_k=top_k, activation="relu2",
                             gather=True, block_k=_block_k(d, 128)),
        catalog.moe_fp8_gemm("down_fp8", "moe_expert_down", n=d, k=i, experts=experts, top_k=top_k, combine=True,
                             block_k=_block_k(i, 128)),
    ]


def _names(act_format: str) -> tuple[str, str]:
    """The (up, down) kernels of an expert format: the FP8 ones, or the NVFP4 ones of the arch."""
    return ("up_fp8", "down_fp8") if act_format == FP8 else ("up", "down")


def _experts(experts: int, n: int, k: int, act_format: str, generator: torch.Generator,
             device: str) -> NVFP4Tensor | FP8Tensor:
    w = torch.randn(experts, n, k, generator=generator, device=device)
    return quantize_fp8_stacked(w) if act_format == FP8 else quantize_nvfp4_stacked(w)


def dense_shapes(config: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """(N, K) of the dense GEMMs timed: the Mamba in_proj (x, z, B, C, dt) and out_proj."""
    inner = config["mamba_num_heads"] * config["mamba_head_dim"]
    in_n = 2 * inner + 2 * config["n_groups"] * config["ssm_state_size"] + config["mamba_num_heads"]
    return {"in_proj": (in_n, config["hidden_size"]), "out_proj": (config["hidden_size"], inner)}


DENSE_BLOCK_N = 64  # the W4A16 default (BLOCK_M 16, SWAP_AB); W4A4 takes 128x128 tiles


def _dense_split(n: int, k: int, block_n: int, block_k: int, sm_count: int) -> int:
    """The smallest SPLIT_K (2, 4, 8) whose programs cover the SMs with at least two BLOCK_K steps per
    slice, or 1 when N / BLOCK_N programs alone do (or no split keeps two steps a slice)."""
    programs = -(-n // block_n)
    steps = -(-k // block_k)
    for split in (2, 4, 8):
        if programs * split >= sm_count and -(-steps // split) >= 2 and programs < sm_count:
            return split
    return 1


def dense_kernel_set(shapes: dict[str, tuple[int, int]], act_format: str, sm_count: int
                     ) -> list[catalog.KernelInstance]:
    """The dense NVFP4 GEMM per shape (with a bias: the epilogue's whole path), and its split-K form
    where the unsplit one leaves SMs idle at decode; each split-K GEMM is followed by its reduce."""
    op = "linear" if act_format == "bf16" else "quant_linear"
    block_n = DENSE_BLOCK_N if act_format == "bf16" else 128
    found: list[catalog.KernelInstance] = []
    for name, (n, k) in shapes.items():
        block_k = _block_k(k, 128)
        found.append(catalog.nvfp4_linear(f"dense_{name}", op, n=n, k=k, act_format=act_format, has_bias=True,
                                          block_k=block_k))
        if act_format == "nvfp4":  # the W4A4 GEMM after a fused norm reads the norm's NVFP4 codes as they are
            found.append(catalog.nvfp4_linear(f"dense_{name}{CODES_SUFFIX}", op, n=n, k=k, act_format=act_format,
                                              has_bias=True, block_k=block_k, x_dtype="u8"))
        split = _dense_split(n, k, block_n, block_k, sm_count)
        if split > 1:
            found.append(catalog.nvfp4_linear(f"dense_{name}_splitk{split}", op, n=n, k=k, act_format=act_format,
                                              has_bias=True, block_k=block_k, split_k=split))
    return list(catalog.with_split_k_reduces(found))


def _dense_gemms(kernels: TritonKernels) -> list[tuple[str, str | None]]:
    """(GEMM, its split-K reduce or None) of every dense kernel loaded."""
    names = sorted(name for name in kernels.entries if name.startswith("dense_") and
                   not name.endswith(catalog.REDUCE_SUFFIX))
    return [(name, name + catalog.REDUCE_SUFFIX if name + catalog.REDUCE_SUFFIX in kernels.entries else None)
            for name in names]


def _dense_input(name: str, x: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor | NVFP4Tensor:
    """What kernel `name` reads: x, or for a codes kernel the NVFP4 codes a fused norm writes for x."""
    if name.endswith(CODES_SUFFIX):
        assert scale is not None
        return nvfp4_codes(x, scale)
    return x


def _dense_reference(x: torch.Tensor, weight: NVFP4Tensor, scale: torch.Tensor | None,
                     bias: torch.Tensor | None) -> torch.Tensor:
    """The op the kernel runs: linear (W4A16) or quant_linear {act_format nvfp4} (W4A4)."""
    if scale is None:
        return linear_any(x, weight, bias, torch.bfloat16)
    return quant_linear_on_load(x, weight, scale, bias, act_format="nvfp4", out_dtype=torch.bfloat16)


def check_dense(kernels: TritonKernels, act_format: str, device: str = "cuda",
                token_counts: tuple[int, ...] = (1, 13, 64)) -> bool:
    """Each dense NVFP4 GEMM against its reference op (bias included); True when all pass."""
    g = torch.Generator(device=device).manual_seed(2)
    all_ok = True
    for name, reduce in _dense_gemms(kernels):
        n, k = int(kernels.constexpr(name, "N")), int(kernels.constexpr(name, "K"))
        weight = quantize_nvfp4(torch.randn(n, k, generator=g, device=device))
        bias = torch.randn(n, generator=g, device=device).bfloat16()
        for tokens in token_counts:
            x = torch.randn(tokens, k, generator=g, device=device).bfloat16()
            scale = torch.tensor(float(x.float().abs().max()) / 2688, device=device) if act_format == "nvfp4" else None
            out = triton_gemm.nvfp4_linear(kernels, name, _dense_input(name, x, scale), weight, scale, bias,
                                           reduce_name=reduce,
                                           out=torch.full((tokens, n), float("nan"), dtype=torch.bfloat16,
                                                          device=device))
            ok, worst = _within(out, _dense_reference(x, weight, scale, bias))
            label = f"dense_{'w4a16' if act_format == 'bf16' else 'w4a4'} {name.removeprefix('dense_')}"
            print(f"  {label:30s} tokens {tokens:3d}: {'ok  ' if ok else 'FAIL'} worst error / bound {worst:.2f}")
            all_ok &= ok
    return all_ok


def dense_hbm_bytes(n: int, k: int, batch: int, codes: bool = False) -> int:
    """The least bytes a dense NVFP4 GEMM moves at decode: its weight's packed E2M1 codes and E4M3
    block-16 scales and fp32 global scale, the activations in (bf16, or NVFP4 codes and block scales)
    and the bf16 output (the bias, N bf16 values, is left out as the roofline's own rounding)."""
    activations = batch * (k // 2 + k // 16) if codes else batch * k * 2
    return n * k // 2 + n * k // 16 + 4 + activations + batch * n * 2


CODES_SUFFIX = "_codes"  # a dense W4A4 kernel reading a fused norm's NVFP4 codes
L2_FLUSH_BYTES = 256 * 2**20  # the weight copies cycled per timed call hold more than any L2 of these GPUs


def _cycling_call(kernels: TritonKernels, name: str, reduce: str | None, x: torch.Tensor | NVFP4Tensor,
                  weights: list[NVFP4Tensor], scale: torch.Tensor | None, bias: torch.Tensor,
                  out: torch.Tensor) -> Callable[[], None]:
    """A launch of kernel `name` on the next weight copy at each call (so no call finds its weight in the L2)."""
    turn = [0]

    def call() -> None:
        turn[0] = (turn[0] + 1) % len(weights)
        triton_gemm.nvfp4_linear(kernels, name, x, weights[turn[0]], scale, bias, out=out, reduce_name=reduce)
    return call


def bench_dense(kernels: TritonKernels, act_format: str, bandwidth: float, iters: int, device: str = "cuda",
                batches: tuple[int, ...] = BATCHES) -> None:
    g = torch.Generator(device=device).manual_seed(3)
    print(f"{'kernel':24s} {'batch':>5} {'MB moved':>9} {'roofline us':>11} {'kernel us':>9} {'% roofline':>10} "
          f"{'torch us':>9} {'speedup':>7}")
    for name, reduce in _dense_gemms(kernels):
        n, k = int(kernels.constexpr(name, "N")), int(kernels.constexpr(name, "K"))
        base = quantize_nvfp4(torch.randn(n, k, generator=g, device=device))
        copies = max(1, -(-L2_FLUSH_BYTES // (n * k // 2 + n * k // 16))) if device == "cuda" else 1
        weights = [base, *(NVFP4Tensor(base.packed.clone(), base.block_scale.clone(), base.global_scale)
                           for _ in range(copies - 1))]
        bias = torch.randn(n, generator=g, device=device).bfloat16()
        for batch in batches:
            x = torch.randn(batch, k, generator=g, device=device).bfloat16()
            scale = torch.tensor(float(x.float().abs().max()) / 2688, device=device) if act_format == "nvfp4" else None
            out = torch.empty(batch, n, dtype=torch.bfloat16, device=device)
            moved = dense_hbm_bytes(n, k, batch, name.endswith(CODES_SUFFIX))
            roofline = moved / bandwidth * 1e6
            kernel_us = ops_check.time_us(_cycling_call(kernels, name, reduce, _dense_input(name, x, scale), weights,
                                                        scale, bias, out), iters, device)
            torch_us = ops_check.time_us(partial(_dense_reference, x, base, scale, bias), max(3, iters // 10), device)
            print(f"{name:24s} {batch:5d} {moved / 1e6:9.2f} {roofline:11.1f} {kernel_us:9.1f} "
                  f"{100 * roofline / kernel_us:9.1f}% {torch_us:9.1f} {torch_us / kernel_us:6.1f}x")


def _bf16_ulp(values: torch.Tensor) -> torch.Tensor:
    return torch.exp2(torch.floor(torch.log2(values.float().abs().clamp_min(1e-30))) - 7)


def _row_rounding(rows: torch.Tensor, order: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Per output element, one bf16 ulp of each of the token's expert rows times its routing weight:
    the down-GEMM rounds each row to bf16 as the reference does, and a row whose fp32 sum (another
    order) lands on the other side of a rounding boundary moves the combined output by that much."""
    tokens, top_k = weights.shape
    per_row = _bf16_ulp(rows) * weights.reshape(-1)[order].abs()[:, None]
    return torch.zeros(tokens, rows.shape[1], device=rows.device).index_add_(0, order // top_k, per_row)


def _within(actual: torch.Tensor, expected: torch.Tensor, ulps: float = 2.0,
            extra: torch.Tensor | None = None) -> tuple[bool, float]:
    """ulps bf16 ulps of max(|expected|, 2**-8 max|expected|) (+ extra) per element, and no NaN."""
    floor = float(expected.float().abs().max()) * 2.0**-8
    magnitude = torch.maximum(expected.float().abs(), torch.tensor(floor, device=expected.device))
    bound = ulps * _bf16_ulp(magnitude) + (0.0 if extra is None else extra)
    error = (actual.float() - expected.float()).abs()
    ok = not bool(torch.isnan(actual).any()) and bool((error <= bound).all())
    return ok, float((error / bound).max())


def _route(tokens: int, experts: int, top_k: int, generator: torch.Generator, device: str) -> tuple[torch.Tensor, ...]:
    scores = torch.rand(tokens, experts, generator=generator, device=device)
    ids = scores.topk(top_k, dim=1).indices
    weights = torch.rand(tokens, top_k, generator=generator, device=device) + 0.1
    return ids, weights


def check(kernels: TritonKernels, d: int, i: int, experts: int, top_k: int, act_format: str,
          device: str = "cuda", token_counts: tuple[int, ...] = (1, 13, 64)) -> bool:
    """The expert GEMMs and the FP8 linear against their reference compositions; True when all pass."""
    g = torch.Generator(device=device).manual_seed(0)
    all_ok = True
    up_w, down_w = _experts(experts, i, d, act_format, g, device), _experts(experts, d, i, act_format, g, device)
    up_name, down_name = _names(act_format)
    for tokens in token_counts:
        ids, routing = _route(tokens, experts, top_k, g, device)
        ids[:, 0] = torch.where(ids[:, 0] == 1, 0, ids[:, 0])  # expert 1 gets no tokens from slot 0
        x = torch.randn(tokens, d, generator=g, device=device).bfloat16()
        x_sorted, offsets, order = moe_dispatch(x, ids, experts)
        quantized = act_format in SCALED_MAX  # W4A4 or W8A8: static per-expert input scales
        up_scale = (torch.full((experts,), float(x.float().abs().max()) / SCALED_MAX[act_format], device=device)
                    if quantized else None)
        hidden = triton_gemm.moe_expert_up(kernels, up_name, x, order, offsets, up_w, up_scale,
                                           out=torch.full((tokens * top_k, i), float("nan"), dtype=torch.bfloat16,
                                                          device=device))
        up_in = quantize(x_sorted, act_format, up_scale, offsets) if up_scale is not None else x_sorted
        # the fused ops' references (runtime/reference/fused.py): expert GEMM outputs in bf16
        ref_hidden = relu2(quant_grouped_gemm(up_in, offsets, up_w, torch.bfloat16))
        ok_up, worst_up = _within(hidden, ref_hidden, 3.0)
        down_scale = (torch.full((experts,), float(ref_hidden.float().abs().max()) / SCALED_MAX[act_format],
                                 device=device) if quantized else None)
        out = triton_gemm.moe_expert_down(kernels, down_name, "combine", ref_hidden, order, offsets, down_w, routing,
                                          down_scale, out=torch.full((tokens, d), float("nan"), dtype=torch.bfloat16,
                                                                     device=device))
        down_in = quantize(ref_hidden, act_format, down_scale, offsets) if down_scale is not None else ref_hidden
        rows = quant_grouped_gemm(down_in, offsets, down_w, torch.bfloat16)
        ref_out = moe_combine(rows, order, routing, tokens)
        ok_down, worst_down = _within(out, ref_out, 2.0, _row_rounding(rows, order, routing))
        up_label, down_label = (f"{op} {act_format}" for op in ("moe_expert_up", "moe_expert_down"))
        results = [(up_label, ok_up, worst_up), (down_label, ok_down, worst_down)]
        if act_format == FP8:  # the FP8 linears were checked with the arch's experts
            _print_checks(tokens, results)
            all_ok &= ok_up and ok_down
            continue
        weight = quantize_fp8(torch.randn(d, d, generator=g, device=device))
        scale = torch.tensor(float(x.float().abs().max()) / 448, device=device)
        fp8_out = triton_gemm.fp8_linear(kernels, "fp8", x, weight, scale)
        ok_fp8, worst_fp8 = _within(fp8_out, quant_linear(quantize(x, "fp8", scale), weight, None,
                                                          torch.float32).bfloat16())
        x_codes = fp8_codes(x, scale)  # a fused norm's FP8 output: E4M3 codes meaning codes * scale
        channel_weight = quantize_fp8(torch.randn(d, d, generator=g, device=device), per_channel=True)
        bias = torch.randn(d, generator=g, device=device).bfloat16()
        qx_out = triton_gemm.fp8_linear(kernels, "fp8_qx", x_codes, channel_weight, scale, bias,
                                        out=torch.full((tokens, d), float("nan"), dtype=torch.bfloat16, device=device))
        ok_qx, worst_qx = _within(qx_out, quant_linear(quantize(x, "fp8", scale), channel_weight, bias,
                                                       torch.bfloat16))
        results += [("fp8_linear", ok_fp8, worst_fp8), ("fp8_linear codes", ok_qx, worst_qx)]
        _print_checks(tokens, results)
        all_ok &= all(ok for _, ok, _ in results)
    return all_ok


def _print_checks(tokens: int, results: list[tuple[str, bool, float]]) -> None:
    for name, ok, worst in results:
        print(f"  {name:21s} tokens {tokens:3d}: {'ok  ' if ok else 'FAIL'} worst error / bound {worst:.2f}")


def fused_experts(kernels: TritonKernels, names: tuple[str, str], x: torch.Tensor, order: torch.Tensor,
                  offsets: torch.Tensor, up_w: NVFP4Tensor | FP8Tensor, down_w: NVFP4Tensor | FP8Tensor,
                  routing: torch.Tensor, scales: torch.Tensor | None, hidden: torch.Tensor, out: torch.Tensor,
                  pairs: torch.Tensor) -> None:
    triton_gemm.moe_expert_up(kernels, names[0], x, order, offsets, up_w, scales, out=hidden)
    triton_gemm.moe_expert_down(kernels, names[1], "combine", hidden, order, offsets, down_w, routing, scales,
                                out=out, pairs=pairs)


def unfused_experts(x_sorted: torch.Tensor, order: torch.Tensor, offsets: torch.Tensor,
                    up_w: NVFP4Tensor | FP8Tensor, down_w: NVFP4Tensor | FP8Tensor, routing: torch.Tensor,
                    scales: torch.Tensor | None, act_format: str) -> None:
    up_in = quantize(x_sorted, act_format, scales, offsets) if scales is not None else x_sorted
    hidden = relu2(quant_grouped_gemm(up_in, offsets, up_w, torch.bfloat16))
    down_in = quantize(hidden, act_format, scales, offsets) if scales is not None else hidden
    moe_combine(quant_grouped_gemm(down_in, offsets, down_w, torch.bfloat16), order, routing, routing.shape[0])


def hbm_bytes(touched: int, batch: int, d: int, i: int, top_k: int, act_format: str = "nvfp4") -> int:
    """The least bytes the fused MoE experts move from and to HBM at decode: the weights of the
    experts the batch touches (NVFP4: packed E2M1 codes and E4M3 block-16 scales, up and down, and
    their fp32 global scales; FP8: one E4M3 byte per weight and the fp32 weight and input scales),
    the bf16 activations in and out, and the bf16 hidden rows written by the up-GEMM and read by the
    down-GEMM."""
    per_expert = i * d * 2 + 16 if act_format == FP8 else (i * d // 2 + i * d // 16) * 2 + 8
    return touched * per_expert + batch * d * 2 * 2 + batch * top_k * i * 2 * 2


def bench(kernels: TritonKernels, d: int, i: int, experts: int, top_k: int, act_format: str, bandwidth: float,
          iters: int, device: str = "cuda", batches: tuple[int, ...] = BATCHES) -> None:
    g = torch.Generator(device=device).manual_seed(1)
    up_w, down_w = _experts(experts, i, d, act_format, g, device), _experts(experts, d, i, act_format, g, device)
    scales = torch.full((experts,), 1e-3, device=device) if act_format in SCALED_MAX else None
    print(f"{'batch':>5} {'experts':>7} {'MB moved':>9} {'roofline us':>11} {'fused us':>9} {'% roofline':>10} "
          f"{'unfused us':>10} {'speedup':>7}")
    for batch in batches:
        ids, routing = _route(batch, experts, top_k, g, device)
        x = torch.randn(batch, d, generator=g, device=device).bfloat16()
        x_sorted, offsets, order = moe_dispatch(x, ids, experts)
        touched = int(torch.unique(ids).numel())
        moved = hbm_bytes(touched, batch, d, i, top_k, act_format)
        roofline = moved / bandwidth * 1e6
        hidden = torch.empty(batch * top_k, i, dtype=torch.bfloat16, device=device)
        out = torch.empty(batch, d, dtype=torch.bfloat16, device=device)
        pairs = torch.empty(batch * top_k, d, dtype=torch.float32, device=device)

        fused_us = ops_check.time_us(partial(fused_experts, kernels, _names(act_format), x, order, offsets, up_w,
                                             down_w, routing, scales, hidden, out, pairs), iters, device)
        unfused_us = ops_check.time_us(partial(unfused_experts, x_sorted, order, offsets, up_w, down_w, routing, scales,
                                               act_format), max(3, iters // 10), device)
        print(f"{batch:5d} {touched:7d} {moved / 1e6:9.2f} {roofline:11.1f} {fused_us:9.1f} "
              f"{100 * roofline / fused_us:9.1f}% {unfused_us:10.1f} {unfused_us / fused_us:6.1f}x")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="/work/shared/models/nano.json", help="config.json with the MoE shapes")
    parser.add_argument("--iters", type=int, default=None, help="timed runs per point (default 50; dry run 1)")
    parser.add_argument("--dry-run", action="store_true",
                        help="no GPU: every step in Triton's interpreter on the CPU at tiny shapes")
    parser.add_argument("--arch", choices=("sm_90", "sm_100"), default="sm_90", help="the dry run's arch")
    parser.add_argument("--compile", action="store_true", help="the dry run compiles the kernels ahead of time too")
    args = parser.parse_args(argv)
    if args.dry_run:
        device, arch = "cpu", args.arch
        config: dict[str, Any] = {**ops_check.TINY, **DRY_RUN_MOE}
        iters, batches, prompt, model = args.iters or 1, DRY_RUN_BATCHES, 37, "tiny shapes (dry run)"
    else:
        if not torch.cuda.is_available():
            print("gpu_check.py needs a CUDA GPU (sm_90 or sm_100); none is visible (--dry-run runs it in the "
                  "interpreter)", file=sys.stderr)
            return 2
        major, _ = torch.cuda.get_device_capability()
        if major * 10 not in TARGETS:
            print(f"gpu_check.py checks sm_90 and sm_100 GPUs; this one is sm_{major}x", file=sys.stderr)
            return 2
        device, arch = "cuda", f"sm_{major * 10}"
        config = json.loads(Path(args.model).read_text())
        iters, batches, prompt, model = args.iters or 50, BATCHES, 4096, Path(args.model).name
    target = load_target(TARGETS[int(arch[3:])])
    act_format = "bf16" if arch == "sm_90" else "nvfp4"
    d, i = config["hidden_size"], config["moe_intermediate_size"]
    experts, top_k = config["n_routed_experts"], config["num_experts_per_tok"]
    gpu = torch.cuda.get_device_name() if device == "cuda" else "CPU, Triton interpreter"
    print(f"{gpu} ({arch}), {model}: hidden {d}, expert intermediate {i}, {experts} experts, top-{top_k}, "
          f"{'W4A16' if act_format == 'bf16' else 'W4A4'}, HBM {target.hbm_bandwidth_bytes_per_s / 1e12:.2f} TB/s "
          f"({target.name})")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as root:
        compile_binaries = device == "cuda" or args.compile
        cache = Path(settings().kernel_cache_dir).expanduser() if device == "cuda" else Path(root) / "cache"
        dense = dense_kernel_set(dense_shapes(config), act_format, target.sm_count)
        emitted = emit(kernel_set(d, i, experts, top_k, act_format) + dense + ops_check.kernel_set(config), Path(root),
                       arch, cache, compile_binaries=compile_binaries)
        for kernel in emitted.compiled:
            print(f"  compiled {kernel.name:8s} {kernel.registers:3d} regs {kernel.spills:4d} B stack "
                  f"{kernel.shared_bytes:6d} B smem {', '.join(kernel.tensor_cores) or '-'} ({kernel.seconds:.1f} s)")
        kernels = TritonKernels.from_directory(Path(root), device)
        print(f"kernels ready in {time.perf_counter() - start:.1f} s; checking against the references")
        token_counts = (1, 13, 64) if device == "cuda" else (1, 9)
        ok = check(kernels, d, i, experts, top_k, act_format, device, token_counts)
        print("FP8 W8A8 experts (moe_fp8_gemm) against their reference ops")
        ok &= check(kernels, d, i, experts, top_k, FP8, device, token_counts)
        print("dense NVFP4 GEMMs against their reference ops")
        ok &= check_dense(kernels, act_format, device, token_counts)
        print("norm, Mamba, attention and router kernels against their reference ops")
        ok &= ops_check.check(kernels, config, device, prompt=300 if device == "cuda" else prompt)
        clock = "median of CUDA-event timings" if device == "cuda" else "interpreter CPU time, meaningless as speed"
        print(f"fused MoE experts at decode ({clock}; roofline = bytes / HBM bandwidth)")
        bench(kernels, d, i, experts, top_k, act_format, float(target.hbm_bandwidth_bytes_per_s), iters, device,
              batches)
        print(f"fused FP8 W8A8 MoE experts at decode ({clock})")
        bench(kernels, d, i, experts, top_k, FP8, float(target.hbm_bandwidth_bytes_per_s), iters, device, batches)
        print(f"dense NVFP4 GEMMs at decode ({clock}; roofline = bytes / HBM bandwidth)")
        bench_dense(kernels, act_format, float(target.hbm_bandwidth_bytes_per_s), iters, device, batches)
        print(f"norm and conv kernels against their torch references ({clock})")
        ops_check.bench(kernels, config, iters, prompt, device)
    print(f"total {time.perf_counter() - start:.1f} s; correctness {'ok' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
