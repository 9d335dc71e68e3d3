"""The norm, Mamba, attention and router kernels compile ahead of time for sm_90a and sm_100a on this
CPU-only machine (aot.compile_instance: triton.compile with a GPUTarget, no driver), at Nemotron-H
shapes. Each compile prints its cold time, registers, stack, shared memory and the tensor-core
instructions in its PTX.

Every kernel on both archs takes minutes (the SSD scan ~20-35 s per arch on a shared two-core
machine), so that test is marked slow; a fast one compiles two small kernels on every run, after an
interpreted launch in the same process (the loader must leave Triton able to compile)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("triton", reason="ahead-of-time compile needs the triton package (the [triton] extra)")

import torch

from nemocompile.codegen.triton import templates_catalog as catalog
from nemocompile.codegen.triton.aot import CompiledKernel, compile_instance
from nemocompile.codegen.triton.spec import KernelInstance
from nemocompile.runtime.kernels import triton_ops
from tests.triton_kernels import interpreted

HIDDEN, MAMBA_INNER, MAMBA_GROUP = 2688, 4096, 512  # Nemotron-H Nano-like widths


def nemotron_instances() -> list[KernelInstance]:
    """Every template of this family at representative shapes (bf16 activations, fp32 parameters), in
    the variants engines use (conv1d and SSD with a state and seq_lens, attention in its EXACT form)."""
    attention_decode = catalog.attention_gqa("attention_decode", "attention_gqa", head_dim=128, decode=True)
    attention_prefill = catalog.attention_gqa("attention_prefill", "attention_gqa", head_dim=128, decode=False)
    attention_fp8_cache = catalog.attention_gqa("attention_fp8_cache", "attention_gqa", head_dim=128, decode=True,
                                                cache_dtype="fp8e4nv")
    return [
        catalog.add_rms_norm("add_rms_norm", "add_rms_norm", width=HIDDEN),
        catalog.add_rms_norm("add_rms_norm_fp8", "add_rms_norm", width=HIDDEN, act_format="fp8"),
        catalog.add_rms_norm("add_rms_norm_nvfp4", "add_rms_norm", width=HIDDEN, act_format="nvfp4"),
        catalog.gated_rms_norm("gated_rms_norm", "gated_rms_norm", width=MAMBA_INNER, group_size=MAMBA_GROUP),
        catalog.causal_conv1d("conv1d_prefill", "causal_conv1d", kernel_size=4, state=True, seq_lens=True),
        catalog.causal_conv1d("conv1d_decode", "causal_conv1d", kernel_size=4, state=True, decode=True,
                              seq_lens=True),
        catalog.ssd_chunk_scan("ssd_chunk_scan", "ssd_chunk_scan", head_dim=64, state_size=128, chunk_size=128,
                               initial_state=True, seq_lens=True),
        catalog.ssd_state_update("ssd_state_update", "ssd_state_update", head_dim=64, state_size=128,
                                 seq_lens=True),
        *attention_decode, *attention_prefill, *attention_fp8_cache,
        *catalog.moe_route("router_e128", "moe_route", experts=128, top_k=6),
        *catalog.moe_route("router_e256_grouped", "moe_route", experts=256, top_k=8, n_group=8, topk_group=4),
    ]


def _report(kernel: CompiledKernel) -> None:
    print(f"{kernel.name:28s} {kernel.arch:7s} cold {kernel.seconds:6.2f} s  {kernel.registers:3d} registers  "
          f"{kernel.spills:5d} B stack  {kernel.shared_bytes:6d} B shared  {', '.join(kernel.tensor_cores) or '-'}")


def test_small_kernels_compile_after_an_interpreted_launch(tmp_path: Path) -> None:
    norm = catalog.gated_rms_norm("gated", "gated_rms_norm", width=64, group_size=16)
    x = torch.randn(2, 64).bfloat16()
    triton_ops.gated_rms_norm(interpreted([norm], tmp_path / "engine"), "gated", x, x, torch.ones(64).bfloat16(), 1e-5)
    write, _ = catalog.attention_gqa("attn", "attention_gqa", head_dim=128, decode=True)
    for arch in ("sm_90", "sm_100"):
        for instance in (norm, write):
            kernel = compile_instance(instance, arch, tmp_path / "cache")
            _report(kernel)
            assert f".target {arch}a" in kernel.file("ptx").read_text() and kernel.file("cubin").stat().st_size


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["sm_90", "sm_100"])
def test_every_kernel_compiles(arch: str, tmp_path: Path) -> None:
    tensor_core = "wgmma" if arch == "sm_90" else "tcgen05"
    for instance in nemotron_instances():
        kernel = compile_instance(instance, arch, tmp_path)
        _report(kernel)
        assert f".target {arch}a" in kernel.file("ptx").read_text()
        assert kernel.shared_bytes <= 227 * 1024, "more shared memory than an SM has"
        if instance.name in ("attention_prefill", "ssd_chunk_scan"):  # their dots take 16-bit operands
            assert any(tensor_core in found for found in kernel.tensor_cores), kernel.tensor_cores
