"""The norm, Mamba, attention and router kernels on a lent GPU: part of bench/gpu_check.py, which
compiles them with the GEMMs (kernel_set) and calls check() and bench().

check(): each kernel, specialised as an engine specialises it (conv1d and SSD with a state and
seq_lens, attention in its EXACT form), against its reference op on the GPU, at the model's shapes,
decode (batch 1, and batch 8 with one idle sequence) and a 300-token prompt (not a multiple of the
chunk, with 3 tokens of right padding), fresh random inputs, NaN-poisoned outputs. Compiled code differs from the reference in approximations the interpreter does not make
(rsqrt.approx, ex2.approx, FMA contraction, bf16 tensor-core dots), so the bounds are looser than
the interpreter tests': bf16 outputs 2 bf16 ulps of the largest magnitude (attention 2e-2), fp32
outputs 1e-4 of it (the SSD scan 1e-3), and quantized outputs may differ in at most 0.1% of their
elements (a value on a rounding boundary), each by at most one step.
bench(): each kernel's median time against its torch reference on the GPU (a table, no assertion).

    python bench/ops_check.py --cpu   # the same check in Triton's interpreter, tiny shapes (a smoke run)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

from nemocompile.codegen.triton import templates_catalog as catalog
from nemocompile.codegen.triton.emit import emit
from nemocompile.codegen.triton.spec import KernelInstance
from nemocompile.runtime.formats import NVFP4Tensor, dequantize_nvfp4
from nemocompile.runtime.kernels import triton_ops
from nemocompile.runtime.kernels.triton_loader import TritonKernels
from nemocompile.runtime.quantized_ops import quantize
from nemocompile.runtime.reference.attention import attention_gqa_cached
from nemocompile.runtime.reference.conv import causal_conv1d
from nemocompile.runtime.reference.moe import moe_dispatch, moe_router
from nemocompile.runtime.reference.norms import gated_rms_norm, rms_norm
from nemocompile.runtime.reference.ssd import ssd_chunk_scan, ssd_state_update

TINY = {"hidden_size": 64, "mamba_num_heads": 4, "mamba_head_dim": 16, "n_groups": 2, "ssm_state_size": 16,
        "conv_kernel": 4, "chunk_size": 16, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "n_routed_experts": 16, "num_experts_per_tok": 4, "n_group": 1, "topk_group": 1,
        "routed_scaling_factor": 2.5, "layer_norm_epsilon": 1e-5}


def _sizes(config: dict[str, Any]) -> dict[str, int]:
    heads, head_dim = config["mamba_num_heads"], config["mamba_head_dim"]
    groups, state = config["n_groups"], config["ssm_state_size"]
    return {"hidden": config["hidden_size"], "heads": heads, "head_dim": head_dim, "groups": groups, "state": state,
            "inner": heads * head_dim, "conv_channels": heads * head_dim + 2 * groups * state}


def kernel_set(config: dict[str, Any]) -> list[KernelInstance]:
    s = _sizes(config)
    experts, top_k = config["n_routed_experts"], config["num_experts_per_tok"]
    return [
        catalog.add_rms_norm("ops_norm", "add_rms_norm", width=s["hidden"]),
        catalog.add_rms_norm("ops_norm_fp8", "add_rms_norm", width=s["hidden"], act_format="fp8"),
        catalog.add_rms_norm("ops_norm_nvfp4", "add_rms_norm", width=s["hidden"], act_format="nvfp4"),
        catalog.gated_rms_norm("ops_gated", "gated_rms_norm", width=s["inner"], group_size=s["inner"] // s["groups"],
                               weight_dtype="fp32", out_dtype="fp32"),
        catalog.causal_conv1d("ops_conv_prefill", "causal_conv1d", kernel_size=config["conv_kernel"], state=True,
                              seq_lens=True),
        catalog.causal_conv1d("ops_conv_decode", "causal_conv1d", kernel_size=config["conv_kernel"], state=True,
                              decode=True, seq_lens=True),
        catalog.ssd_chunk_scan("ops_scan", "ssd_chunk_scan", head_dim=s["head_dim"], state_size=s["state"],
                               chunk_size=config["chunk_size"], initial_state=True, seq_lens=True),
        catalog.ssd_state_update("ops_update", "ssd_state_update", head_dim=s["head_dim"], state_size=s["state"],
                                 seq_lens=True),
        *catalog.attention_gqa("ops_attn_decode", "attention_gqa", head_dim=config["head_dim"], decode=True,
                               group=config["num_attention_heads"] // config["num_key_value_heads"]),
        *catalog.attention_gqa("ops_attn_prefill", "attention_gqa", head_dim=config["head_dim"], decode=False),
        *catalog.attention_gqa("ops_attn_fp8", "attention_gqa", head_dim=config["head_dim"], decode=True,
                               group=config["num_attention_heads"] // config["num_key_value_heads"],
                               cache_dtype="fp8e4nv"),
        *catalog.moe_route("ops_route", "moe_route", experts=experts, top_k=top_k, n_group=config["n_group"],
                           topk_group=config["topk_group"]),
    ]


def _poison(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=torch.float32, device=device).to(dtype)
    return torch.full(shape, 0xFF if dtype == torch.uint8 else -7, dtype=dtype, device=device)


def _error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest |actual - expected| over the largest |expected| (at least 1); inf when NaN is left."""
    if bool(torch.isnan(actual.float()).any()):
        return float("inf")
    scale = max(float(expected.float().abs().max()), 1.0) if expected.numel() else 1.0
    return float((actual.float() - expected.float()).abs().max()) / scale if expected.numel() else 0.0


def _quantized_mismatch(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Fraction of elements that differ (inf when any differs by more than a few quantization steps)."""
    differ = actual != expected
    if not bool(differ.any()):
        return 0.0
    relative = ((actual - expected).abs() / expected.abs().clamp_min(1e-30))[differ]
    return float("inf") if bool((relative > 0.7).any()) else float(differ.float().mean())


Case = tuple[str, float, float]  # (name, measured, bound)


def check(kernels: TritonKernels, config: dict[str, Any], device: str, prompt: int = 300) -> bool:
    s = _sizes(config)
    g = torch.Generator(device=device).manual_seed(0)
    eps = config["layer_norm_epsilon"]

    def randn(*shape: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        return torch.randn(*shape, generator=g, device=device).to(dtype)

    cases: list[Case] = []
    for tokens in (1, 8, prompt):
        x, residual = randn(tokens, s["hidden"]), randn(tokens, s["hidden"])
        weight = randn(s["hidden"]) * 0.1 + 1
        (out,), res_out = triton_ops.add_rms_norm(kernels, "ops_norm", x, residual, weight, eps, alloc=_poison)
        expected = rms_norm(x + residual, weight, eps)
        cases.append((f"add_rms_norm {tokens}", max(_error(out, expected), _error(res_out, x + residual)), 2**-7))
        scale = torch.tensor(float(expected.float().abs().max()) / 448, device=device)
        (data,), _ = triton_ops.add_rms_norm(kernels, "ops_norm_fp8", x, residual, weight, eps, scale, alloc=_poison)
        cases.append((f"add_rms_norm fp8 {tokens}",
                      _quantized_mismatch(data.float() * scale, quantize(expected, "fp8", scale)), 1e-3))
        global_scale = torch.tensor(float(expected.float().abs().max()) / 2688, device=device)
        (packed, block_scale), _ = triton_ops.add_rms_norm(kernels, "ops_norm_nvfp4", x, residual, weight, eps,
                                                           global_scale, alloc=_poison)
        dequantized = dequantize_nvfp4(NVFP4Tensor(packed, block_scale, global_scale))
        cases.append((f"add_rms_norm nvfp4 {tokens}",
                      _quantized_mismatch(dequantized, quantize(expected, "nvfp4", global_scale)), 1e-3))
        inner, gate = randn(tokens, s["inner"]), randn(tokens, s["inner"])
        norm_weight = randn(s["inner"], dtype=torch.float32) * 0.1 + 1
        group = s["inner"] // s["groups"]
        gated = triton_ops.gated_rms_norm(kernels, "ops_gated", inner, gate, norm_weight, eps, alloc=_poison)
        cases.append((f"gated_rms_norm {tokens}", _error(gated, gated_rms_norm(inner, gate, norm_weight, group, eps)),
                      1e-4))
    for batch, length in ((1, 1), (8, 1), (1, prompt)):
        decode = length == 1
        # right padding: the last of 8 decode sequences is idle, the prompt has 3 padding tokens
        seq_lens = torch.tensor([length] * (batch - 1) + [0 if batch > 1 else max(1, length - 3)], device=device)
        channels, taps = s["conv_channels"], config["conv_kernel"]
        x = randn(batch, length, channels)
        conv_w, conv_b = randn(channels, 1, taps) * 0.3, randn(channels) * 0.1
        state = randn(batch, channels, taps - 1)
        name = "ops_conv_decode" if decode else "ops_conv_prefill"
        y, new_state = triton_ops.causal_conv1d(kernels, name, x, conv_w, conv_b, state, alloc=_poison,
                                                seq_lens=seq_lens)
        ref_y, ref_state = causal_conv1d(x, conv_w, conv_b, "silu", state, seq_lens)
        cases.append((f"causal_conv1d {batch}x{length}", max(_error(y, ref_y), _error(new_state, ref_state)), 2**-7))
        heads, head_dim, groups, state_size = s["heads"], s["head_dim"], s["groups"], s["state"]
        xs, dt = randn(batch, length, heads * head_dim), randn(batch, length, heads) * 0.5 - 1
        b, c = randn(batch, length, groups * state_size), randn(batch, length, groups * state_size)
        a_log, d, dt_bias = (randn(heads, dtype=torch.float32) * 0.5 for _ in range(3))
        sizes: dict[str, Any] = dict(num_heads=heads, head_dim=head_dim, n_groups=groups, state_size=state_size,
                                     dt_max=float("inf"))
        ssm = randn(batch, heads, head_dim, state_size, dtype=torch.float32)
        if decode:
            y, new = triton_ops.ssd_state_update(kernels, "ops_update", xs, dt, a_log, b, c, d, dt_bias, dt_min=0.0,
                                                 state=ssm, alloc=_poison, seq_lens=seq_lens, **sizes)
            ref_y, ref_new = ssd_state_update(xs, dt, a_log, b, c, d, dt_bias, dt_min=0.0, state=ssm,
                                              seq_lens=seq_lens, **sizes)
            cases.append((f"ssd_state_update {batch}", max(_error(y, ref_y), _error(new, ref_new)), 2**-7))
        else:
            y, final = triton_ops.ssd_chunk_scan(kernels, "ops_scan", xs, dt, a_log, b, c, d, dt_bias, dt_min=1e-3,
                                                 initial_state=ssm, alloc=_poison, seq_lens=seq_lens, **sizes)
            ref_y, ref_final = ssd_chunk_scan(xs, dt, a_log, b, c, d, dt_bias, chunk_size=config["chunk_size"],
                                              dt_min=1e-3, initial_state=ssm, seq_lens=seq_lens, **sizes)
            cases.append((f"ssd_chunk_scan {length}", max(_error(y, ref_y), _error(final, ref_final)), 1e-3))
        q_heads, kv_heads, head = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
        lens = torch.randint(0, 200, (batch,), generator=g, device=device) if decode else torch.zeros(1, dtype=torch.int64,
                                                                                                    device=device)
        capacity = int(lens.max()) + length
        k_cache = randn(batch, kv_heads, capacity, head)
        v_cache = randn(batch, kv_heads, capacity, head)
        q, k, v = randn(batch, length, q_heads * head), randn(batch, length, kv_heads * head), randn(batch, length,
                                                                                                  kv_heads * head)
        ref_k, ref_v = k_cache.clone(), v_cache.clone()
        names = ("ops_attn_decode_kv_write", "ops_attn_decode") if decode else ("ops_attn_prefill_kv_write",
                                                                                "ops_attn_prefill")
        attn = dict(num_heads=q_heads, num_kv_heads=kv_heads, head_dim=head, scale=head**-0.5)
        out, _, _ = triton_ops.attention_gqa_cached(kernels, *names, q, k, v, k_cache, v_cache, lens, alloc=_poison,
                                                    **attn)
        ref_out, _, _ = attention_gqa_cached(q, k, v, ref_k, ref_v, lens, **attn)
        cases.append((f"attention_gqa {batch}x{length}", max(_error(out, ref_out), _error(k_cache, ref_k)), 2e-2))
        if decode:  # an FP8 KV cache: codes written bit for bit, read as code * scale
            fp8 = torch.float8_e4m3fn
            scales = {"k_scale": k.float().abs().max() / 448, "v_scale": v.float().abs().max() / 448}
            k_codes, v_codes = (cache.to(fp8) for cache in (ref_k, ref_v))
            ref_k8, ref_v8 = k_codes.clone(), v_codes.clone()
            out, _, _ = triton_ops.attention_gqa_cached(kernels, "ops_attn_fp8_kv_write", "ops_attn_fp8", q, k, v,
                                                        k_codes, v_codes, lens, alloc=_poison, **attn, **scales)
            ref_out, _, _ = attention_gqa_cached(q, k, v, ref_k8, ref_v8, lens, **attn, **scales)
            codes = _quantized_mismatch(k_codes.float(), ref_k8.float())
            cases.append((f"attention_gqa fp8 cache {batch}x{length}", max(_error(out, ref_out), codes), 2e-2))
    experts, top_k = config["n_routed_experts"], config["num_experts_per_tok"]
    for tokens in (1, 8, prompt):
        x, router_w = randn(tokens, s["hidden"]), randn(experts, s["hidden"], dtype=torch.float32)
        bias = torch.rand(experts, generator=g, device=device) * 0.1
        attrs = dict(top_k=top_k, n_group=config["n_group"], topk_group=config["topk_group"], norm_topk_prob=True,
                     routed_scaling_factor=config["routed_scaling_factor"])
        weights, ids, offsets, order = triton_ops.moe_route(kernels, "ops_route", "ops_route_permutation", x, router_w,
                                                            bias, routed_scaling_factor=attrs["routed_scaling_factor"],
                                                            alloc=_poison)
        ref_w, ref_ids = moe_router(x, router_w, bias, **attrs)
        _, ref_offsets, _ = moe_dispatch(x, ref_ids, experts)
        same_sets = torch.equal(ids.sort(1).values, ref_ids.sort(1).values) and torch.equal(offsets, ref_offsets)
        stable = torch.equal(order, torch.argsort(ids.flatten(), stable=True))
        weight_error = _error(weights.gather(1, ids.sort(1).indices), ref_w.gather(1, ref_ids.sort(1).indices))
        cases.append((f"moe_route {tokens}", weight_error if same_sets and stable else float("inf"), 1e-5))
    all_ok = True
    for name, measured, bound in cases:
        ok = measured <= bound
        all_ok &= ok
        print(f"  {name:28s} {'ok  ' if ok else 'FAIL'} {measured:.2e} (bound {bound:.1e})")
    return all_ok


def time_us(fn: Callable[[], object], iters: int, device: str = "cuda") -> float:
    """Median microseconds of fn(): CUDA events on a GPU; on a CPU (a dry run in the interpreter, where
    the number says only that the code ran) the process CPU time, which other processes' load does
    not inflate as it does wall time."""
    if device != "cuda":
        fn()
        times = []
        for _ in range(iters):
            start = time.process_time()
            fn()
            times.append((time.process_time() - start) * 1e6)
        return sorted(times)[len(times) // 2]
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1000)
    return sorted(times)[len(times) // 2]


def bench(kernels: TritonKernels, config: dict[str, Any], iters: int, prompt: int = 4096, device: str = "cuda") -> None:
    """Median time of each kernel and of its torch reference at decode (batch 1) and one prompt."""
    s = _sizes(config)
    eps = config["layer_norm_epsilon"]
    print(f"{'kernel':28s} {'triton us':>10} {'torch us':>10} {'speedup':>8}")
    for tokens in (1, prompt):
        x, residual = torch.randn(tokens, s["hidden"], device=device).bfloat16(), torch.randn(
            tokens, s["hidden"], device=device).bfloat16()
        weight = torch.ones(s["hidden"], device=device).bfloat16()
        conv_x = torch.randn(1, tokens, s["conv_channels"], device=device).bfloat16()
        conv_w = torch.randn(s["conv_channels"], 1, config["conv_kernel"], device=device).bfloat16()
        conv_b = torch.randn(s["conv_channels"], device=device).bfloat16()
        conv_state = torch.randn(1, s["conv_channels"], config["conv_kernel"] - 1, device=device).bfloat16()
        decode = tokens == 1
        conv_name = "ops_conv_decode" if decode else "ops_conv_prefill"
        conv_lens = torch.tensor([tokens], device=device)
        rows: list[tuple[str, Callable[[], object], Callable[[], object]]] = [
            (f"add_rms_norm {tokens}", partial(triton_ops.add_rms_norm, kernels, "ops_norm", x, residual, weight, eps),
             partial(_add_rms_norm_reference, x, residual, weight, eps)),
            (f"causal_conv1d {tokens}", partial(triton_ops.causal_conv1d, kernels, conv_name, conv_x, conv_w, conv_b,
                                                conv_state, seq_lens=conv_lens),
             partial(causal_conv1d, conv_x, conv_w, conv_b, "silu", conv_state, conv_lens)),
        ]
        for name, triton_fn, torch_fn in rows:
            ours, theirs = time_us(triton_fn, iters, device), time_us(torch_fn, max(3, iters // 5), device)
            print(f"{name:28s} {ours:10.1f} {theirs:10.1f} {theirs / ours:7.1f}x")


def _add_rms_norm_reference(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return rms_norm(x + residual, weight, eps)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="run the check in Triton's interpreter at tiny shapes")
    args = parser.parse_args()
    if not args.cpu:
        print("run bench/gpu_check.py on a GPU (it includes this check); --cpu runs it in the interpreter",
              file=sys.stderr)
        return 2
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as root:
        emit(kernel_set(TINY), Path(root), "sm_90", Path(root) / "cache", compile_binaries=False)
        ok = check(TritonKernels.from_directory(Path(root), "cpu"), TINY, "cpu", prompt=37)
    print(f"total {time.perf_counter() - start:.1f} s; correctness {'ok' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
